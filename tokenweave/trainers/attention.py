"""Attention-derived credit as a token signal (Li et al., arXiv 2510.13554, the preplan-and-anchor rhythm), and the
attention forward it needs: one no-grad forward that keeps, for a few layers, only the band of each attention row
that the credit reads (``tokens.attention``), never the N × N maps.

The signal ``attention_credit`` (:class:`AttentionCreditSignal`), after each generation: the policy that sampled
(π_old, with its adapter) runs once over prompt + completion inside :func:`attention_bands` (the chosen layers: 5
evenly spaced in the middle third by default); the heads of those layers are grouped by span (30 % local, 30 %
global, over the response rows of the whole generation batch, all processes), WAAD comes from the local group's mean band, FAI from the global group's,
and the credit rule gives γ per completion token (row t of the forward = the state at completion token t). The
advantages become ``A · γ`` (``[B, T]``), for both signs by default (v2), so every registered policy loss (and TRL's
``loss_type`` path) takes them. ``attention_credit_control: random`` puts each row's γ on random completion tokens
(the same values, so the same share credited: ``tokens.controls.shuffle_within_mask``). Logged:
``attention_credit/credited_frac``, ``attention_credit/gamma_mean``, ``attention_credit/waad_mean``,
``attention_credit/fai_mean`` (over the completion tokens of all processes).

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

from ..tokens.attention import (
    CREDIT_RULES,
    attention_band,
    credit_multipliers,
    fai,
    group_heads,
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
    band: dict[int, torch.Tensor] = field(default_factory=dict)
    span: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[AttentionBands | None] = ContextVar("tokenweave_attention_bands", default=None)


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
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, banded_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@contextmanager
def attention_bands(model, layers, width: int, chunk_size: int = 128):
    """While open, forwards of ``model`` keep :class:`AttentionBands` of ``layers`` (yielded; module docstring)."""
    bands = AttentionBands(frozenset(layers), width, chunk_size)
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
    attention_credit_chunk_size: int = field(
        default=128, metadata={"help": "Attention credit: query rows per chunk of the banded attention forward."}
    )


@register_token_signal("attention_credit")
class AttentionCreditSignal(TokenSignal):
    """Attention-derived credit (module docstring)."""

    @classmethod
    def configure(cls, args, requested: bool) -> bool:
        if not requested:
            return False
        low, high = args.attention_credit_horizon
        choices = (("attention_credit_rule", CREDIT_RULES), ("attention_credit_signs", CREDIT_SIGNS),
                   ("attention_credit_control", CREDIT_CONTROLS))
        for name, allowed in choices:
            if getattr(args, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(args, name)!r}")
        if not (args.attention_credit_window >= 1 and 0 <= low <= high):
            raise ValueError("attention_credit_window must be >= 1 and attention_credit_horizon 0 <= H_lo <= H_hi")
        if args.attention_credit_amplification <= 0 or not 0 <= args.attention_credit_alpha <= 1:
            raise ValueError("attention_credit_amplification must be > 0 and attention_credit_alpha in [0, 1]")
        return True

    def __init__(self, trainer):
        super().__init__(trainer)
        args = trainer.args
        num_layers = trainer.accelerator.unwrap_model(trainer.model).config.num_hidden_layers
        self.layers = args.attention_credit_layers or middle_layers(num_layers)
        self.width = max(args.attention_credit_window, args.attention_credit_horizon[1] + 1)

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        args, output = self.trainer.args, generation.output
        mask = generation.completion_mask
        prompt_length = output["prompt_ids"].size(1)
        full_mask = torch.cat([torch.zeros_like(output["prompt_mask"]), mask], dim=1)
        bands, spans = self._attention(output)
        local, glob = group_heads(self._head_spans(spans, full_mask), args.attention_credit_head_fraction)
        waad_values = waad(bands[:, local].mean(1), args.attention_credit_window)
        fai_values = fai(bands[:, glob].mean(1), full_mask, tuple(args.attention_credit_horizon))
        gamma = credit_multipliers(
            args.attention_credit_rule, full_mask, waad_values, fai_values, quantile=args.attention_credit_quantile,
            amplification=args.attention_credit_amplification, alpha=args.attention_credit_alpha,
            lookback=args.attention_credit_lookback,
        )[:, prompt_length:]
        if args.attention_credit_control == "random":
            gamma = self._shuffled(gamma, mask)
        advantages = output["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(gamma)
        if args.attention_credit_signs != "both":
            applies = advantages > 0 if args.attention_credit_signs == "positive" else advantages < 0
            gamma = torch.where(applies, gamma, 1.0)
        self._log(generation, gamma, mask, waad_values[:, prompt_length:], fai_values[:, prompt_length:])
        return {"advantages": advantages * gamma * mask}

    def _attention(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        """Bands ``[B, layers·heads, N, width]`` and row spans ``[B, layers·heads, N]`` of π_old over prompt +
        completion (no gradient; micro-batches of the per-device batch size)."""
        trainer = self.trainer
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        size = trainer.args.per_device_train_batch_size
        bands, spans = [], []
        with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
            for start in range(0, ids.size(0), size):
                rows = slice(start, start + size)
                with attention_bands(trainer.model, self.layers, self.width,
                                     trainer.args.attention_credit_chunk_size) as kept:
                    trainer.model(input_ids=ids[rows], attention_mask=attention_mask[rows], use_cache=False)
                bands.append(torch.cat([kept.band[layer] for layer in self.layers], dim=1))
                spans.append(torch.cat([kept.span[layer] for layer in self.layers], dim=1))
        return torch.cat(bands), torch.cat(spans)

    def _head_spans(self, spans: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Head spans ``[layers·heads]`` over the response rows of the whole generation batch (every process), so
        the head groups, and with them γ, do not depend on how the batch is split over processes."""
        weights = mask.to(spans.dtype).unsqueeze(1)
        totals = torch.cat([(spans * weights).sum((0, 2)), weights.sum().reshape(1)])
        totals = self.trainer.accelerator.reduce(totals, reduction="sum")
        return totals[:-1] / totals[-1].clamp(min=1.0)

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
