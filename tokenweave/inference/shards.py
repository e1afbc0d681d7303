"""Batched inference split over the processes of ``accelerate launch``, with the results of one process.

Sampling and scoring cut their work into batches by the data alone (sorted by length, ``batch_size`` at a time),
never by the number of processes. Process ``i`` of ``N`` computes the batches ``i, i + N, i + 2N, ...``, each seeded
by :func:`batch_seed` (its own seed, whichever process computes it and whatever came before), and the results are
gathered once, at the end (accelerate's ``gather_object``). So every batch is computed as one process computes it,
and the gathered dataset is the same whatever ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Shard:
    """This process's share of the batches: process ``index`` of ``count`` (one process: all of them), on
    ``device`` (None: the first GPU if there is one, else the CPU)."""

    index: int = 0
    count: int = 1
    device: str | None = None

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"Process index {self.index} is not in [0, {self.count}).")

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def batches(self, num_batches: int) -> range:
        """The indices of the batches this process computes, of ``num_batches`` in all."""
        return range(self.index, num_batches, self.count)

    def gather(self, results: list) -> list:
        """Every process's ``results`` (lists), concatenated in process order, on every process."""
        if self.count == 1:
            return results
        from accelerate.utils import gather_object

        return gather_object(results)


def this_process_shard() -> Shard:
    """The shard of this process of ``accelerate launch`` (its rank, the number of processes and its device).

    Without a GPU, accelerate's state is asked for the CPU: it only then reads the launcher's world size (on a CPU
    machine a plain ``PartialState()`` is one process, and every launched process would do all the work)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes, str(state.device))


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index`` of a run seeded ``seed``: numpy's ``SeedSequence([seed, batch_index])``, so
    that batches of different seeds draw unrelated numbers (``seed + batch_index`` would repeat batch 1 of seed 0 as
    batch 0 of seed 1)."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])
