"""The shared quantile (tokenweave/tokens/quantile.py): torch.quantile's values, bit for bit, without its limit of
2^24 elements, which the entropies of a generation batch gathered over processes pass."""

import numpy as np
import pytest
import torch

from tokenweave.tokens.quantile import quantile

ENTROPY_METRIC_QUANTILES = [0.2, 0.5, 0.8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_to_torch_quantile_bit_for_bit_below_its_limit(dtype):
    generator = torch.Generator().manual_seed(0)
    for size in [1, 2, 3, 7, 10, 11, 100, 1001, 4096]:
        values = (torch.randn(size, generator=generator) * 3).to(dtype)
        levels = ENTROPY_METRIC_QUANTILES + [0.0, 1.0, 0.37, 0.999] + torch.rand(4, generator=generator).tolist()
        expected = torch.quantile(values, torch.tensor(levels, dtype=dtype))
        assert torch.equal(quantile(values, levels), expected), size
        assert torch.equal(quantile(values, 0.8), torch.quantile(values, 0.8)), size  # a float q: a 0-dim tensor


def test_a_matrix_is_flattened_and_a_nan_makes_every_quantile_nan_as_in_torch():
    values = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(quantile(values, [0.25, 0.5]), torch.quantile(values, torch.tensor([0.25, 0.5])))
    values[1, 2] = float("nan")
    assert quantile(values, [0.0, 0.5]).isnan().all() and torch.quantile(values, 0.5).isnan()


def test_above_torch_quantiles_limit_of_2_pow_24_elements():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2**24 + 1, generator=generator)
    with pytest.raises(RuntimeError, match="too large"):  # the limit this function exists for
        torch.quantile(values, 0.5)
    expected = np.quantile(values.double().numpy(), ENTROPY_METRIC_QUANTILES)
    torch.testing.assert_close(quantile(values, ENTROPY_METRIC_QUANTILES).double(), torch.from_numpy(expected),
                               rtol=1e-6, atol=1e-7)


def test_ranks_past_the_integers_of_the_dtype_are_taken_in_float64():
    # float16 holds the integers up to 2048 only: 0.37·4999 = 1849.63 would round to 1850, another order statistic
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0)).half()
    expected = np.quantile(values.double().numpy(), [0.1, 0.37, 0.9])
    torch.testing.assert_close(quantile(values, [0.1, 0.37, 0.9]).double(), torch.from_numpy(expected),
                               rtol=2e-3, atol=0.0)  # float16's own rounding of the interpolated value


@pytest.mark.parametrize("values, level, message", [
    (torch.tensor([]), 0.5, "empty tensor"),
    (torch.tensor([1.0, 2.0]), 1.5, r"q must be in \[0, 1\], got 1.5"),
    (torch.tensor([1.0, 2.0]), [0.5, -0.1], r"q must be in \[0, 1\]"),
])
def test_refuses_no_values_and_a_level_outside_0_1(values, level, message):
    with pytest.raises(ValueError, match=message):
        quantile(values, level)
