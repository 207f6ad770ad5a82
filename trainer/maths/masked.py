"""Means, variances and whitening over the positions a mask marks (completion tokens, not padding).

Padded positions are read through `torch.where`, not multiplied by the mask, so NaN or inf left in
padding (e.g. log-probs of pad tokens) cannot leak into a result as `nan * 0 = nan` would.
"""
from __future__ import annotations

import torch

_EPS = 1e-8


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is true.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape as `values`; bool or 0/1 numbers.
        dim: dimension to reduce; None reduces all of them.

    Returns:
        A scalar when `dim` is None, otherwise `values` with `dim` removed.
    """
    kept = torch.where(mask.bool(), values, values.new_zeros(()))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions `mask` marks.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape as `values`; bool or 0/1 numbers.
        dim: dimension to reduce; None averages over every marked position of the batch (each
            token weighs the same, which is what the PPO losses want).

    Returns:
        A scalar when `dim` is None, otherwise `values` with `dim` removed. A row with no marked
        position gives 0 (not NaN), so an empty completion adds nothing to a loss.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over every position `mask` marks.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape as `values`.
        unbiased: divide by n − 1 (Bessel's correction) rather than n.

    Returns:
        A scalar; 0 when fewer than two positions are marked.
    """
    mean = masked_mean(values, mask)
    count = mask.bool().sum()
    denominator = (count - 1 if unbiased else count).clamp(min=1)
    return masked_sum((values - mean) ** 2, mask) / denominator


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Rescale `values` to mean 0 and (unbiased) standard deviation 1 over the positions `mask` marks.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape as `values`.
        shift_mean: False adds the mean back, so only the spread changes; reward whitening uses this
            to keep the sign of the rewards the policy is trained on.

    Returns:
        Same shape as `values`; 0 at unmarked positions.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + _EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, whitened.new_zeros(()))
