"""The intervals tokenweave reports (tokenweave/stats.py): the paired bootstrap over problems shared by the seeds,
and the bootstrap stratified by seed of the evidence measurements."""

import pytest

from tokenweave import stats as intervals


def test_a_constant_difference_has_a_zero_width_interval():
    assert intervals.paired_bootstrap([[1.0] * 50, [1.0] * 50], samples=200) == (1.0, 1.0, 1.0)


def test_the_mean_is_over_problems_and_seeds_and_the_interval_covers_it():
    seed_a = [1.0, 0.0, -1.0, 1.0] * 25  # mean 0.25
    seed_b = [0.0, 0.0, 1.0, 0.0] * 25  # mean 0.25
    mean, low, high = intervals.paired_bootstrap([seed_a, seed_b], samples=2000)
    assert mean == pytest.approx(0.25) and low < mean < high
    # per-problem means are 0.5, 0, 0, 0.5: standard error sqrt(0.0625 / 100) = 0.025, so the 95% interval is
    # about ±1.96 · 0.025
    assert high - low == pytest.approx(2 * 1.96 * 0.025, rel=0.15)


def test_problems_are_resampled_together_across_seeds():
    """Two seeds whose differences cancel problem by problem: every resample has mean 0 (a draw per seed would not)."""
    seed_a = [1.0, -1.0, 0.5, 0.0] * 10
    seed_b = [-1.0, 1.0, -0.5, 0.0] * 10
    assert intervals.paired_bootstrap([seed_a, seed_b], samples=500) == (0.0, 0.0, 0.0)


def test_seeds_must_cover_the_same_problems():
    with pytest.raises(ValueError, match="every problem"):
        intervals.paired_bootstrap([[1.0, 0.0], [1.0]])


def test_difference_row_formats_the_paired_mean_and_its_interval():
    """Per-problem means over seeds [0.5, 0, 0.5, 0]: +25 %; equal scores: zero, never "-0.0%"."""
    row = intervals.difference_row("a", "b", [[1, 0, 1, 1], [0, 1, 1, 0]], [[0, 0, 1, 1], [0, 1, 0, 0]])
    mean, low, high = intervals.paired_bootstrap([[1, 0, 0, 0], [0, 0, 1, 0]])
    assert row == f"| a − b | +25.0% | [{low:+.1%}, {high:+.1%}] |" and mean == 0.25 and low <= 0.25 <= high
    assert intervals.difference_row("a", "b", [[1, 0]], [[1, 0]]) == "| a − b | +0.0% | [+0.0%, +0.0%] |"


def test_stratified_bootstrap_pools_units_and_resamples_within_each_seed():
    """Seed 0 has 30 units of +1, seed 1 has 10 of 0: the pooled mean is 0.75, and since each seed keeps its count in
    every resample, the interval has zero width (a pooled resample would move it)."""
    assert intervals.stratified_bootstrap([[1.0] * 30, [0.0] * 10], samples=300) == (0.75, 0.75, 0.75)


def test_stratified_bootstrap_interval_has_the_width_of_the_standard_error():
    row = [1.0, 0.0] * 100  # mean 0.5, standard error 0.5 / sqrt(200) per seed's units, pooled over 2 seeds
    mean, low, high = intervals.stratified_bootstrap([row, row], samples=4000)
    assert mean == 0.5 and low < 0.5 < high
    assert high - low == pytest.approx(2 * 1.96 * 0.5 / 400**0.5, rel=0.15)


def test_stratified_bootstrap_skips_empty_seeds_and_refuses_no_units():
    assert intervals.stratified_bootstrap([[], [0.5, 0.5]], samples=50) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="No unit"):
        intervals.stratified_bootstrap([[], []])
