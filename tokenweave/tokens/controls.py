"""The random-signal control: a token signal's own values at random positions.

Whether a token signal matters (cDPO's critical-token weights, and every signal after it) is tested at equal weight
mass: each sequence keeps exactly its multiset of values, but they are assigned to a random permutation of its valid
(masked) positions. The loss then sees the same amount of up- and down-weighting, on tokens chosen by chance.
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


def row_generator(seed: int, row: int, side: int = 0) -> torch.Generator:
    """A generator for one dataset row (and side of a pair), seeded from ``(seed, row, side)`` only, so a row's
    shuffle does not depend on batch order, process count or resumption."""
    return torch.Generator().manual_seed(hash_seed(seed, row, side))


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python runs."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % 2**64
    return value % 2**63
