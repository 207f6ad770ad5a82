"""Direct preference optimisation (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023).

Both read h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), where each log π is
SUMMED over the completion's tokens (`sequence_logprobs`): the implicit reward of a completion is
β times its whole-sequence log-ratio.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    chosen_rewards: torch.Tensor  # (B,) β · (log π − log π_ref) of the chosen completions, detached
    rejected_rewards: torch.Tensor  # (B,) the same for the rejected ones
    margin: torch.Tensor  # scalar: mean of chosen − rejected rewards
    accuracy: torch.Tensor  # scalar: share of pairs whose chosen reward is higher


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> DPOLoss:
    """DPO loss of a batch of preference pairs.

    sigmoid: −(1 − s) · log σ(β h) − s · log σ(−β h), s the label smoothing (the probability that a
    label is flipped; conservative DPO). ipo: (h − 1/(2β))², which does not push h to infinity on
    deterministic preferences.

    Args:
        policy_chosen, policy_rejected: (B,) summed log-probs (nats) under the policy being trained.
        reference_chosen, reference_rejected: (B,) the same under the frozen reference.
        beta: β, the strength of the implicit KL constraint.
        label_smoothing: s in [0, 0.5); sigmoid loss only.
        loss_type: "sigmoid" (DPO) or "ipo".

    Returns:
        DPOLoss(loss, chosen_rewards, rejected_rewards, margin, accuracy).
    """
    chosen_log_ratio = policy_chosen - reference_chosen.detach()
    rejected_log_ratio = policy_rejected - reference_rejected.detach()
    h = chosen_log_ratio - rejected_log_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (expected 'sigmoid' or 'ipo')")
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    return DPOLoss(losses.mean(), chosen_rewards, rejected_rewards, (chosen_rewards - rejected_rewards).mean(),
                   (chosen_rewards > rejected_rewards).float().mean())
