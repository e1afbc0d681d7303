"""Selecting the top fraction of a sequence's or a batch's tokens by a score, online: Rho-1's and ssToken's selections
(their signals choose the score and the scope; TokenCleaning's offline labels follow its released code's own rule,
``tokenweave.pipelines.token_scores``).

Two rules, each deterministic:

* **per sequence** (:func:`select_per_row`): the ``⌈f·n⌉`` highest-scored of each row's ``n`` tokens (ssToken's
  ``ceil(ρ·resp_len)``), equal scores taken in position order, so exactly that many;
* **over a set of tokens** (a micro-batch, or a whole optimizer step on every process: :func:`fraction_threshold` on
  the pooled scores, then :func:`select_at_least`): every token whose score reaches the ``⌈f·N⌉``-th highest. Equal
  scores at the threshold are all kept (more than ``⌈f·N⌉`` then), so the set selected does not depend on how the
  tokens are ordered or split into micro-batches and processes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def top_count(fraction: float, count: int) -> int:
    """``⌈fraction · count⌉`` (a fraction in (0, 1]), with a float tolerance: 0.6 · 10 keeps 6, not 7."""
    return min(count, math.ceil(fraction * count - 1e-9))


def select_per_row(scores: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """``[R, T]`` bool: in each row, the ``⌈f·n⌉`` highest ``scores`` among its ``n`` tokens of ``mask`` (equal scores
    in position order)."""
    selected = torch.zeros_like(mask, dtype=torch.bool)
    valid = mask.bool()
    for row in range(scores.size(0)):
        positions = valid[row].nonzero().squeeze(-1)
        order = torch.sort(scores[row, positions], descending=True, stable=True).indices
        selected[row, positions[order[: top_count(fraction, len(positions))]]] = True
    return selected


def fraction_threshold(scores: Tensor, fraction: float) -> Tensor:
    """The ``⌈f·N⌉``-th highest of the ``N`` values of ``scores`` (1-D; −inf when there are none)."""
    if scores.numel() == 0:
        return scores.new_tensor(-math.inf)
    return torch.sort(scores, descending=True).values[top_count(fraction, scores.numel()) - 1]


def select_at_least(scores: Tensor, mask: Tensor, threshold: Tensor) -> Tensor:
    """``[R, T]`` bool: the tokens of ``mask`` whose score reaches ``threshold``."""
    return mask.bool() & (scores >= threshold)


def select_over_tokens(scores: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """``[R, T]`` bool: the top ``fraction`` of all the tokens of ``mask`` together (module docstring)."""
    return select_at_least(scores, mask, fraction_threshold(scores[mask.bool()], fraction))
