"""The KL penalty against the reference policy and the per-token reward PPO maximises.

The reward of a rollout (InstructGPT eq. 2, Ziegler et al. 2019) is the reward model's score of the
whole completion, given at its last token, minus β · KL(policy ‖ reference) at every token, so the
policy pays for drifting from the SFT model token by token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.maths.masked import masked_whiten


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p − log p_ref per token: unbiased for KL(p ‖ p_ref) under samples from p, but any
    single token can be negative.

    Args:
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens under policy and reference.

    Returns:
        (B, T) estimates (nats).
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = p_ref / p (Schulman, "Approximating KL divergence"): unbiased
    too, never negative, lower variance than k1 when the two policies are close.

    Args:
        logprobs, ref_logprobs: (B, T) as for `kl_k1`.

    Returns:
        (B, T) estimates (nats), ≥ 0.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio  # expm1 keeps precision when r ≈ 1


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """`kl_k1` or `kl_k3` by name, as configs spell it: (B, T) → (B, T) nats."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r} (expected 'k1' or 'k3')")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask → (B,) int64 index of each row's last true position (0 for an empty row).

    Works for left and right padding alike, unlike `mask.sum(-1) − 1`.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).max(dim=-1).values.clamp(min=0)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                      score_clip: float | None = None, whiten: bool = False) -> torch.Tensor:
    """reward[b, t] = −β · kl[b, t], plus the (clipped) score at each row's final completion token.

    Args:
        scores: (B,) reward-model scores of the completions.
        kl: (B, T) per-token KL estimates (`kl_penalty`) on completion positions.
        mask: (B, T), true on completion tokens.
        beta: KL coefficient β (a float, e.g. a controller's `value`).
        score_clip: clamp scores to [−score_clip, score_clip] first, so one outlier score from an
            over-optimised reward model cannot dominate a batch; None leaves them.
        whiten: rescale the rewards to unit variance over the mask, keeping their mean (and so
            the sign of what the policy is pushed towards).

    Returns:
        (B, T) float rewards; 0 at unmarked positions. Inputs are rollout-time values: call on
        detached tensors.
    """
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    zero = kl.new_zeros(())
    rewards = torch.where(mask.bool(), -beta * kl, zero)
    last = last_token_index(mask)  # (B,)
    final_scores = torch.where(mask.bool().any(dim=-1), scores.to(kl.dtype), zero)  # (B,)
    rewards = rewards.scatter_add(-1, last[:, None], final_scores[:, None])
    return masked_whiten(rewards, mask, shift_mean=False) if whiten else rewards


@dataclass
class FixedKLController:
    """β that stays at `value`; `update` is a no-op so trainers need no special case."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    """β adapted towards a KL target (Ziegler et al. 2019, section 2.2).

    β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon): the error is clipped so a
    single noisy batch cannot swing β, and `horizon` (in samples) sets how fast β moves.
    `value` is the whole state: save it with a checkpoint to resume.

    Args:
        value: current β (start with the initial coefficient).
        target: KL (nats per sequence, summed over tokens) to aim for.
        horizon: samples over which a persistent error changes β by about e^0.2.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        """current_kl: the batch's mean KL (same units as `target`); n_steps: samples in it."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
