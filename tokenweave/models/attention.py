"""Attention reduced as it is computed: a forward that keeps, for a few layers, only what a caller's reduction makes of
each chunk of attention rows, never the N × N maps. Attention credit keeps a band of each row and its span
(``trainers.attention``); ssToken would keep each response row's attention mass on the prompt.

``with reduced_attention(model, layers, reduce) as kept: model(input_ids, attention_mask=...)`` runs the model's
forward with the attention implementation ``tokenweave_reduced`` (registered with transformers'
``AttentionInterface`` and, for its masks, ``AttentionMaskInterface`` as eager's additive masks): in the chosen
``layers`` it computes the attention probabilities in chunks of ``chunk_size`` query rows, as eager attention does
(float32 softmax, grouped key/value heads repeated), and hands each chunk at once to ``reduce(probs, first_row)``
(``probs`` ``[B, heads, rows, N]``; ``first_row`` the chunk's first query row), which returns a tuple of tensors
``[B, heads, rows, ...]``; ``kept.outputs[layer]`` is that tuple, each concatenated over the chunks (dim 2). Every
other layer runs sdpa. So the memory of a chosen layer is ``heads · chunk_size · N`` while it runs, plus what the
reduction keeps. The model's own implementation is restored on exit. Works on the module that holds the config (a
PEFT model's base model too: the adapters are in its linear layers), and, under ZeRO-3, through the ordinary forward
that gathers each layer's parameters. :func:`reduced_forward` runs the decoder only (no LM head), in micro-batches,
up to the last chosen layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

IMPLEMENTATION = "tokenweave_reduced"

Reduction = Callable[[Tensor, int], tuple[Tensor, ...]]
"""``reduce(probs [B, heads, rows, N] float32, first_row) -> tensors [B, heads, rows, ...]``."""


@dataclass
class ReducedAttention:
    """What the reduced forward keeps, by layer index: ``outputs[layer]``, the reduction's tensors over all rows."""

    layers: frozenset[int]
    reduce: Reduction
    chunk_size: int = 128
    stop_early: bool = False  # end the forward once the last chosen layer's outputs are kept (reduced_forward)
    outputs: dict[int, tuple[Tensor, ...]] = field(default_factory=dict)


_ACTIVE: ContextVar[ReducedAttention | None] = ContextVar("tokenweave_reduced_attention", default=None)


class _OutputsKept(Exception):
    """Raised by the last chosen layer's attention when ``stop_early``: the layers after it are not needed."""


def _repeat_heads(states: Tensor, groups: int) -> Tensor:
    """Grouped key / value heads ``[B, kv_heads, N, D]`` repeated to the query heads (eager attention's repeat_kv)."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def reduced_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``tokenweave_reduced`` attention (module docstring): eager attention in row chunks, each reduced, in the
    active :class:`ReducedAttention`'s layers; sdpa elsewhere (and outside :func:`reduced_attention`)."""
    active = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if active is None or layer not in active.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.size(1) // key.size(1)
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    outputs, reduced = [], []
    for start in range(0, query.size(2), active.chunk_size):
        stop = min(start + active.chunk_size, query.size(2))
        scores = torch.matmul(query[:, :, start:stop], key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, start:stop, : key.size(2)]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        outputs.append(torch.matmul(probs.to(value.dtype), value))
        reduced.append(active.reduce(probs, start))
    active.outputs[layer] = tuple(torch.cat(parts, dim=2) for parts in zip(*reduced, strict=True))
    if active.stop_early and len(active.outputs) == len(active.layers):
        raise _OutputsKept
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, reduced_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@contextmanager
def reduced_attention(model, layers: Sequence[int], reduce: Reduction, chunk_size: int = 128,
                      stop_early: bool = False):
    """While open, forwards of ``model`` keep :class:`ReducedAttention` of ``layers`` (yielded; module docstring);
    ``stop_early``: the last chosen layer's attention ends the forward (:func:`reduced_forward` catches it)."""
    active = ReducedAttention(frozenset(layers), reduce, chunk_size, stop_early)
    configs = [module.config for module in model.modules()
               if hasattr(getattr(module, "config", None), "_attn_implementation")]
    previous = [config._attn_implementation for config in configs]
    token = _ACTIVE.set(active)
    try:
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield active
    finally:
        _ACTIVE.reset(token)
        for config, implementation in zip(configs, previous, strict=True):
            config._attn_implementation = implementation


def reduced_forward(model, ids: Tensor, attention_mask: Tensor, layers: Sequence[int], reduce: Reduction,
                    chunk_size: int, batch_size: int) -> tuple[Tensor, ...]:
    """The reduction's tensors of ``model`` over ``ids``, ``layers`` concatenated along the heads (dim 1) in the
    order given and micro-batches of ``batch_size`` rows along dim 0 (no gradient). Only the decoder runs (no LM
    head: no logits are needed), and only up to the last chosen layer's attention."""
    decoder = model.get_decoder()  # a PEFT model's too: its adapters are inside the decoder's layers
    batches = []
    with torch.no_grad():
        for start in range(0, ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with reduced_attention(decoder, layers, reduce, chunk_size, stop_early=True) as kept:
                try:
                    decoder(input_ids=ids[rows], attention_mask=attention_mask[rows], use_cache=False)
                except _OutputsKept:
                    pass
            batches.append(tuple(torch.cat(parts, dim=1) for parts in zip(*(kept.outputs[layer] for layer in layers),
                                                                          strict=True)))
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))
