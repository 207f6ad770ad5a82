import math

import pytest
import torch
from torch.testing import assert_close

from trainer.maths import next_token_logprobs, sequence_logprobs, token_logprobs


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, math.log(3.0), 0.0]]])  # (1, 2, 3)
    ids = torch.tensor([[1, 1]])
    # row 0: logsumexp(1,2,3) = 3 + ln(1 + e⁻¹ + e⁻²) = 3 + ln 1.503215 = 3.407606; 2 − 3.407606 = −1.407606
    # row 1: probs 1/5, 3/5, 1/5 → ln 0.6 = −0.510826
    assert_close(token_logprobs(logits, ids), torch.tensor([[-1.407606, -0.510826]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_equals_gather_log_softmax(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 11, generator=generator) * 4).to(dtype)
    ids = torch.randint(0, 11, (2, 5), generator=generator)
    reference = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    result = token_logprobs(logits, ids)
    assert result.dtype == torch.float32  # bf16 inputs are computed in fp32
    assert_close(result, reference, atol=1e-6, rtol=0)


def test_next_token_logprobs_shift_and_completion_sum():
    # logits at position t predict input_ids[t + 1]; V = 2
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])  # (1, 3, 2)
    input_ids = torch.tensor([[0, 1, 0]])
    # p(1 | pos 0) = 3/4 → −0.287682; p(0 | pos 1) = 1/2 → −0.693147
    per_token = next_token_logprobs(logits, input_ids)
    assert_close(per_token, torch.tensor([[-0.287682, -0.693147]]))
    # a completion of the last token only (the first predicted token is prompt)
    assert_close(sequence_logprobs(per_token, torch.tensor([[0, 1]])), torch.tensor([-0.693147]))
    # both tokens: −0.287682 − 0.693147 = −0.980829
    assert_close(sequence_logprobs(per_token, torch.tensor([[1, 1]])), torch.tensor([-0.980829]))


def test_gradient_reaches_logits():
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    token_logprobs(logits, torch.tensor([[0]])).sum().backward()
    # d/dl (l₀ − logsumexp l) = onehot − softmax = (1 − ½, −½)
    assert_close(logits.grad, torch.tensor([[[0.5, -0.5]]]))
