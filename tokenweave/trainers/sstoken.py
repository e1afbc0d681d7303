"""The ``sstoken`` token signal: ssToken's self-modulated, semantic-aware token selection, in SFT.

ssToken (Qin et al., ICLR 2026, arXiv 2510.18250; released code ``scripts/finetune.py``), per sequence
(:mod:`tokenweave.tokens.sstoken`)::

    REL_t  = log π_θ(y_t) − log π_his(y_t)                    the history model's loss minus the policy's
    Attn_t = Σ_{s < prompt} mean_heads A^{layer}_{t, s}       the policy's attention of token t on the prompt
    score  = γ · minmax(REL)_t + (1 − γ) · Attn_t             γ = 0.5
    keep the ⌈ρ·n⌉ highest of each sequence's n label tokens   ρ = 0.6;  w_t = keep_t / ρ

The history model is ``trainers.frozen``'s ``history`` (the policy's initial weights, as the released code's base
model; ``history_sync_steps`` makes it follow the policy, the paper's EMA option). The attention is the policy's, one
layer (``sstoken_attention_layer``, the released code's last by default), as token t's query row (as released: the
loss at t is about token t as the label), summed over the prompt's keys (the positions before the sequence's first
label token) and averaged over heads; it comes from one more forward of the policy's decoder without gradient, up to
that layer, that keeps only each row's prompt mass (``tokenweave.models.attention.reduced_forward``: no attention map
is kept). ``sstoken_attention_only_steps``: the first optimizer steps select by attention alone (γ = 0), the released
code's warm-up (its first 10 000 of 50 000 examples, read in order). The weights are ``keep / ρ``, so TRL's normaliser
gives about the mean over the kept tokens; the released code takes the exact mean over the micro-batch's kept tokens
(``token_weight_normalizer: micro_batch``). Padding-free batches are refused (the attention of packed sequences would
need per-sequence masks), and so is packing. A selection: ``signal_control: inverse`` keeps as many tokens of each sequence from the
bottom of the score's ranking, ``shuffle`` as many at random. Metrics: ``weights/mean``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from trl.models.utils import disable_gradient_checkpointing

from ..checks import AT_LEAST_ONE, NON_NEGATIVE, UNIT, ConfigError, Range
from ..models import causal_lm
from ..models.attention import reduced_forward
from ..registry import Paper
from ..tokens.selection import select_per_row
from ..tokens.sstoken import prompt_attention_reduction, sstoken_scores
from .signals import TokenBatch, TokenSignal, register_token_signal

SSTOKEN_PAPER = Paper("ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning", "2510.18250",
                      "qin2025sstoken", "Xiaohan Qin and others", 2025)


@dataclass
class SsTokenConfig:
    """The ``sstoken`` signal's fields (a mixin of ``TokenSFTConfig``)."""

    option_ranges: ClassVar[dict] = {"sstoken_ratio": Range(0, 1, low_open=True), "sstoken_gamma": UNIT,
                                     "sstoken_attention_only_steps": NON_NEGATIVE,
                                     "sstoken_attention_chunk_size": AT_LEAST_ONE}

    sstoken_ratio: float = field(default=0.6, metadata={"help": "sstoken signal: the share ρ of each sequence's "
                                                        "label tokens kept (⌈ρ·n⌉; 1: every token)."})
    sstoken_gamma: float = field(default=0.5, metadata={"help": "sstoken signal: γ, the excess loss's share of the "
                                                        "score (1 − γ: the attention's)."})
    sstoken_attention_layer: int = field(default=-1, metadata={"help": "sstoken signal: the layer whose attention "
                                                               "is read (negative: from the last; -1, the last)."})
    sstoken_attention_only_steps: int = field(
        default=0, metadata={"help": "sstoken signal: the first optimizer steps select by attention alone (γ = 0), "
                             "the released code's warm-up."})
    sstoken_attention_chunk_size: int = field(default=128, metadata={"help": "sstoken signal: query rows per chunk "
                                                                     "of the attention forward."})


@register_token_signal("sstoken")
class SsTokenSignal(TokenSignal):
    """ssToken's selection (module docstring)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    selection = True
    metric_prefixes = ("weights/",)
    option_prefixes = ("sstoken_",)
    paper = SSTOKEN_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        if args.padding_free or args.packing:
            raise ConfigError("token_signals [sstoken] read the attention of each sequence on its prompt: not with "
                              "padding_free or packing (packed sequences).")
        return True

    @classmethod
    def frozen_models(cls, args) -> tuple[str, ...]:
        return ("history",) if args.sstoken_gamma > 0 else ()

    def __init__(self, trainer):
        super().__init__(trainer)
        num_layers = causal_lm(trainer.model).config.get_text_config().num_hidden_layers
        layer = trainer.args.sstoken_attention_layer
        self.layer = layer % num_layers if -num_layers <= layer < num_layers else None
        if self.layer is None:
            raise ValueError(f"sstoken_attention_layer {layer}: the model has {num_layers} layers.")

    def prompt_attention(self, batch: TokenBatch) -> torch.Tensor:
        """``Attn_t`` ``[R, T]``: the attention of each label token's query row on its prompt (module docstring)."""
        ids, attention_mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        prompt_lengths = batch.mask.int().argmax(dim=-1) + 1  # the first label token's position in the ids
        trainer = self.trainer
        with disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
            (mass,) = reduced_forward(trainer.model, ids, attention_mask, [self.layer],
                                      prompt_attention_reduction(prompt_lengths),
                                      trainer.args.sstoken_attention_chunk_size, batch_size=ids.size(0))
        return mass.mean(dim=1)[:, 1:].to(batch.logps.dtype)  # row j + 1 is the query of the token entry j is about

    def token_inputs(self, batch: TokenBatch) -> dict:
        args = self.trainer.args
        gamma = 0.0 if self.trainer.state.global_step < args.sstoken_attention_only_steps else args.sstoken_gamma
        attention = self.prompt_attention(batch) if gamma < 1 else torch.zeros_like(batch.logps)
        excess = batch.logps.detach() - batch.frozen.logps("history") if gamma > 0 else torch.zeros_like(batch.logps)
        scores = sstoken_scores(excess, attention, batch.mask, gamma)
        selected = select_per_row(scores, batch.mask, args.sstoken_ratio)
        return {"token_weights": selected.to(batch.logps.dtype) / args.sstoken_ratio, "token_scores": scores}
