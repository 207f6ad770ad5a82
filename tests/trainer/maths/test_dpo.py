import math

import pytest
import torch
from torch.testing import assert_close

from trainer.maths import dpo_loss


def test_dpo_sigmoid_by_hand():
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = (−1 + 2) − (−3 + 2) = 2; β = 0.5 → βh = 1; loss = −log σ(1) = ln(1 + e⁻¹) = 0.313262
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    assert_close(out.loss, torch.tensor(0.313262))
    # rewards: 0.5·(−1 + 2) = 0.5, 0.5·(−3 + 2) = −0.5; margin 1; accuracy 1
    assert_close(out.chosen_rewards, torch.tensor([0.5]))
    assert_close(out.rejected_rewards, torch.tensor([-0.5]))
    assert_close(out.margin, torch.tensor(1.0))
    assert_close(out.accuracy, torch.tensor(1.0))
    out.loss.backward()
    # d/d(policy_chosen) = −β·σ(−βh) = −0.5 · 0.268941 = −0.134471; the rejected side the opposite
    assert_close(policy_chosen.grad, torch.tensor([-0.134471]))
    assert_close(policy_rejected.grad, torch.tensor([0.134471]))


def test_label_smoothing_by_hand():
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    # s = 0.1: 0.9·ln(1 + e⁻¹) + 0.1·ln(1 + e) = 0.9·0.313262 + 0.1·1.313262 = 0.413262
    assert_close(dpo_loss(*args, beta=0.5, label_smoothing=0.1).loss, torch.tensor(0.413262))


def test_equal_logprobs_give_log_2():
    same = torch.tensor([-4.0, -7.0])
    out = dpo_loss(same, same, same, same, beta=0.1)
    assert_close(out.loss, torch.tensor(math.log(2.0)))  # −log σ(0) = ln 2 = 0.693147
    assert_close(out.accuracy, torch.tensor(0.0))  # a tie is not a win


def test_ipo_by_hand():
    same = torch.tensor([-4.0])
    # zero margin: (0 − 1/(2·0.1))² = 5² = 25
    assert_close(dpo_loss(same, same, same, same, beta=0.1, loss_type="ipo").loss, torch.tensor(25.0))
    # h = 2 (above), β = 0.5: (2 − 1)² = 1
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    assert_close(dpo_loss(*args, beta=0.5, loss_type="ipo").loss, torch.tensor(1.0))


def test_unknown_names_are_rejected():
    same = torch.tensor([-4.0])
    with pytest.raises(ValueError, match="loss type"):
        dpo_loss(same, same, same, same, loss_type="hinge")
