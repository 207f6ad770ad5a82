"""AdamW and the warm-up + cosine learning-rate schedule shared by the stages."""
from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Share of the peak lr used for optimizer step `step` (0-based).

    Linear warm-up over `warmup` steps (step 0 already takes a non-zero step: 1/warmup), then for
    'cosine' a half cosine from 1 down to `min_ratio` at the last step; 'constant' stays at 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(total - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (decaying norm gains and biases pulls them to 0 for nothing)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """LambdaLR over optimizer steps; its state_dict (the step count) is part of the training state."""
    warmup = cfg.warmup_for(total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup, total_steps, cfg.schedule, cfg.min_lr_ratio))
