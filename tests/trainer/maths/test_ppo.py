import math

import torch
from torch.testing import assert_close

from trainer.maths import entropy, policy_loss, ptx_loss, value_loss


def test_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    # ratios ρ = 0.5, 1.0, 1.5 and a padded token
    logprobs = torch.tensor([[math.log(0.5), 0.0, math.log(1.5), 7.0]], requires_grad=True)
    advantages = torch.tensor([[-1.0, 1.0, 1.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    # ε = 0.2, loss_t = max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
    # t0: max(0.5, 0.8) = 0.8 (clipped); t1: max(−1, −1) = −1; t2: max(−1.5, −1.2) = −1.2 (clipped)
    # mean = (0.8 − 1 − 1.2)/3 = −0.466667; clip fraction 2/3
    # approx KL = mean of (ρ − 1) − ln ρ: (−0.5 + 0.693147) + 0 + (0.5 − 0.405465) = 0.287682, /3 = 0.095894
    out = policy_loss(logprobs, old, advantages, mask, epsilon=0.2)
    assert_close(out.loss, torch.tensor(-0.466667))
    assert_close(out.clip_fraction, torch.tensor(2 / 3))
    assert_close(out.approx_kl, torch.tensor(0.095894))
    out.loss.backward()
    # clipped tokens give no gradient; t1: d(−A·e^{logp−old})/dlogp / 3 = −1/3
    assert_close(logprobs.grad, torch.tensor([[0.0, -1 / 3, 0.0, 0.0]]))
    assert advantages.grad is None  # rollout-time values are detached


def test_value_loss_by_hand_and_gradient_only_to_values():
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    old_values = torch.tensor([1.5, 1.5], requires_grad=True)
    returns = torch.tensor([0.0, 1.0], requires_grad=True)
    mask = torch.tensor([1, 1])
    # c = 0.2. t0: (1 − 0)² = 1; V_clip = 1.5 − 0.2 = 1.3 → 1.69; max 1.69 (clipped)
    # t1: (2 − 1)² = 1; V_clip = 1.7 → 0.49; max 1 (unclipped). loss = ½ · (1.69 + 1)/2 = 0.6725
    out = value_loss(values, old_values, returns, mask, clip_range=0.2)
    assert_close(out.loss, torch.tensor(0.6725))
    assert_close(out.clip_fraction, torch.tensor(0.5))
    out.loss.backward()
    # t0 clipped → 0; t1: ½ · 2(V − R) / 2 = 0.5
    assert_close(values.grad, torch.tensor([0.0, 0.5]))
    assert old_values.grad is None and returns.grad is None


def test_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [100.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # H(½, ½) = ln 2 = 0.693147; H(¼, ¾) = ¼·1.386294 + ¾·0.287682 = 0.562335; mean 0.627741
    assert_close(entropy(logits, mask), torch.tensor(0.627741))
    assert_close(entropy(logits.bfloat16(), mask), torch.tensor(0.627741), atol=1e-3, rtol=0)


def test_ptx_loss_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [9.0, 0.0]]], requires_grad=True)
    input_ids = torch.tensor([[0, 1, 1]])
    # targets: id 1 at pos 1 (p = ¾ → 0.287682), id 1 at pos 2 (p = ½ → 0.693147)
    # all marked: nll = (0.287682 + 0.693147)/2 = 0.490415; γ_ptx = 0.5 → 0.245207
    out = ptx_loss(logits, input_ids, torch.tensor([[1, 1, 1]]), coef=0.5)
    assert_close(out.nll, torch.tensor(0.490415))
    assert_close(out.loss, torch.tensor(0.245207))
    # the last token is padding: nll = 0.287682
    assert_close(ptx_loss(logits, input_ids, torch.tensor([[1, 1, 0]]), coef=1.0).nll, torch.tensor(0.287682))
    out.loss.backward()
    assert logits.grad is not None and logits.grad[0, 2].abs().sum() == 0  # the last logits predict nothing
