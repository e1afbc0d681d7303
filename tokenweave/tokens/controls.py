"""The random-signal controls: a token signal's own values at random positions, or a selection turned around.

Whether a token signal matters (cDPO's critical-token weights, and every signal after it) is tested at equal weight
mass: each sequence keeps exactly its multiset of values, but they are assigned to a random permutation of its valid
(masked) positions (:func:`shuffle_within_mask`). The loss then sees the same amount of up- and down-weighting, on
tokens chosen by chance. A selection (the top of a ranking) is also tested against its inverse: the same number of
tokens of each sequence, from the bottom of the same ranking (:func:`inverse_selection`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def shuffle_within_mask(values: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each row of ``values`` (``[B, T]``) with its entries at the positions where ``mask`` is set permuted at
    random (``generator``); entries outside ``mask`` are left where they are. Returns a new tensor."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape.")
    shuffled = values.clone()
    for row in range(values.shape[0]):
        positions = mask[row].bool().nonzero().squeeze(-1)
        order = torch.randperm(len(positions), generator=generator, device="cpu").to(positions.device)
        shuffled[row, positions] = values[row, positions[order]]
    return shuffled


def inverse_selection(weights: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """A selection's inverse control, row by row: the ``k`` tokens of ``mask`` with the *lowest* ``scores`` get the
    weights of the ``k`` selected tokens (those with a non-zero weight), the highest-ranked selected token's weight
    on the lowest-ranked token and so on; every other token 0. ``k`` and the weights are each row's own (equal ranks:
    the earlier position first)."""
    inverse = torch.zeros_like(weights)
    for row in range(weights.shape[0]):
        valid = mask[row].bool()
        positions = valid.nonzero().squeeze(-1)
        selected = positions[weights[row, positions] != 0]
        ranked = selected[torch.sort(scores[row, selected], descending=True, stable=True).indices]
        bottom = positions[torch.sort(scores[row, positions], stable=True).indices[: len(selected)]]
        inverse[row, bottom] = weights[row, ranked]
    return inverse


def row_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for one row, seeded from ``seed`` and the row's identity ``keys`` only (a dataset row and the side
    of a pair; a generation step and a completion), so a row's control does not depend on batch order, process count
    or resumption."""
    return torch.Generator().manual_seed(hash_seed(seed, *keys))


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python runs."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % 2**64
    return value % 2**63
