"""The ``rho1`` token signal: Rho-1's Selective Language Modeling, the tokens with the highest excess loss over a frozen
reference, in SFT.

Rho-1 (Lin et al., NeurIPS 2024, arXiv 2404.07965; no official training code: the paper's Eq. 3-5)::

    s_t  = L_θ(y_t) − L_ref(y_t) = log π_ref(y_t) − log π_θ(y_t)     (the excess loss; no gradient through it)
    I_t  = 1 for the top k % of the tokens by s_t, in the selection's scope
    loss = −1/(N · k%) · Σ_t I_t · log π_θ(y_t)  =  Σ_t (I_t / k%) · ℓ_t / N

so the weights are ``I_t / k%`` and N is TRL's ``num_items_in_batch``: the loss is about the mean over the kept tokens,
and it does not depend on how the batch is split. k = 60 % by default (the paper's 1B setting; 70 % at 7B). The
reference is a frozen model (``trainers.frozen``: ``reference_model_path``; the paper's, a model of the same base
trained on curated data), read online (one forward without gradient per micro-batch), or its log-probs read from a
dataset column written once (``rho1_reference_column``; ``tokenweave score-tokens`` writes ``reference_logps``).

"In practice ... ranking the tokens in a batch" leaves the batch open; the scope is ``rho1_scope``:

* ``global_batch`` (default): the tokens of one optimizer step, over gradient accumulation and every process, so the
  selection is the same however the step is split (8 × 1, 4 × GA 2, 2 processes × 4). With more than one micro-batch
  per step, the step's micro-batches are scored first (``prepare_window``: one more forward of the policy without
  gradient, and the reference's, per micro-batch), the pooled scores give one threshold (``tokens.selection``), and
  each micro-batch keeps its tokens at or above it. In evaluation, each batch is its own scope;
* ``micro_batch``: the tokens of each micro-batch on its process (what a per-device implementation does): the kept
  set, and so the run, changes with the split;
* ``sequence``: the ⌈k·n⌉ highest of each sequence.

Equal scores at a threshold are all kept. A selection: ``signal_control: inverse`` keeps as many tokens of each
sequence from the bottom of the excess-loss ranking, ``shuffle`` as many at random, with the same weights. Metrics:
``weights/mean`` (≈ 1: the kept share over k).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..checks import ConfigError, Range
from ..registry import Paper
from ..tokens.selection import fraction_threshold, select_at_least, select_over_tokens, select_per_row
from .signals import StepWindow, TokenBatch, TokenSignal, register_token_signal

RHO1_PAPER = Paper("Rho-1: Not All Tokens Are What You Need", "2404.07965", "lin2024rho1", "Zhenghao Lin and others",
                   2024)
RHO1_SCOPES = ("global_batch", "micro_batch", "sequence")
SELECTION_KEY, SCORES_KEY = "rho1_selection", "rho1_scores"
"""The batch keys of a step's selection and excess losses (``global_batch``), from ``prepare_window``."""


@dataclass
class Rho1Config:
    """The ``rho1`` signal's fields (a mixin of ``TokenSFTConfig``)."""

    option_ranges: ClassVar[dict] = {"rho1_ratio": Range(0, 1, low_open=True)}

    rho1_ratio: float = field(default=0.6, metadata={"help": "rho1 signal: the share k of the tokens kept (the top "
                                                     "by excess loss; 1: every token, TRL's SFT)."})
    rho1_scope: str = field(
        default="global_batch",
        metadata={"help": "rho1 signal: where the top k % are taken: 'global_batch', the optimizer step's tokens on "
                  "every process (the same however the step is split); 'micro_batch', each micro-batch's; "
                  "'sequence', each sequence's.", "choices": list(RHO1_SCOPES)},
    )
    rho1_reference_column: str | None = field(
        default=None,
        metadata={"help": "rho1 signal: a dataset column with the reference's log-prob of each label token (e.g. "
                  "reference_logps, from tokenweave score-tokens). None: the frozen reference, online."},
    )


@register_token_signal("rho1")
class Rho1Signal(TokenSignal):
    """Rho-1's selection (module docstring)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    selection = True
    window_columns = (SELECTION_KEY, SCORES_KEY)
    metric_prefixes = ("weights/",)
    option_prefixes = ("rho1_",)
    paper = RHO1_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        if not (args.rho1_reference_column or args.reference_model_path):
            raise ConfigError("token_signals [rho1] score tokens against a reference trained on clean data: give "
                              "reference_model_path (or rho1_reference_column, its log-probs written by tokenweave "
                              "score-tokens). The policy's own initial weights would score every token 0 at the "
                              "first step.")
        return True

    @classmethod
    def columns(cls, args) -> dict[str, tuple[str, ...]]:
        return {"rho1_reference_logps": (args.rho1_reference_column,)} if args.rho1_reference_column else {}

    @classmethod
    def frozen_models(cls, args) -> tuple[str, ...]:
        return () if args.rho1_reference_column else ("reference",)

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """The reference log-probs finite and <= 0."""
        if args.rho1_reference_column:
            from ..data.loading import check_token_values

            check_token_values(dataset, dataset_name, {args.rho1_reference_column: Range(None, 0)})

    def excess_loss(self, batch: TokenBatch) -> torch.Tensor:
        """``log π_ref − log π_θ`` of each token (no gradient), 0 outside the mask."""
        if self.trainer.args.rho1_reference_column:
            reference = batch.columns["rho1_reference_logps"]
        else:
            reference = batch.frozen.logps("reference")
        return torch.where(batch.mask.bool(), reference - batch.logps.detach(), 0.0)

    def prepare_window(self, window: StepWindow) -> None:
        """``global_batch`` with more than one micro-batch per step: the step's threshold, and each micro-batch's
        tokens at or above it (module docstring)."""
        trainer = self.trainer
        one_micro_batch = trainer.args.gradient_accumulation_steps == 1 and trainer.accelerator.num_processes == 1
        if trainer.args.rho1_scope != "global_batch" or one_micro_batch:
            return  # one micro-batch per step: its own selection is the step's
        batches = window.token_batches()
        scores = [self.excess_loss(batch) for batch in batches]
        local = torch.cat([score[batch.mask.bool()].float() for score, batch in zip(scores, batches, strict=True)])
        padded = trainer.accelerator.pad_across_processes(local, dim=0, pad_index=float("nan"))
        pooled = trainer.accelerator.gather(padded)
        threshold = fraction_threshold(pooled[~pooled.isnan()], trainer.args.rho1_ratio)
        for index, (score, batch) in enumerate(zip(scores, batches, strict=True)):
            window.set_column(index, SELECTION_KEY, select_at_least(score, batch.mask, threshold).float())
            window.set_column(index, SCORES_KEY, score)

    def token_inputs(self, batch: TokenBatch) -> dict:
        args = self.trainer.args
        if SELECTION_KEY in batch.columns:  # the step's selection and scores (prepare_window)
            scores, selected = batch.columns[SCORES_KEY], batch.columns[SELECTION_KEY].bool() & batch.mask.bool()
        else:
            scores = self.excess_loss(batch)
            select = select_per_row if args.rho1_scope == "sequence" else select_over_tokens
            selected = select(scores, batch.mask, args.rho1_ratio)
        return {"token_weights": selected.to(batch.logps.dtype) / args.rho1_ratio, "token_scores": scores}
