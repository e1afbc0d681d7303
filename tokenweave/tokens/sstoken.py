"""ssToken's token score: self-modulated excess loss and semantic attention (Qin et al., ICLR 2026, arXiv 2510.18250).

As the released code computes it (``scripts/finetune.py``, ``filter_tokens_with_attention_loss``), per sequence, over
its response tokens ``t``::

    REL_t  = log π_θ(y_t) − log π_his(y_t)                 (the history model's loss minus the current one's)
    REL'_t = (REL_t − min REL) / (max REL − min REL)       min-max within the sequence (0 when all equal)
    Attn_t = Σ_{s < prompt} mean_heads A_{t, s}            one layer's attention of token t (as the query) on the
                                                           prompt's positions: in [0, 1], not normalised further
    score  = γ · REL'_t + (1 − γ) · Attn_t                 γ = 0.5; keep the ⌈ρ·n⌉ highest (ρ = 0.6)

The attention reduction (:func:`prompt_attention_reduction`) runs inside the attention layer, a chunk of query rows at a
time (``tokenweave.models.attention``): no attention map is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor


def minmax_per_row(values: Tensor, mask: Tensor) -> Tensor:
    """Each row's values over ``mask`` scaled to [0, 1] (``(v − min) / (max − min)``; 0 where max = min); 0 outside
    ``mask``."""
    valid = mask.bool()
    low = values.masked_fill(~valid, torch.inf).amin(dim=-1, keepdim=True)
    high = values.masked_fill(~valid, -torch.inf).amax(dim=-1, keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, (values - low) / spread.clamp(min=torch.finfo(values.dtype).tiny), 0.0)
    return torch.where(valid, scaled, 0.0)


def sstoken_scores(excess: Tensor, prompt_attention: Tensor, mask: Tensor, gamma: float = 0.5) -> Tensor:
    """``γ · minmax(REL) + (1 − γ) · Attn`` per token (module docstring); 0 outside ``mask``."""
    combined = gamma * minmax_per_row(excess, mask) + (1 - gamma) * prompt_attention
    return torch.where(mask.bool(), combined, 0.0)


def prompt_attention_reduction(prompt_lengths: Tensor):
    """A reduction for ``tokenweave.models.attention.reduced_forward``: each query row's attention mass on the
    prompt's keys (positions ``< prompt_lengths[b]``), ``[B, heads, rows]``."""

    def reduce(probs: Tensor, first_row: int) -> tuple[Tensor, ...]:
        keys = torch.arange(probs.size(-1), device=probs.device)
        on_prompt = (keys[None, :] < prompt_lengths.to(probs.device)[:, None]).to(probs.dtype)  # [B, N]
        return ((probs * on_prompt[:, None, None, :]).sum(-1),)

    return reduce
