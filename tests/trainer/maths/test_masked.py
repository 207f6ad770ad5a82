import torch
from torch.testing import assert_close

from trainer.maths import masked_mean, masked_sum, masked_var, masked_whiten


def test_masked_mean_and_var_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    # mean over the first three = 6/3 = 2; unbiased var = ((1−2)² + 0 + (3−2)²)/(3−1) = 1
    assert_close(masked_mean(values, mask), torch.tensor(2.0))
    assert_close(masked_var(values, mask), torch.tensor(1.0))
    # biased: 2/3 = 0.6667
    assert_close(masked_var(values, mask, unbiased=False), torch.tensor(0.6667), atol=1e-4, rtol=0)


def test_masked_mean_per_row_ignores_nan_padding_and_empty_rows():
    values = torch.tensor([[1.0, 3.0], [5.0, float("nan")], [float("inf"), 7.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    # rows: (1+3)/2 = 2; 5/1 = 5; nothing marked → 0 (not NaN)
    assert_close(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 5.0, 0.0]))
    assert_close(masked_sum(values, mask), torch.tensor(9.0))


def test_masked_whiten_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    # mean 2, std 1 (above): (x − 2)/1 = −1, 0, 1; padding → 0
    assert_close(masked_whiten(values, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    # shift_mean=False adds the mean back: 1, 2, 3
    assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]))


def test_whitening_gives_mean_0_std_1_over_the_mask():
    values = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 5 + 3
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    whitened = masked_whiten(values, mask)
    assert_close(whitened[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(whitened[mask].std(), torch.tensor(1.0))
    assert (whitened[~mask] == 0).all()
