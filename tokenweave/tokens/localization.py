"""How well a token score localizes a known token: rank, hit@k and reciprocal rank, against a random ranking.

A token signal that claims to find the token where a trajectory goes wrong (cDPO's critical tokens: the *lowest*
scores ``s_t``) is measured against a ground-truth position (for the arithmetic task,
:func:`tokenweave.data.arithmetic_errors.first_error`). Among the ``n`` candidate tokens of one trajectory, ranked by
score (lowest first, ``lowest_first=True``), the target's rank is ``r ∈ {1..n}``:

* ``hit@k = [r ≤ k]``, ``reciprocal rank = 1 / r``; their means over trajectories are hit@k and MRR.
* Ties are broken uniformly at random, in expectation: with ``m`` candidates scored strictly better than the target
  and ``t`` others tied with it, ``r`` is uniform on ``{m+1, …, m+t+1}``; :func:`rank_metrics` returns the expected
  ``[r ≤ k]`` and ``1/r`` over that range (a constant score ranks every token equally: the random ranking).
* The random ranking (a random score) gives ``r`` uniform on ``{1..n}``: expected ``hit@k = min(k, n)/n`` and
  ``RR = H_n / n`` (``H_n`` the harmonic number), :func:`random_rank_metrics`, computed exactly rather than sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _expected_metrics(low: int, high: int, ks: Sequence[int]) -> dict[str, float]:
    """Expected ``hit@k`` and ``1/r`` for a rank ``r`` uniform on ``{low..high}``."""
    count = high - low + 1
    metrics = {f"hit@{k}": max(0, min(k, high) - low + 1) / count for k in ks}
    metrics["rr"] = sum(1.0 / rank for rank in range(low, high + 1)) / count
    return metrics


def rank_metrics(
    scores: Sequence[float], target: int, ks: Sequence[int] = (1, 3, 5), *, lowest_first: bool = True
) -> dict[str, float]:
    """``hit@k`` for each ``k`` and the reciprocal rank ``rr`` of candidate ``target`` among ``scores`` (module
    docstring; ties broken at random, in expectation)."""
    if not 0 <= target < len(scores):
        raise IndexError(f"target {target} is not one of the {len(scores)} candidates.")
    ranked = torch.as_tensor(scores, dtype=torch.float64) * (1.0 if lowest_first else -1.0)
    better = int((ranked < ranked[target]).sum())
    tied = int((ranked == ranked[target]).sum()) - 1
    return _expected_metrics(better + 1, better + tied + 1, ks)


def random_rank_metrics(num_candidates: int, ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """Expected ``hit@k`` and reciprocal rank of a uniformly random ranking of ``num_candidates`` tokens."""
    if num_candidates < 1:
        raise ValueError("A ranking needs at least one candidate.")
    return _expected_metrics(1, num_candidates, ks)
