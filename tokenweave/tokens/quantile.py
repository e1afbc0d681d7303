"""The quantile of tokenweave's tensors (the GRPO trainer's entropy metrics and its top-entropy mask; the pipelines'
summaries use numpy's, which has no limit): ``torch.quantile``'s values without its limit of 2^24 elements, which a
step's completion tokens gathered over many processes pass (64 processes x 16 sequences x 16k tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def quantile(values: torch.Tensor, q: float | Sequence[float]) -> torch.Tensor:
    """The ``q``-quantiles of all of ``values`` (flattened, any floating dtype): ``torch.quantile(values, q)`` with
    its default linear interpolation, equal to it bit for bit where it runs, and for any number of elements.

    ``torch.quantile`` refuses more than 2^24 elements; this sorts them itself and interpolates between the order
    statistics at ``rank = q·(n − 1)`` as it does (in the values' dtype, or in float64 once ``n − 1`` is past the
    integers that dtype holds exactly, 2^24 for float32, where the ranks would be rounded to other order
    statistics). A NaN among the values makes every quantile NaN, as in ``torch.quantile``. Returns a 0-dim tensor
    for a float ``q``, ``[len(q)]`` for a sequence.
    """
    flat = values.flatten()
    if flat.numel() == 0:
        raise ValueError("quantile of an empty tensor: give at least one value")
    last = flat.numel() - 1
    exact_dtype = last <= 2 / torch.finfo(flat.dtype).eps  # the dtype holds every integer up to n − 1
    ranks = torch.as_tensor(q, dtype=flat.dtype if exact_dtype else torch.float64, device=flat.device) * last
    if not ((ranks >= 0) & (ranks <= last)).all():
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    ordered = flat.sort().values  # NaN sorts last
    ranks = torch.where(ordered[-1].isnan(), float(last), ranks)
    below = ranks.long()
    weights = (ranks - below).to(flat.dtype)
    return ordered[below].lerp(ordered[ranks.ceil().long()], weights)
