import pytest
import torch
from torch.testing import assert_close

from trainer.maths import pad_groups, pairwise_accuracy, pairwise_loss, ranking_loss


def test_ranking_loss_by_hand_with_different_k():
    # prompt A: K = 3 best first, rewards 3, 2, 0; prompt B: K = 2, the worse answer scored higher
    rewards, mask = pad_groups(torch.tensor([3.0, 2.0, 0.0, 0.0, 1.0]), [3, 2])
    assert_close(rewards, torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 0.0]]))
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    # −log σ(x) = ln(1 + e⁻ˣ). A: margins 1, 3, 2 → 0.313262, 0.048587, 0.126928; sum 0.488777, /3 = 0.162926
    # B: margin −1 → ln(1 + e) = 1.313262.  Each prompt weighs ½: (0.162926 + 1.313262)/2 = 0.738094
    assert_close(ranking_loss(rewards, mask), torch.tensor(0.738094))
    # accuracy over pairs: A 3 of 3, B 0 of 1 → 3/4
    assert_close(pairwise_accuracy(rewards, mask), torch.tensor(0.75, dtype=torch.float64))


def test_accuracy_is_exact_for_gate_thresholds():
    # 9 of 20 pairs right: exactly 0.45, which a gate "accuracy >= chance - 0.05" must accept
    rewards = torch.tensor([[1.0, 0.0]] * 9 + [[0.0, 1.0]] * 11)
    accuracy = pairwise_accuracy(rewards, torch.ones(20, 2, dtype=torch.bool)).item()
    assert accuracy == 9 / 20 and accuracy >= 0.5 - 0.05


def test_explicit_ranks_and_ties():
    rewards = torch.tensor([[0.0, 1.0, 1.0]])
    # completion 0 ranked best, 1 and 2 tied → pairs (0,1), (0,2), margins −1, −1
    ranks = torch.tensor([[0, 1, 1]])
    # each ln(1 + e) = 1.313262, mean 1.313262
    assert_close(ranking_loss(rewards, torch.ones(1, 3, dtype=torch.bool), ranks), torch.tensor(1.313262))


def test_k2_equals_pairwise_loss():
    chosen, rejected = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 1.0, 2.5])
    rewards = torch.stack([chosen, rejected], dim=1)
    assert_close(ranking_loss(rewards, torch.ones(3, 2, dtype=torch.bool)), pairwise_loss(chosen, rejected))
    # pairwise by hand at margin 0.5: ln(1 + e^−0.5) = 0.474077
    assert_close(pairwise_loss(torch.tensor([0.5]), torch.tensor([0.0])), torch.tensor(0.474077))


def test_a_prompt_with_more_completions_does_not_weigh_more():
    big = torch.tensor([[4.0, 1.0, 3.0, -2.0]])  # K = 4: 6 pairs
    small = torch.tensor([[0.0, 2.0]])  # K = 2: 1 pair
    full = torch.ones(1, 4, dtype=torch.bool)
    rewards, mask = pad_groups(torch.cat([big[0], small[0]]), [4, 2])
    expected = (ranking_loss(big, full) + ranking_loss(small, torch.ones(1, 2, dtype=torch.bool))) / 2
    assert_close(ranking_loss(rewards, mask), expected)


def test_padding_and_gradients():
    scores = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    rewards, mask = pad_groups(scores, [2, 1])  # the second prompt has no pair: left out of the mean
    loss = ranking_loss(rewards, mask)
    # = ln(1 + e⁻¹) = 0.313262; d/dr_better = −σ(−1) = −0.268941, d/dr_worse = +0.268941
    assert_close(loss, torch.tensor(0.313262))
    loss.backward()
    assert_close(scores.grad, torch.tensor([-0.268941, 0.268941, 0.0]))


def test_group_sizes_must_cover_the_scores():
    with pytest.raises(ValueError, match="sum to 4"):
        pad_groups(torch.zeros(5), [2, 2])
