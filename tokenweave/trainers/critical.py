"""The ``critical_tokens`` token signal: cDPO's per-token weights from critical-token scores ("Critical Tokens
Matter", Lin et al., arXiv 2411.19943), for the ``cdpo`` preference loss.

``loss_type: cdpo`` with no ``token_signals`` turns it on. It reads, per completion token (as DPOTrainer tokenises
it), the weights columns (``chosen_weights_column`` / ``rejected_weights_column``) when the dataset has them, else the
critical-token scores s_t ∈ [0, 1] (``chosen_scores_column`` / ``rejected_scores_column``, as ``tokenweave critical``
writes them), turned into weights when the dataset is prepared by
:func:`~tokenweave.losses.preference.critical_token_weights` (chosen 1, or s_t with ``cdpo_weight_chosen``; rejected
1 − s_t; EOS 1). The weights then go through the per-token column code every trainer shares (the ``weights``
signal's), and into ``cdpo``'s weighted log-ratio sums as ``token_weights``. Metrics: ``weights/chosen``,
``weights/rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import NON_NEGATIVE, UNIT
from ..data.loading import check_token_values
from ..data.token_columns import check_token_columns
from ..losses.preference import CDPO_PAPER, critical_token_weights
from .signals import TokenBatch, TokenSignal, register_token_signal
from .weights import weight_columns


@dataclass
class CriticalTokensConfig:
    """The ``critical_tokens`` signal's fields of ``TokenDPOConfig`` (a mixin; its weights columns are
    :class:`~tokenweave.trainers.weights.WeightsDPOConfig`'s)."""

    cdpo_weight_chosen: bool = field(
        default=False,
        metadata={"help": "cDPO with score columns: also weight chosen tokens by their score s_t. False (cDPO's "
                  "shipped default, only_neg=True) weights only rejected tokens, by 1 − s_t."},
    )
    chosen_scores_column: str = field(
        default="chosen_scores",
        metadata={"help": "cDPO: dataset column with one critical-token score s_t per chosen completion token, used "
                  "when the weights columns are absent."},
    )
    rejected_scores_column: str = field(
        default="rejected_scores",
        metadata={"help": "cDPO: dataset column with one critical-token score s_t per rejected completion token, "
                  "used when the weights columns are absent."},
    )


def critical_weights(chosen_scores: list[float], rejected_scores: list[float], chosen_ids: list[int],
                     rejected_ids: list[int], *, weight_chosen: bool, eos_token_id: int | None,
                     ) -> tuple[list[float], list[float]]:
    """cDPO's weights of one example's completion-token scores (``critical_token_weights``, weight 1 at the EOS
    tokens ``eos_token_id`` of each completion)."""
    scores = [torch.tensor(side, dtype=torch.float32).unsqueeze(0) for side in (chosen_scores, rejected_scores)]
    masks = [torch.ones_like(side) for side in scores]
    eos = [None, None]
    if eos_token_id is not None:
        eos = [torch.tensor(ids).unsqueeze(0) == eos_token_id for ids in (chosen_ids, rejected_ids)]
    weights = critical_token_weights(*scores, *masks, weight_chosen=weight_chosen, chosen_eos=eos[0],
                                     rejected_eos=eos[1])
    return tuple(side.squeeze(0).tolist() for side in weights)


@register_token_signal("critical_tokens")
class CriticalTokensSignal(TokenSignal):
    """cDPO's critical-token weights (module docstring)."""

    supports = frozenset({"dpo"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    named_by_losses = frozenset({"cdpo"})
    metric_prefixes = ("weights/",)
    option_prefixes = ("cdpo_", "chosen_scores_column", "rejected_scores_column", "chosen_weights_column",
                       "rejected_weights_column")
    paper = CDPO_PAPER

    @classmethod
    def implied(cls, args) -> bool:
        """cDPO's weights, unless the config lists the signals that give them."""
        return "cdpo" in args.loss_type and not args.token_signals

    @classmethod
    def columns(cls, args) -> dict[str, tuple[str, ...]]:
        return {"critical_weights": weight_columns(args)}

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """Critical-token scores in [0, 1], weights finite and >= 0."""
        ranges = {args.chosen_scores_column: UNIT, args.rejected_scores_column: UNIT,
                  **dict.fromkeys(weight_columns(args), NON_NEGATIVE)}
        check_token_values(dataset, dataset_name, ranges)

    @classmethod
    def prepare_dataset(cls, dataset, tokenizer, args, dataset_name: str):
        """The weights columns as they are, or else made from the score columns (module docstring)."""
        from datasets import Dataset

        weights, scores = weight_columns(args), (args.chosen_scores_column, args.rejected_scores_column)
        names = set(dataset.column_names or next(iter(dataset)).keys())
        if set(weights) <= names:
            return dataset
        if not set(scores) <= names:
            raise ValueError(f"loss_type 'cdpo': the {dataset_name} dataset has no per-token weights: it needs "
                             f"columns {list(weights)} (weights) or {list(scores)} (critical-token scores), with one "
                             "value per completion token.")
        eos_token_id = getattr(tokenizer, "tokenizer", tokenizer).eos_token_id

        def from_scores(example):
            made = critical_weights(*(example[name] for name in scores), example["chosen_ids"], example["rejected_ids"],
                                    weight_chosen=args.cdpo_weight_chosen, eos_token_id=eos_token_id)
            return dict(zip(weights, made, strict=True))

        map_kwargs = {}
        if isinstance(dataset, Dataset):
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Checking the score columns of {dataset_name}"}
        dataset = dataset.map(check_token_columns, with_indices=True, fn_kwargs={
            "columns": {"scores": scores}, "kind": "dpo", "dataset_name": dataset_name}, **map_kwargs)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"cDPO weights of {dataset_name} from scores"
        return dataset.map(from_scores, **map_kwargs)

    def token_inputs(self, batch: TokenBatch) -> dict:
        return {"token_weights": batch.columns["critical_weights"]}
