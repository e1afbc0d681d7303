"""One collator for the token signals' per-token columns, around TRL's SFT and DPO collators.

:class:`TokenColumnsCollator` calls TRL's collator, then adds each declared column as a float tensor shaped like
``input_ids``, built the way TRL builds the ids of each trainer (a row's values at the tokens they belong to, 0
elsewhere):

- SFT (``DataCollatorForLanguageModeling``): an example's values (one per labelled token) at its labelled positions
  (:func:`~tokenweave.data.token_columns.labelled_positions`), right-padded like ``labels``; with ``padding_free``,
  the rows concatenated as TRL concatenates the ids.
- DPO (``DataCollatorForPreference``): ``[0]·len(prompt_ids) + values`` for each chosen row, then each rejected row,
  truncated by the same ``max_length`` / ``truncation_mode`` as the ids, right-padded with 0.

and, with the random control on, ``signal_row`` (``[B]``): each example's row of the dataset (its identity for the
control's seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad

from ..data.token_columns import labelled_positions

ROW_KEY = "signal_row"
"""The dataset column and batch key of each example's dataset row (the random control's identity of a row)."""


@dataclass
class TokenColumnsCollator:
    """TRL's collator ``base`` plus the per-token ``columns`` (batch key → dataset column names, one per completion)
    of the signals (module docstring); ``kind`` is "sft" or "dpo"."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    columns: dict[str, tuple[str, ...]]
    kind: str
    row_index: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = self.base(examples)
        shape = output["input_ids"].shape
        for key, names in self.columns.items():
            rows = self._dpo_rows(examples, names) if self.kind == "dpo" else self._sft_rows(examples, names[0])
            output[key] = self._padded(rows, shape)
        if self.row_index:
            output[ROW_KEY] = torch.tensor([example[ROW_KEY] for example in examples])
        return output

    def _sft_rows(self, examples, name: str) -> list[list[float]]:
        rows = [labelled_positions(example[name], example["labels"]) for example in examples]
        return [sum(rows, [])] if getattr(self.base, "padding_free", False) else rows

    def _dpo_rows(self, examples, names: tuple[str, str]) -> list[list[float]]:
        rows = [[0.0] * len(example["prompt_ids"]) + list(example[name]) for name in names for example in examples]
        max_length = getattr(self.base, "max_length", None)
        if max_length is not None:  # TRL's collator truncates ids and masks with the same slice
            keep_start = getattr(self.base, "truncation_mode", "keep_start") == "keep_start"
            rows = [row[:max_length] if keep_start else row[-max_length:] for row in rows]
        return rows

    def _padded(self, rows: list[list[float]], shape: torch.Size) -> torch.Tensor:
        padded = pad([torch.tensor(row, dtype=torch.float32) for row in rows], padding_value=0.0,
                     padding_side="right", pad_to_multiple_of=getattr(self.base, "pad_to_multiple_of", None))
        if padded.shape != shape:
            raise ValueError(f"a per-token column collated to {tuple(padded.shape)}, the ids to {tuple(shape)}: the "
                             "collator does not lay out the ids as TRL's default collator does.")
        return padded
