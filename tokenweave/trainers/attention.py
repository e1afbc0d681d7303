"""Attention-derived credit as a token signal (Li et al., arXiv 2510.13554, the preplan-and-anchor rhythm), and the
attention forward it needs: one no-grad forward that keeps, for a few layers, only the band of each attention row
that the credit reads (``tokens.attention``), never the N × N maps.

The signal ``attention_credit`` (:class:`AttentionCreditSignal`), after each generation: the policy that sampled
(π_old, with its adapter) runs once over prompt + completion inside :func:`attention_bands` (the chosen layers: 5
evenly spaced in the middle third by default); the heads of those layers are grouped by span (30 % local, 30 %
global, over the response rows of the whole generation batch, all processes), WAAD comes from the local group's
mean band, FAI from the global group's, and the credit rule gives γ per completion token (:func:`attention_credit`;
which row of the forward stands for token t is ``attention_credit_alignment``: by default its own). The advantages
become ``A · γ`` (``[B, T]``), for both signs by default (v2), so every registered policy loss (and TRL's
``loss_type`` path) takes them. ``attention_credit_control: random`` puts each row's γ on random completion tokens
(the same values, so the same share credited: ``tokens.controls.shuffle_within_mask``). Logged:
``attention_credit/credited_frac``, ``attention_credit/gamma_mean``, ``attention_credit/waad_mean``,
``attention_credit/fai_mean`` (over the completion tokens of all processes). ``tokenweave attention-heatmap``
(:mod:`tokenweave.inference.attention_credit`) shows γ, WAAD and FAI of sampled completions.

``with attention_bands(model, layers, width) as bands: model(input_ids, attention_mask=...)`` runs the model's
forward with the attention implementation ``tokenweave_bands`` (registered with transformers' ``AttentionInterface``
and, for its masks, ``AttentionMaskInterface`` as eager's additive masks): in the chosen ``layers`` it computes the
attention probabilities in chunks of ``chunk_size`` query rows, as eager attention does (float32 softmax, grouped
key/value heads repeated), and reduces each chunk at once to ``tokens.attention.attention_band`` (``[B, heads, N,
width]``) and ``span_rows`` (``[B, heads, N]``) before the next; every other layer runs sdpa. So the memory of a
chosen layer is ``heads · chunk_size · N`` while it runs and ``heads · N · (width + 1)`` kept, not ``heads · N²``.
The model's own implementation is restored on exit. Works on the module that holds the config (a PEFT model's base
model too: the adapters are in its linear layers), and, under ZeRO-3, through the ordinary forward that gathers each
layer's parameters.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from trl.models.utils import disable_gradient_checkpointing

from ..checks import check_options
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
from ..tokens.controls import hash_seed, row_generator, shuffle_within_mask
from .signals import Generation, TokenSignal, register_token_signal

IMPLEMENTATION = "tokenweave_bands"


@dataclass
class AttentionBands:
    """What the banded forward keeps, by layer index: ``band[layer]`` ``[B, heads, N, width]`` and ``span[layer]``
    ``[B, heads, N]`` (float32)."""

    layers: frozenset[int]
    width: int
    chunk_size: int = 128
    stop_early: bool = False  # end the forward once the last chosen layer's bands are kept (:func:`banded_forward`)
    band: dict[int, torch.Tensor] = field(default_factory=dict)
    span: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[AttentionBands | None] = ContextVar("tokenweave_attention_bands", default=None)


class _BandsKept(Exception):
    """Raised by the last chosen layer's attention when ``stop_early``: the layers after it are not needed."""


def _repeat_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped key / value heads ``[B, kv_heads, N, D]`` repeated to the query heads (eager attention's repeat_kv)."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def banded_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``tokenweave_bands`` attention (module docstring): eager attention in row chunks, reduced to bands, in the
    active :class:`AttentionBands`'s layers; sdpa elsewhere (and outside :func:`attention_bands`)."""
    bands = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if bands is None or layer not in bands.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.size(1) // key.size(1)
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    outputs, band_chunks, span_chunks = [], [], []
    for start in range(0, query.size(2), bands.chunk_size):
        stop = min(start + bands.chunk_size, query.size(2))
        scores = torch.matmul(query[:, :, start:stop], key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, start:stop, : key.size(2)]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        outputs.append(torch.matmul(probs.to(value.dtype), value))
        band_chunks.append(attention_band(probs, bands.width, first_row=start))
        span_chunks.append(span_rows(probs, first_row=start))
    bands.band[layer] = torch.cat(band_chunks, dim=2)
    bands.span[layer] = torch.cat(span_chunks, dim=2)
    if bands.stop_early and len(bands.band) == len(bands.layers):
        raise _BandsKept
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, banded_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@contextmanager
def attention_bands(model, layers, width: int, chunk_size: int = 128, stop_early: bool = False):
    """While open, forwards of ``model`` keep :class:`AttentionBands` of ``layers`` (yielded; module docstring);
    ``stop_early``: the last chosen layer's attention ends the forward (:func:`banded_forward` catches it)."""
    bands = AttentionBands(frozenset(layers), width, chunk_size, stop_early)
    configs = [module.config for module in model.modules() if hasattr(getattr(module, "config", None),
                                                                       "_attn_implementation")]
    previous = [config._attn_implementation for config in configs]
    token = _ACTIVE.set(bands)
    try:
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield bands
    finally:
        _ACTIVE.reset(token)
        for config, implementation in zip(configs, previous, strict=True):
            config._attn_implementation = implementation


def middle_layers(num_layers: int, count: int = 5) -> list[int]:
    """``count`` evenly spaced layers of the middle third, ⌊L/3⌋ .. ⌊2L/3⌋ (the paper's choice, Sec. 5.1)."""
    low, high = num_layers // 3, (2 * num_layers) // 3
    if count == 1:
        return [(low + high) // 2]
    return sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)})


CREDIT_SIGNS = ("both", "positive", "negative")
CREDIT_CONTROLS = ("none", "random")
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


def banded_forward(model, ids, attention_mask, layers, width: int, chunk_size: int, batch_size: int):
    """Bands ``[B, layers·heads, N, width]`` and row spans ``[B, layers·heads, N]`` of ``model`` over ``ids`` (no
    gradient; micro-batches of ``batch_size`` rows). Only the decoder runs (no LM head: no logits are needed), and
    only up to the last chosen layer's attention."""
    decoder = model.get_decoder()  # a PEFT model's too: its adapters are inside the decoder's layers
    bands, spans = [], []
    with torch.no_grad():
        for start in range(0, ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with attention_bands(decoder, layers, width, chunk_size, stop_early=True) as kept:
                try:
                    decoder(input_ids=ids[rows], attention_mask=attention_mask[rows], use_cache=False)
                except _BandsKept:
                    pass
            bands.append(torch.cat([kept.band[layer] for layer in layers], dim=1))
            spans.append(torch.cat([kept.span[layer] for layer in layers], dim=1))
    return torch.cat(bands), torch.cat(spans)


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
    bands, spans = banded_forward(model, ids, attention_mask, layers, width, options.attention_credit_chunk_size,
                                  batch_size)
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


@dataclass
class AttentionCreditConfig:
    """Attention credit's fields of ``TokenGRPOConfig`` (a mixin); the paper's defaults (v2), the open choices as
    fields (``tokens.attention``)."""

    attention_credit_rule: str = field(
        default="coupled",
        metadata={"help": "Attention credit: local_chunk (WAAD jumps), global_anchor (FAI) or coupled (the rhythm).",
                  "choices": list(CREDIT_RULES)},
    )
    attention_credit_layers: list[int] | None = field(
        default=None, metadata={"help": "Attention credit: the layers read. None: 5 evenly spaced in the middle third."}
    )
    attention_credit_window: int = field(default=10, metadata={"help": "Attention credit: WAAD's window W."})
    attention_credit_horizon: list[int] = field(
        default_factory=lambda: [10, 100], metadata={"help": "Attention credit: FAI's horizon [H_lo, H_hi]."}
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
    attention_credit_control: str = field(
        default="none", metadata={"help": "Attention credit: 'random' puts each completion's γ on random tokens of "
                                          "it (the random-signal control).", "choices": list(CREDIT_CONTROLS)},
    )
    attention_credit_control_seed: int = field(default=0, metadata={"help": "Attention credit: the control's seed."})
    attention_credit_alignment: str = field(
        default="input", metadata={"help": "Attention credit: the row of completion token t: 'input' (the row whose "
                                           "input is t) or 'prediction' (the row before, which sampled t).",
                                   "choices": list(CREDIT_ALIGNMENTS)},
    )
    attention_credit_chunk_size: int = field(
        default=128, metadata={"help": "Attention credit: query rows per chunk of the banded attention forward."}
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

    def __init__(self, trainer):
        super().__init__(trainer)
        num_layers = trainer.accelerator.unwrap_model(trainer.model).config.num_hidden_layers
        self.layers = trainer.args.attention_credit_layers or middle_layers(num_layers)

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        trainer, args, output = self.trainer, self.trainer.args, generation.output
        mask = generation.completion_mask
        with disable_gradient_checkpointing(trainer.model, args.gradient_checkpointing_kwargs):
            credit = attention_credit(
                trainer.model, output["prompt_ids"], output["prompt_mask"], output["completion_ids"], mask, args,
                self.layers, batch_size=args.per_device_train_batch_size,
                reduce_sum=lambda totals: trainer.accelerator.reduce(totals, reduction="sum"),
            )
        gamma = credit.gamma
        if args.attention_credit_control == "random":
            gamma = self._shuffled(gamma, mask)
        advantages = output["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(gamma)
        if args.attention_credit_signs != "both":
            applies = advantages > 0 if args.attention_credit_signs == "positive" else advantages < 0
            gamma = torch.where(applies, gamma, 1.0)
        self._log(generation, gamma, mask, credit.waad, credit.fai)
        return {"advantages": advantages * gamma * mask}

    def _shuffled(self, gamma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each row's γ permuted over its completion tokens, seeded by (seed, step, the row's index in the
        generation batch over all processes)."""
        trainer = self.trainer
        seed = hash_seed(trainer.args.attention_credit_control_seed, trainer.state.global_step)
        first = trainer.accelerator.process_index * gamma.size(0)
        rows = [shuffle_within_mask(gamma[i : i + 1].cpu(), mask[i : i + 1].cpu(), row_generator(seed, first + i))
                for i in range(gamma.size(0))]
        return torch.cat(rows).to(gamma.device)

    def _log(self, generation, gamma, mask, waad_values, fai_values) -> None:
        valid = mask.to(gamma.dtype)
        totals = torch.stack([((gamma != 1.0) * valid).sum(), (gamma * valid).sum(), (waad_values * valid).sum(),
                              (fai_values * valid).sum(), valid.sum()])
        totals = self.trainer.accelerator.reduce(totals, reduction="sum")
        metrics = self.trainer._metrics["train" if generation.training else "eval"]
        names = ("credited_frac", "gamma_mean", "waad_mean", "fai_mean")
        for name, total in zip(names, totals[:4].tolist(), strict=True):
            metrics[f"attention_credit/{name}"].append(total / max(totals[4].item(), 1.0))
