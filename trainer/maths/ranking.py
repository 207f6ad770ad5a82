"""The reward model's K-way ranking loss (InstructGPT, Ouyang et al. 2022, eq. 1).

A prompt with K ranked completions gives C(K, 2) comparisons. They are correlated (each completion
appears in K − 1 of them), so the paper keeps them together as ONE batch element and averages over
them: a prompt ranked over 9 completions weighs the same as one compared over 2, instead of 36×.
Rewards come in a padded (P, K_max) layout; `pad_groups` builds it from a flat batch of scores.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pad_groups(scores: torch.Tensor, group_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a flat batch of completion scores into one padded row per prompt.

    Args:
        scores: (N,) scores of every completion, grouped by prompt, each group in its own order.
        group_sizes: K of each prompt, summing to N.

    Returns:
        rewards (P, K_max), padded with 0, differentiable with respect to `scores`;
        mask (P, K_max) bool, true on real completions.
    """
    if sum(group_sizes) != scores.shape[0]:
        raise ValueError(f"group sizes sum to {sum(group_sizes)} but there are {scores.shape[0]} scores")
    rows = torch.split(scores, list(group_sizes))
    rewards = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    sizes = torch.as_tensor(list(group_sizes), device=scores.device)
    mask = torch.arange(rewards.shape[1], device=scores.device) < sizes[:, None]
    return rewards, mask


def _ordered_pairs(mask: torch.Tensor, ranks: torch.Tensor | None) -> torch.Tensor:
    """(P, K, K) bool: [p, i, j] is true when completion i is ranked above completion j."""
    if ranks is None:  # columns are already best-first
        ranks = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    mask = mask.bool()
    both_real = mask[:, :, None] & mask[:, None, :]
    return both_real & (ranks[:, :, None] < ranks[:, None, :])  # tied ranks form no pair


def ranking_loss(rewards: torch.Tensor, mask: torch.Tensor, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """loss = mean over prompts of −1/C(K,2) · Σ_{better, worse} log σ(r_better − r_worse).

    Args:
        rewards: (P, K_max) scalar rewards r(x, y) of each prompt's completions.
        mask: (P, K_max), true on real completions (a prompt may have fewer than K_max).
        ranks: (P, K_max) ints, lower is better; tied completions are not compared. None means the
            columns are already ordered best first.

    Returns:
        Scalar loss (nats). A prompt without a single ordered pair is left out of the mean (the
        dataset loader rejects rankings with one completion before training starts).
    """
    pairs = _ordered_pairs(mask, ranks)  # (P, K, K)
    margins = rewards[:, :, None] - rewards[:, None, :]  # (P, K, K): r_i − r_j
    pair_losses = torch.where(pairs, -F.logsigmoid(margins), margins.new_zeros(()))
    pair_counts = pairs.sum(dim=(1, 2))  # (P,) C(K, 2) without ties
    per_prompt = pair_losses.sum(dim=(1, 2)) / pair_counts.clamp(min=1)  # (P,)
    has_pairs = pair_counts > 0
    return per_prompt[has_pairs].sum() / has_pairs.sum().clamp(min=1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The K = 2 case, −log σ(r_chosen − r_rejected) averaged over the batch.

    Args:
        chosen, rejected: (B,) rewards of the preferred and the other completion of each prompt.

    Returns:
        Scalar loss (nats).
    """
    return -F.logsigmoid(chosen - rejected).mean()


def pairwise_accuracy(rewards: torch.Tensor, mask: torch.Tensor,
                      ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of ordered pairs the rewards put in the labelled order (a tie counts as wrong).

    Every pair counts once (unlike the loss, which weighs prompts equally): this is the held-out
    "pairwise accuracy" reported for reward models.

    Args:
        rewards, mask, ranks: as for `ranking_loss`.

    Returns:
        Scalar float64 in [0, 1], without gradient: in float32, 9 of 20 is 0.44999998, and a gate
        "accuracy >= 0.45" refused an RM that reached it exactly.
    """
    pairs = _ordered_pairs(mask, ranks)
    correct = (rewards[:, :, None] > rewards[:, None, :]) & pairs
    return (correct.sum().double() / pairs.sum().clamp(min=1).double()).detach()
