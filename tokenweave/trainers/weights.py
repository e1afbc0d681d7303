"""The ``weights`` token signal: a per-token weight column of the dataset multiplies the loss, in SFT and DPO.

The column holds one weight per completion token (:mod:`tokenweave.data.token_columns`: SFT, one per token SFTTrainer
labels; DPO, one per token of ``chosen_ids`` and of ``rejected_ids``), finite and >= 0, e.g. weights written offline
by a scorer or by hand. The same column code serves both trainers: the host checks the values' count against the
completion tokens when the dataset is prepared, the collator lays them out like the ids
(:class:`~tokenweave.trainers.collators.TokenColumnsCollator`), and the loss multiplies them in: SFT's per-token NLL
(``TokenSFTTrainer``), a preference loss's ``token_weights`` (DPO: ``loss_type: cdpo``, the weighted log-ratio sums).
Metrics: ``weights/*`` (the mean weight over the completion tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import NON_NEGATIVE
from ..data.loading import check_token_values
from .signals import TokenBatch, TokenSignal, register_token_signal


@dataclass
class WeightsSFTConfig:
    """The ``weights`` signal's column in SFT (a mixin of ``TokenSFTConfig``)."""

    weights_column: str = field(
        default="token_weights",
        metadata={"help": "weights signal: the dataset column with one weight per token SFTTrainer labels (labels "
                  "!= -100, before truncation)."},
    )


@dataclass
class WeightsDPOConfig:
    """The per-token weight columns in DPO (a mixin of ``TokenDPOConfig``): the ``weights`` signal's, and what the
    ``critical_tokens`` signal reads or writes."""

    chosen_weights_column: str = field(
        default="chosen_weights",
        metadata={"help": "weights and critical_tokens signals: dataset column with one weight per chosen completion "
                  "token."},
    )
    rejected_weights_column: str = field(
        default="rejected_weights",
        metadata={"help": "weights and critical_tokens signals: dataset column with one weight per rejected "
                  "completion token."},
    )


def weight_columns(args) -> tuple[str, ...]:
    """The dataset column(s) of per-token weights of a config: SFT, one; DPO, the chosen and the rejected one."""
    if args.trainer_kind == "dpo":
        return args.chosen_weights_column, args.rejected_weights_column
    return (args.weights_column,)


@register_token_signal("weights")
class WeightsSignal(TokenSignal):
    """A dataset column of per-token weights (module docstring)."""

    supports = frozenset({"sft", "dpo"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    metric_prefixes = ("weights/",)
    option_prefixes = ("weights_column", "chosen_weights_column", "rejected_weights_column")

    @classmethod
    def columns(cls, args) -> dict[str, tuple[str, ...]]:
        return {"weights": weight_columns(args)}

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """Weights finite and >= 0."""
        check_token_values(dataset, dataset_name, dict.fromkeys(weight_columns(args), NON_NEGATIVE))

    def token_inputs(self, batch: TokenBatch) -> dict:
        return {"token_weights": batch.columns["weights"]}
