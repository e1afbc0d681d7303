"""Attention-derived credit as a token signal (Li et al., arXiv 2510.13554, the preplan-and-anchor rhythm).

The signal ``attention_credit`` (:class:`AttentionCreditSignal`), after each generation: the policy that sampled
(π_old, with its adapter) runs once over prompt + completion with its attention reduced as it is computed
(:func:`tokenweave.models.attention.reduced_forward`, the chosen layers: 5 evenly spaced in the middle third by
default), keeping of each row only the band the credit reads and the row's span (:func:`credit_reduction`), never the
N × N maps; the heads of those layers are grouped by span (30 % local, 30 % global, over the response rows of the
whole generation batch, all processes), WAAD comes from the local group's mean band, FAI from the global group's, and
the credit rule gives γ per completion token (:func:`attention_credit`; which row of the forward stands for token t
is ``attention_credit_alignment``: by default its own). The advantages become ``A · γ`` (``[B, T]``), for both signs
by default (v2), so every registered policy loss (and TRL's ``loss_type`` path) takes them. ``signal_control:
shuffle`` (the host's random control) puts each row's γ on random completion tokens (the same values, so the same
share credited). Logged: ``attention_credit/credited_frac``, ``attention_credit/gamma_mean``,
``attention_credit/waad_mean``, ``attention_credit/fai_mean`` (over the completion tokens of all processes).
``tokenweave attention-heatmap`` (:mod:`tokenweave.inference.attention_credit`) shows γ, WAAD and FAI of sampled
completions.

Both check what only the model and the completions tell: ``attention_credit_layers`` against the model's layers once
it is loaded, before any generation (:func:`credit_layers`), and completions too short for FAI's horizon
(:func:`short_for_horizon`, logged once by the signal): a completion of at most H_lo tokens has no later token within
the horizon of any of its tokens, so its FAI is 0 everywhere and the rules that read FAI credit its first tokens
(``top_quantile`` breaks ties by position).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from trl.models.utils import disable_gradient_checkpointing

from ..checks import AT_LEAST_ONE, POSITIVE, UNIT, Range, check_options
from ..models.attention import Reduction, reduced_forward
from ..registry import Paper
from ..tokens.attention import (
    CREDIT_RULES,
    attention_band,
    credit_multipliers,
    fai,
    group_heads,
    head_spans,
    span_rows,
    waad,
)
from .rollout import Generation
from .signals import TokenSignal, register_token_signal

logger = logging.getLogger(__name__)


def credit_reduction(width: int) -> Reduction:
    """What attention credit keeps of each chunk of attention rows: the band of ``width`` entries left of each row's
    diagonal (``tokens.attention.attention_band``, ``[B, heads, rows, width]``) and each row's span
    (``span_rows``, ``[B, heads, rows]``)."""

    def reduce(probs: torch.Tensor, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_band(probs, width, first_row=first_row), span_rows(probs, first_row=first_row)

    return reduce


def middle_layers(num_layers: int, count: int = 5) -> list[int]:
    """``count`` evenly spaced layers of the middle third, ⌊L/3⌋ .. ⌊2L/3⌋ (the paper's choice, Sec. 5.1)."""
    low, high = num_layers // 3, (2 * num_layers) // 3
    if count == 1:
        return [(low + high) // 2]
    return sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)})


def credit_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """The layers attention credit reads of a model with ``num_layers`` layers: ``layers``
    (``attention_credit_layers``) or, for None, :func:`middle_layers`. A layer past the model's last is a one-line
    ``ValueError`` naming the option, the model's layer count and the fix (call it once the model is loaded, before
    any generation: the reduced forward would otherwise fail at the first step with a ``KeyError``)."""
    if layers is None:
        return middle_layers(num_layers)
    beyond = [layer for layer in layers if layer >= num_layers]
    if beyond:
        raise ValueError(f"attention_credit_layers {list(layers)}: {beyond} beyond the model's {num_layers} layers "
                         f"(indices 0..{num_layers - 1}); choose layers below {num_layers}, or leave "
                         "attention_credit_layers unset for evenly spaced layers of the middle third.")
    return list(layers)


def short_for_horizon(completion_mask: torch.Tensor, options) -> str | None:
    """A one-line warning when the rule reads FAI (``global_anchor``, ``coupled``) and some completions
    (``completion_mask`` ``[B, T]``) have between 1 and H_lo tokens (``attention_credit_horizon``): no later token lies
    within the horizon of any of theirs, so their FAI is 0 everywhere and the rule credits their first tokens by
    position, not by attention. None otherwise."""
    if options.attention_credit_rule == "local_chunk":
        return None
    horizon, lengths = list(options.attention_credit_horizon), completion_mask.sum(-1)
    short = int(((lengths > 0) & (lengths <= horizon[0])).sum())
    if not short:
        return None
    return (f"attention_credit_horizon {horizon}: {short} of {lengths.numel()} completions have {horizon[0]} tokens "
            f"or fewer, so their FAI is 0 everywhere and the {options.attention_credit_rule} rule credits their first "
            "tokens by position; set H_lo below the completions' length (attention_credit_horizon) or use "
            "attention_credit_rule: local_chunk.")


CREDIT_SIGNS = ("both", "positive", "negative")
# Which row of the forward over prompt + completion stands for completion token t: "input", the row whose input is
# token t (the state at token t); "prediction", the row before it, whose output distribution sampled token t. The
# paper says "response position t" only (methods.md 7.4.3).
CREDIT_ALIGNMENTS = ("input", "prediction")


@dataclass
class AttentionCredit:
    """What :func:`attention_credit` gives per completion token ``[B, T]`` (0 / 1 outside the completion): the credit
    ``gamma`` and the WAAD and FAI values it was computed from."""

    gamma: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor


def attention_credit(model, prompt_ids, prompt_mask, completion_ids, completion_mask, options, layers, *,
                     batch_size: int, reduce_sum=None) -> AttentionCredit:
    """γ, WAAD and FAI of each completion token from ``model``'s attention (the module docstring): one banded forward
    over the left-padded prompts + right-padded completions, the heads of ``layers`` grouped by span over the
    response rows of the batch, the rule's γ. ``options``: the ``attention_credit_*`` fields
    (:class:`AttentionCreditConfig`). ``reduce_sum`` sums the head-span totals over processes (None: one process),
    so the head groups are those of the whole generation batch."""
    prompt_length, length = prompt_ids.size(1), completion_ids.size(1)
    shift = CREDIT_ALIGNMENTS.index(options.attention_credit_alignment)  # 1: token t's row is the one before
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    # the response rows R: the rows standing for completion tokens
    rows = torch.cat([torch.zeros_like(prompt_mask[:, shift:]), completion_mask,
                      torch.zeros_like(prompt_mask[:, :shift])], dim=1)
    width = max(options.attention_credit_window, options.attention_credit_horizon[1] + 1)
    bands, spans = reduced_forward(model, ids, attention_mask, layers, credit_reduction(width),
                                   options.attention_credit_chunk_size, batch_size)
    local, glob = group_heads(head_spans(spans, rows, reduce_sum), options.attention_credit_head_fraction)
    waad_values = waad(bands[:, local].mean(1), options.attention_credit_window)
    fai_values = fai(bands[:, glob].mean(1), rows, tuple(options.attention_credit_horizon))
    gamma = credit_multipliers(
        options.attention_credit_rule, rows, waad_values, fai_values, quantile=options.attention_credit_quantile,
        amplification=options.attention_credit_amplification, alpha=options.attention_credit_alpha,
        lookback=options.attention_credit_lookback,
    )
    tokens = slice(prompt_length - shift, prompt_length - shift + length)
    valid = completion_mask.to(gamma.dtype)
    return AttentionCredit(gamma[:, tokens], waad_values[:, tokens] * valid, fai_values[:, tokens] * valid)


def _check_horizon(horizon) -> str | None:
    if not (isinstance(horizon, list) and len(horizon) == 2 and all(type(v) is int for v in horizon)
            and 0 <= horizon[0] <= horizon[1]):
        return f"attention_credit_horizon must be two integers 0 <= H_lo <= H_hi, got {horizon!r}"
    return None


def _check_layers(layers) -> str | None:
    if layers is not None and (not layers or any(type(layer) is not int or layer < 0 for layer in layers)):
        return f"attention_credit_layers must be a non-empty list of layer indices >= 0 (or None), got {layers!r}"
    return None


@dataclass
class AttentionCreditConfig:
    """Attention credit's fields of ``TokenGRPOConfig`` (a mixin); the paper's defaults (v2), the open choices as
    fields (``tokens.attention``)."""

    option_ranges: ClassVar[dict] = {  # tokenweave.checks reads them
        "attention_credit_window": AT_LEAST_ONE, "attention_credit_head_fraction": Range(0, 0.5, low_open=True),
        "attention_credit_quantile": UNIT, "attention_credit_amplification": POSITIVE, "attention_credit_alpha": UNIT,
        "attention_credit_lookback": AT_LEAST_ONE, "attention_credit_chunk_size": AT_LEAST_ONE,
    }
    option_rules: ClassVar[dict] = {"attention_credit_layers": _check_layers,
                                    "attention_credit_horizon": _check_horizon}

    attention_credit_rule: str = field(
        default="coupled",
        metadata={"help": "Attention credit: local_chunk (WAAD jumps), global_anchor (FAI) or coupled (the rhythm).",
                  "choices": list(CREDIT_RULES)},
    )
    attention_credit_layers: list[int] | None = field(
        default=None, metadata={"help": "Attention credit: the layers read (each below the model's layer count, "
                                        "checked once the model is loaded). None: 5 evenly spaced in the middle third."}
    )
    attention_credit_window: int = field(default=10, metadata={"help": "Attention credit: WAAD's window W."})
    attention_credit_horizon: list[int] = field(
        default_factory=lambda: [10, 100],
        metadata={"help": "Attention credit: FAI's horizon [H_lo, H_hi]. A completion of at most H_lo tokens has no "
                          "FAI (0 everywhere: the FAI rules credit its first tokens; warned once)."},
    )
    attention_credit_head_fraction: float = field(
        default=0.3, metadata={"help": "Attention credit: the share of heads in the local and in the global group."}
    )
    attention_credit_quantile: float = field(
        default=0.4, metadata={"help": "Attention credit: the top share of each completion's tokens a rule credits."}
    )
    attention_credit_amplification: float = field(
        default=1.5, metadata={"help": "Attention credit: γ of a credited token (γ_amp)."}
    )
    attention_credit_alpha: float = field(
        default=0.5, metadata={"help": "Attention credit, coupled: the share of a dominated anchor's credit moved to "
                                       "its introduction (α; the paper leaves it open)."}
    )
    attention_credit_lookback: int = field(
        default=3, metadata={"help": "Attention credit, coupled: k, the positions before an anchor searched."}
    )
    attention_credit_signs: str = field(
        default="both", metadata={"help": "Attention credit: the advantages γ multiplies (v2: both signs).",
                                  "choices": list(CREDIT_SIGNS)},
    )
    attention_credit_alignment: str = field(
        default="input", metadata={"help": "Attention credit: the row of completion token t: 'input' (the row whose "
                                           "input is t) or 'prediction' (the row before, which sampled t).",
                                   "choices": list(CREDIT_ALIGNMENTS)},
    )
    attention_credit_chunk_size: int = field(
        default=128, metadata={"help": "Attention credit: query rows per chunk of the reduced attention forward."}
    )


def credit_options(values: dict, source: str = "the config") -> AttentionCreditConfig:
    """The ``attention_credit_*`` entries of a run config's mapping ``values`` as an :class:`AttentionCreditConfig`
    (checked; every other key is ignored, an unknown ``attention_credit_*`` key is an error naming ``source``)."""
    known = set(AttentionCreditConfig.__dataclass_fields__)
    chosen = {key: value for key, value in values.items() if key.startswith("attention_credit_")}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise ValueError(f"{source}: unknown attention credit option(s) {unknown}; known: {sorted(known)}")
    options = AttentionCreditConfig(**chosen)
    check_options(options)
    return options


@register_token_signal("attention_credit")
class AttentionCreditSignal(TokenSignal):
    """Attention-derived credit (module docstring)."""

    weighs_tokens = True
    metric_prefixes = ("attention_credit/",)
    option_prefixes = ("attention_credit_",)
    paper = Paper("Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy "
                  "Optimization", "2510.13554", "li2025attention", "Li and others", 2025)

    def __init__(self, trainer):
        super().__init__(trainer)
        num_layers = trainer.accelerator.unwrap_model(trainer.model).config.num_hidden_layers
        self.layers = credit_layers(trainer.args.attention_credit_layers, num_layers)
        self.warned_short = False  # short_for_horizon is logged once

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        trainer, args, output = self.trainer, self.trainer.args, generation.output
        mask = generation.completion_mask
        warning = None if self.warned_short else short_for_horizon(mask, args)
        if warning is not None:
            if trainer.accelerator.is_main_process:  # each process has its own completions: said once, by one
                logger.warning(warning)
            self.warned_short = True
        with disable_gradient_checkpointing(trainer.model, args.gradient_checkpointing_kwargs):
            credit = attention_credit(
                trainer.model, output["prompt_ids"], output["prompt_mask"], output["completion_ids"], mask, args,
                self.layers, batch_size=args.per_device_train_batch_size,
                reduce_sum=lambda totals: trainer.accelerator.reduce(totals, reduction="sum"),
            )
        gamma = credit.gamma
        if args.signal_control != "none":  # the host's random control: each row's γ on random completion tokens
            gamma = trainer.signal_control(gamma, mask, generation.row_keys)
        advantages = output["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(gamma)
        if args.attention_credit_signs != "both":
            applies = advantages > 0 if args.attention_credit_signs == "positive" else advantages < 0
            gamma = torch.where(applies, gamma, 1.0)
        self._log(generation, gamma, mask, credit.waad, credit.fai)
        return {"advantages": advantages * gamma * mask}

    def _log(self, generation, gamma, mask, waad_values, fai_values) -> None:
        valid = mask.to(gamma.dtype)
        totals = torch.stack([((gamma != 1.0) * valid).sum(), (gamma * valid).sum(), (waad_values * valid).sum(),
                              (fai_values * valid).sum(), valid.sum()])
        totals = self.trainer.accelerator.reduce(totals, reduction="sum")
        metrics = self.trainer._metrics["train" if generation.training else "eval"]
        names = ("credited_frac", "gamma_mean", "waad_mean", "fai_mean")
        for name, total in zip(names, totals[:4].tolist(), strict=True):
            metrics[f"attention_credit/{name}"].append(total / max(totals[4].item(), 1.0))
