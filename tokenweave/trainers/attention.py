"""Attention from the policy, cheaply: one no-grad forward that keeps, for a few layers, only the band of each
attention row that attention-derived credit reads (``tokens.attention``), never the N × N maps.

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

from ..tokens.attention import attention_band, span_rows

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
