"""The ``token_cleaning`` token signal: TokenCleaning's offline token labels as a selection in the SFT loss.

"Token Cleaning: Fine-Grained Data Selection for LLM Supervised Fine-Tuning" (Pang et al., 2025, arXiv 2502.01968),
its fixed-model cleaning. Two steps:

1. Offline, ``tokenweave score-tokens --config <this run's YAML>`` (:mod:`tokenweave.pipelines.token_scores`) scores
   every token SFTTrainer labels with the base model (the policy's initial weights, ``model_name_or_path``) and a
   reference (``reference_model_path``: in the paper the base fine-tuned on a small curated warm-up set)::

       s(x_ij) = L_base(x_ij) − L_ref(x_ij),        L(x_ij) = −log π(x_ij | x_i,<j)

   and keeps the top ``token_cleaning_ratio`` (default 0.6) of the scores: over the whole dataset
   (``token_cleaning_level: global``, the paper's default) or in each row (``sample``). It writes the columns
   ``token_cleaning_labels`` (1 kept, 0 dropped), ``token_cleaning_scores`` (s) and ``reference_logps``, one value per
   label token (before truncation), into a dataset the run then reads (``dataset_name: <that directory>``).
2. In training this signal weighs each label token by its label over the ratio::

       w_ij = label_ij / token_cleaning_ratio,     loss = Σ w·ℓ / N      (N: TRL's num_items_in_batch)

   so Σ w ≈ the number of label tokens and the loss is ≈ the mean NLL over the kept tokens (Rho-1's ``1/(N·k%)``),
   with TRL's normaliser: a run does not change with how its batch is split over gradient accumulation and processes.
   ``token_scores`` (the scores column) is the ranking the ``inverse`` control turns around (the same number of tokens
   of each row from the bottom of the scores); ``shuffle`` moves each row's weights to random label tokens.

Differences from the released code (UCSC-REAL/TokenCleaning@29362ab, ``scripts/generate_token_label.py``,
``scripts/calculate_token_loss.py``, ``scripts/finetune.py``):

* Normaliser: the released training replaces the labels by the selected ones and takes HF's mean cross-entropy of
  each micro-batch, i.e. Σ_kept ℓ / (kept tokens of the micro-batch); here Σ (label/ratio)·ℓ / N, which equals it in
  expectation but not per micro-batch. ``token_weight_normalizer: micro_batch`` (TokenSFTConfig) gives the released
  per-micro-batch weighted mean Σ w·ℓ / Σ w exactly (the 1/ratio then cancels).
* Kept counts: as released, ``int(n · ratio)`` (the floor, not ssToken's ceiling) of the n label tokens of the
  dataset (global) or of each row (sample), with a float tolerance (0.29 · 100 keeps 29; the released ``int()``, 28);
  ties keep dataset order (the released stable sort): row first, then position, so exactly that many.
* Tokens: the labelled tokens are TRL's SFTTrainer's (chat template, completion-only or assistant-only loss), not the
  released Tulu-format encoding; they are scored untruncated (the released code truncates at 2048 before scoring), and
  a label at position 0 (no context predicts it; TRL's loss never sees it) gets score 0 and label 0 and is not ranked
  (released: loss 0 for both models, so score 0, ranked).
* Losses are computed in float32 from TRL's fused LM head (released: the models' dtype).
* Only fixed-model cleaning; self-evolving cleaning (the reference re-trained on successive data splits) is a loop of
  score-tokens and training runs over splits.

``token_cleaning_ratio`` must be the one the labels were made with (score-tokens reads it from the same YAML): another
ratio scales the loss by the quotient of the two. Metrics: ``weights/mean`` (≈ the kept share / ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..checks import FINITE, ConfigError, Range
from ..data.loading import check_token_values
from ..registry import Paper
from .signals import TokenBatch, TokenSignal, register_token_signal

TOKEN_CLEANING_LEVELS = ("global", "sample")
TOKEN_CLEANING_PAPER = Paper("Token Cleaning: Fine-Grained Data Selection for LLM Supervised Fine-Tuning", "2502.01968",
                             "pang2025token", "Jinlong Pang and Na Di and Zhaowei Zhu and Jiaheng Wei and Hao Cheng and "
                             "Chen Qian and Yang Liu", 2025)
LABELS_KEY = "token_cleaning_labels"
SCORES_KEY = "token_cleaning_scores"
"""The signal's batch keys (``TokenBatch.columns``)."""


@dataclass
class TokenCleaningConfig:
    """The ``token_cleaning`` signal's fields of ``TokenSFTConfig`` (a mixin; module docstring). ``tokenweave
    score-tokens`` reads them too, from the same YAML."""

    option_ranges: ClassVar[dict] = {"token_cleaning_ratio": Range(0, 1, low_open=True)}

    token_cleaning_ratio: float = field(
        default=0.6,
        metadata={"help": "token_cleaning signal: the share of label tokens kept (label 1), in (0, 1]: score-tokens "
                  "labels the top int(n·ratio) scores, and training weighs each label token by label / ratio "
                  "(the paper's data_prop, 0.6)."},
    )
    token_cleaning_level: str = field(
        default="global",
        metadata={"help": "token_cleaning signal: where score-tokens ranks the scores: 'global', over every label "
                  "token of the dataset (the paper's default); 'sample', within each row.",
                  "choices": list(TOKEN_CLEANING_LEVELS)},
    )
    token_cleaning_column: str = field(
        default="token_cleaning_labels",
        metadata={"help": "token_cleaning signal: the dataset column of the labels (0 or 1, one per token "
                  "SFTTrainer labels, before truncation), as score-tokens writes it."},
    )
    token_cleaning_scores_column: str = field(
        default="token_cleaning_scores",
        metadata={"help": "token_cleaning signal: the dataset column of the scores L_base − L_ref (one per token "
                  "SFTTrainer labels), the ranking of signal_control: inverse."},
    )


class _ZeroOrOne(Range):
    """0 or 1 exactly (a ``Range`` for :func:`~tokenweave.data.loading.check_token_values`)."""

    def holds(self, value) -> bool:
        return not isinstance(value, bool) and value in (0, 1)

    def __str__(self) -> str:
        return "0 or 1"


ZERO_OR_ONE = _ZeroOrOne()


@register_token_signal("token_cleaning")
class TokenCleaningSignal(TokenSignal):
    """TokenCleaning's offline token labels (module docstring)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    selection = True
    metric_prefixes = ("weights/",)
    option_prefixes = ("token_cleaning_",)
    paper = TOKEN_CLEANING_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        if args.token_cleaning_column == args.token_cleaning_scores_column:
            raise ConfigError(f"token_cleaning_column and token_cleaning_scores_column are both "
                              f"{args.token_cleaning_column!r}: the labels and the scores are two columns.")
        return True

    @classmethod
    def columns(cls, args) -> dict[str, tuple[str, ...]]:
        return {LABELS_KEY: (args.token_cleaning_column,), SCORES_KEY: (args.token_cleaning_scores_column,)}

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """Both columns present (else: run score-tokens first), labels 0 or 1, scores finite."""
        missing = [column for column in (args.token_cleaning_column, args.token_cleaning_scores_column)
                   if column not in dataset.column_names]
        if missing:
            raise ValueError(f"Dataset {dataset_name} has no column(s) {missing}: the token_cleaning signal reads the "
                             "labels and scores that `tokenweave score-tokens --config <this config>` writes; train "
                             "on its output (dataset_name: <its directory>).")
        check_token_values(dataset, dataset_name, {args.token_cleaning_column: ZERO_OR_ONE,
                                                   args.token_cleaning_scores_column: FINITE})

    def token_inputs(self, batch: TokenBatch) -> dict:
        return {"token_weights": batch.columns[LABELS_KEY] / self.trainer.args.token_cleaning_ratio,
                "token_scores": batch.columns[SCORES_KEY]}
