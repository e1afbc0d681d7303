"""The interval every accuracy benchmark reports: a paired percentile bootstrap over test problems.

``differences[seed][problem]`` is, for one seed and one held-out problem, method A's score minus method B's (for
example ``correct(cDPO) − correct(DPO)``, or a difference of NDCG@5). The statistic is the mean over problems and
seeds; the bootstrap resamples problems, with the same draw for every seed (so each problem's seeds stay paired),
and the interval is the percentiles ``(1 − level) / 2`` and ``(1 + level) / 2`` of the resampled means.
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


def difference_row(first: str, second: str, first_scores: list[list[float]], second_scores: list[list[float]]) -> str:
    """The Markdown row ``| first − second | mean | [low, high] |`` of two methods' scores per seed and problem
    (``scores[seed][problem]``, e.g. 1.0 for a correct answer): :func:`paired_bootstrap` of their differences, as
    percentages (no "-0.0%")."""
    differences = [[float(a) - float(b) for a, b in zip(row_a, row_b, strict=True)]
                   for row_a, row_b in zip(first_scores, second_scores, strict=True)]
    mean, low, high = (round(value, 9) + 0.0 for value in paired_bootstrap(differences))
    return f"| {first} − {second} | {mean:+.1%} | [{low:+.1%}, {high:+.1%}] |"
