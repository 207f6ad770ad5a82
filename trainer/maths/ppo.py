"""PPO losses for a token-level policy and value model (Schulman et al. 2017), and the
pretraining-mix term of PPO-ptx (InstructGPT eq. 2).

Every mean is over the batch's marked tokens (each token weighs the same). Rollout-time inputs
(old log-probs, old values, advantages, returns) are detached here, so a gradient can only reach
the tensors being trained even if a caller forgets to detach.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.maths.logprobs import next_token_logprobs
from trainer.maths.masked import masked_mean


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # scalar: share of tokens where the clipped term was chosen
    approx_kl: torch.Tensor  # scalar nats: k3 estimate of KL(old ‖ new), for early stopping


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # scalar: share of tokens where the clipped value was chosen


class PtxLoss(NamedTuple):
    loss: torch.Tensor  # scalar, γ_ptx · nll, differentiable
    nll: torch.Tensor  # scalar nats per token, detached: the metric to watch


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, epsilon: float = 0.2) -> PolicyLoss:
    """Clipped surrogate: mean of max(−A · ρ, −A · clip(ρ, 1 − ε, 1 + ε)), ρ = p / p_old.

    Taking the larger loss makes the objective pessimistic: once ρ leaves [1 − ε, 1 + ε] in the
    direction the advantage favours, the token stops pushing.

    Args:
        logprobs: (B, T) log-probs of the rollout tokens under the policy being trained.
        old_logprobs: (B, T) the same under the policy that generated the rollout.
        advantages: (B, T), usually whitened.
        mask: (B, T), true on completion tokens.
        epsilon: clip range ε (InstructGPT: 0.2).

    Returns:
        PolicyLoss(loss, clip_fraction, approx_kl).
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon, 1.0 + epsilon)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float = 0.2) -> ValueLoss:
    """Clipped value loss: ½ · mean of max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±c).

    The clip keeps one update from moving a value estimate far from the one the advantages were
    computed with, mirroring the policy clip.

    Args:
        values: (B, T) value-model outputs being trained.
        old_values: (B, T) value estimates from the rollout.
        returns: (B, T) targets from `gae`.
        mask: (B, T), true on completion tokens.
        clip_range: c, in reward units.

    Returns:
        ValueLoss(loss, clip_fraction).
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLoss(loss, clip_fraction)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the policy's next-token distributions, a collapse detector.

    H = logsumexp(l) − Σ softmax(l) · l, computed in float32. Differentiable (for an entropy
    bonus); call it under `torch.no_grad()` when it is only logged, as the graph holds (B, T, V).

    Args:
        logits: (B, T, V).
        mask: (B, T), true where the distribution is used (completion positions).

    Returns:
        Scalar nats.
    """
    logits = logits.float()
    per_token = logits.logsumexp(-1) - (torch.softmax(logits, -1) * logits).sum(-1)  # (B, T)
    return masked_mean(per_token, mask)


def ptx_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, coef: float) -> PtxLoss:
    """Pretraining mix: γ_ptx · next-token cross-entropy on pretraining text.

    Args:
        logits: (B, T, V), the policy's output for `input_ids`.
        input_ids: (B, T) pretraining tokens.
        mask: (B, T), false on tokens to ignore (padding); a token counts as a target when it
            is marked.
        coef: γ_ptx (0 gives plain PPO).

    Returns:
        PtxLoss(loss = coef · nll, nll).
    """
    nll = masked_mean(-next_token_logprobs(logits, input_ids), mask[:, 1:])
    return PtxLoss(coef * nll, nll.detach())
