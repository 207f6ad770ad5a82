"""Generalised advantage estimation (Schulman et al. 2016) over token sequences with padding."""
from __future__ import annotations

import torch

from trainer.maths.masked import masked_whiten


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by a reverse scan over time.

    δ_t = r_t + γ · V_{t+1} − V_t,  A_t = δ_t + γλ · A_{t+1}, with V_{t+1} = A_{t+1} = 0 past a
    row's last marked token: the episode ends with the completion, so nothing is bootstrapped from
    padding.

    Args:
        rewards: (B, T) per-token rewards (`per_token_rewards`).
        values: (B, T) value estimates V(s_t) from the rollout.
        mask: (B, T), true on completion tokens; padding may sit on either side.
        gamma: discount γ (InstructGPT: 1).
        lam: GAE λ (InstructGPT: 0.95); λ = 1 gives reward-to-go − V.

    Returns:
        advantages (B, T) and returns = advantages + values (B, T), the value targets; both 0 at
        unmarked positions and detached (they are targets, never differentiated through).
    """
    mask = mask.bool()
    zero = values.new_zeros(())
    rewards = torch.where(mask, rewards.detach(), zero)
    values = torch.where(mask, values.detach(), zero)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(mask[:, t], advantage, zero)
        # padded steps hold V = A = 0, so the scan restarts from 0 after a row's last token
        next_value = values[:, t]
        next_advantage = advantages[:, t]
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages rescaled to mean 0, std 1 over the batch's completion tokens, so the policy
    step size does not depend on the reward scale.

    Args:
        advantages: (B, T) from `gae`.
        mask: (B, T), true on completion tokens.

    Returns:
        (B, T); 0 at unmarked positions.
    """
    return masked_whiten(advantages, mask, shift_mean=True)
