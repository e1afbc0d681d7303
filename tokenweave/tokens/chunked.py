"""The masked-position chunk map: a per-position function of ``[N, ...]`` inputs, over the masked positions of
``[B, T, ...]`` tensors, a chunk of positions at a time.

Code that applies LM heads itself (TDPO's full-vocabulary KL, :func:`tokenweave.losses.preference.chunked_sequential_kl`;
the critical-token scores, :func:`tokenweave.tokens.critical.chunked_contrastive_scores`) maps ``[chunk, H]`` hidden
states to ``[chunk, V]`` logits and reduces them to one number per position; chunking keeps the peak memory at a few
``[chunk, V]`` fp32 tensors instead of ``[B, T, V]`` logits. The machinery lives here and the math in the callers
(the split of Liger-Kernel's chunked losses, ``chunked_loss/fused_linear_preference.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def map_masked_chunks(
    fn: Callable[..., Tensor],
    per_position: Sequence[Tensor],
    mask: Tensor,
    *,
    chunk_size: int,
    num_chunks: int | None = None,
    checkpoint_chunks: bool = False,
) -> Tensor:
    """``out[mask] = fn(*chunk)`` for chunks of the masked positions, 0 elsewhere → fp32 ``[B, T]``.

    ``per_position`` are ``[B, T, ...]`` tensors (hidden states, targets) that share ``mask``'s ``[B, T]``. The
    positions where ``mask`` is set are flattened (row-major, as ``tensor[mask]``) and split into chunks of
    ``chunk_size``; ``fn`` gets the same chunk of each tensor (``[n, ...]``) and returns ``[n]`` values.

    ``checkpoint_chunks``: each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), so what ``fn`` builds
    inside (``[n, V]`` logits) is freed after the forward and recomputed in the backward: ``fn`` runs twice per
    chunk when a gradient flows. ``num_chunks`` (at least the number of chunks needed) pads with empty chunks, so
    that the number of ``fn`` calls does not depend on the data: under DeepSpeed ZeRO-3 every call of an LM head
    module gathers sharded weights collectively, and all processes must make the same calls.
    """
    mask = mask.bool()
    flat = [tensor[mask] for tensor in per_position]  # [N, ...], N = number of masked positions
    chunks = [list(tensor.split(chunk_size)) for tensor in flat]
    if num_chunks is not None:
        if num_chunks < len(chunks[0]):
            raise ValueError(f"num_chunks={num_chunks} is less than the {len(chunks[0])} chunks needed.")
        chunks = [
            tensor_chunks + [tensor[:0]] * (num_chunks - len(tensor_chunks))
            for tensor, tensor_chunks in zip(flat, chunks, strict=True)
        ]
    results = [
        checkpoint(fn, *chunk, use_reentrant=False) if checkpoint_chunks else fn(*chunk)
        for chunk in zip(*chunks, strict=True)
    ]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if results:
        out[mask] = torch.cat(results)
    return out
