import torch
from torch.testing import assert_close

from trainer.maths import gae, whiten_advantages


def test_gae_by_hand_with_padding():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    # γ = 1, λ = 0.5; nothing after the last real token (t = 2)
    # t=2: δ = 2 − 1.5 = 0.5, A = 0.5
    # t=1: δ = 0 + 1.5 − 1.0 = 0.5, A = 0.5 + 0.5·0.5 = 0.75
    # t=0: δ = 1 + 1.0 − 0.5 = 1.5, A = 1.5 + 0.5·0.75 = 1.875
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert_close(advantages, torch.tensor([[1.875, 0.75, 0.5, 0.0]]))
    # returns = A + V = 2.375, 1.75, 2.0
    assert_close(returns, torch.tensor([[2.375, 1.75, 2.0, 0.0]]))
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_with_discount_by_hand():
    # γ = 0.5, λ = 1, T = 2, V = 0: A_1 = r_1 = 2, A_0 = r_0 + γ·r_1 = 1 + 0.5·2 = 2
    advantages, _ = gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert_close(advantages, torch.tensor([[2.0, 2.0]]))


def test_lambda_1_gamma_1_is_reward_to_go_minus_values():
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, 5, generator=generator), torch.randn(2, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]).bool()  # row 1 padded on both sides
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    reward_to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)
    assert_close(advantages, (reward_to_go - values) * mask)
    assert_close(returns, reward_to_go * mask)


def test_whiten_advantages_over_the_mask():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    # marked 1, 2, 3: mean 2, std 1 → −1, 0, 1
    whitened = whiten_advantages(torch.tensor([[1.0, 2.0, 50.0], [3.0, -50.0, 0.0]]), mask)
    assert_close(whitened, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
