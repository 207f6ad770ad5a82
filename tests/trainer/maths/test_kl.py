import pytest
import torch
from torch.testing import assert_close

from trainer.maths import (AdaptiveKLController, FixedKLController, kl_k1, kl_k3, kl_penalty, last_token_index,
                           per_token_rewards)


def test_kl_estimators_by_hand():
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5])
    # k1 = logp − logp_ref = 0.5, −0.5
    assert_close(kl_k1(logprobs, ref), torch.tensor([0.5, -0.5]))
    # log r = ref − logp = −0.5, 0.5; r = 0.606531, 1.648721; k3 = r − 1 − log r = 0.106531, 0.148721
    assert_close(kl_k3(logprobs, ref), torch.tensor([0.106531, 0.148721]))
    assert_close(kl_penalty(logprobs, ref, "k3"), kl_k3(logprobs, ref))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, ref, "k2")


def test_per_token_rewards_by_hand():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.5, -0.5, 9.0], [1.0, 0.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # β = 0.1: −β·kl = [−0.05, 0.05, ·], [−0.1, 0, −0.2]; score at the last real token: 0.05 + 2, −0.2 − 1
    expected = torch.tensor([[-0.05, 2.05, 0.0], [-0.1, 0.0, -1.2]])
    assert_close(per_token_rewards(scores, kl, mask, beta=0.1), expected)
    # clipping at 1.5: row 0 gets 1.5 → 1.55; row 1's −1 is inside
    clipped = per_token_rewards(scores, kl, mask, beta=0.1, score_clip=1.5)
    assert_close(clipped, torch.tensor([[-0.05, 1.55, 0.0], [-0.1, 0.0, -1.2]]))


def test_final_token_with_left_padding_and_whitening():
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 0]
    rewards = per_token_rewards(torch.tensor([1.0, 5.0]), torch.zeros(2, 3), mask, beta=0.1)
    # row 0: score 1 at position 2; row 1 has no completion tokens, so its score goes nowhere
    assert_close(rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    whitened = per_token_rewards(torch.tensor([1.0, 5.0]), torch.zeros(2, 3), mask, beta=0.1, whiten=True)
    # marked values 0, 1: mean ½, unbiased std √½ = 0.707107 → (x − ½)/0.707107 + ½ = −0.207107, 1.207107
    assert_close(whitened, torch.tensor([[0.0, -0.207107, 1.207107], [0.0, 0.0, 0.0]]))


def test_kl_controllers():
    fixed = FixedKLController(0.02)
    assert fixed.update(100.0, 256) == 0.02
    adaptive = AdaptiveKLController(value=0.2, target=6.0, horizon=10_000)
    # error = clip(9/6 − 1 = 0.5, ±0.2) = 0.2; β · (1 + 0.2 · 256/10000) = 0.2 · 1.00512 = 0.201024
    assert abs(adaptive.update(9.0, 256) - 0.201024) < 1e-9
    # KL 3 below target 6: error = clip(−0.5) = −0.2; 0.201024 · (1 − 0.00512) = 0.199995
    assert abs(adaptive.update(3.0, 256) - 0.199995) < 1e-6
