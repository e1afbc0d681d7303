"""The intervals tokenweave reports: percentile bootstraps of paired differences, over seeds.

* :func:`paired_bootstrap` (every accuracy benchmark, and learning comparisons): ``differences[seed][problem]`` is, for one seed and one held-out problem, method A's score minus method B's (for
example ``correct(cDPO) − correct(DPO)``, or a difference of NDCG@5). The statistic is the mean over problems and
seeds; the bootstrap resamples problems, with the same draw for every seed (so each problem's seeds stay paired),
and the interval is the percentiles ``(1 − level) / 2`` and ``(1 + level) / 2`` of the resampled means.
* :func:`stratified_bootstrap` (``tokenweave evidence``'s ground-truth measurements): where each seed has its own
  units (its own sampled trajectories), ``differences[seed][unit]`` of a signal's value minus its control's on the
  same unit; the statistic is the mean over every unit of every seed, and the bootstrap resamples units within each
  seed (each seed keeps its count), the same percentiles.
"""

from __future__ import annotations

import random


def paired_bootstrap(
    differences: list[list[float]], *, samples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``differences[seed][problem]`` and its percentile bootstrap interval, problems resampled with the same
    draw for every seed (module docstring). Returns ``(mean, low, high)``."""
    num_problems = len(differences[0])
    if any(len(row) != num_problems for row in differences):
        raise ValueError("Every seed needs a difference for every problem.")
    per_problem = [sum(row[problem] for row in differences) / len(differences) for problem in range(num_problems)]
    rng = random.Random(seed)
    means = sorted(
        sum(per_problem[rng.randrange(num_problems)] for _ in range(num_problems)) / num_problems
        for _ in range(samples)
    )
    tail = (1 - level) / 2
    return sum(per_problem) / num_problems, means[int(tail * samples)], means[int((1 - tail) * samples) - 1]


def stratified_bootstrap(
    differences: list[list[float]], *, samples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of every ``differences[seed][unit]`` and its percentile bootstrap interval, units resampled within each
    seed (module docstring). Returns ``(mean, low, high)``; ``ValueError`` when there is no unit at all. Vectorised
    (numpy), in chunks of resamples, so tens of thousands of units take seconds."""
    import numpy as np

    strata = [np.asarray(row, dtype=np.float64) for row in differences if len(row)]
    total = sum(len(row) for row in strata)
    if not total:
        raise ValueError("No unit to take a mean of: every seed's list of differences is empty.")
    rng = np.random.default_rng(seed)
    sums = np.zeros(samples)
    chunk = max(1, 2_000_000 // max(len(row) for row in strata))
    for row in strata:
        for begin in range(0, samples, chunk):
            count = min(chunk, samples - begin)
            sums[begin: begin + count] += row[rng.integers(0, len(row), size=(count, len(row)))].sum(axis=1)
    means = np.sort(sums / total)
    tail = (1 - level) / 2
    mean = float(sum(row.sum() for row in strata) / total)
    return mean, float(means[int(tail * samples)]), float(means[int((1 - tail) * samples) - 1])


def difference_row(first: str, second: str, first_scores: list[list[float]], second_scores: list[list[float]]) -> str:
    """The Markdown row ``| first − second | mean | [low, high] |`` of two methods' scores per seed and problem
    (``scores[seed][problem]``, e.g. 1.0 for a correct answer): :func:`paired_bootstrap` of their differences, as
    percentages (no "-0.0%")."""
    differences = [[float(a) - float(b) for a, b in zip(row_a, row_b, strict=True)]
                   for row_a, row_b in zip(first_scores, second_scores, strict=True)]
    mean, low, high = (round(value, 9) + 0.0 for value in paired_bootstrap(differences))
    return f"| {first} − {second} | {mean:+.1%} | [{low:+.1%}, {high:+.1%}] |"
