"""Attention-derived credit: the preplan-and-anchor rhythm as per-token advantage multipliers (Li et al., "Attention
Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy Optimization", arXiv 2510.13554
v2, Sec. 4.1 and 5.2). Pure and batched; no official code exists, so these docstrings and the tests are the spec.

The signals need, per chosen layer and head, only a band of each causal attention row, never the N × N map::

    band[t, d]  = A[t, t − d]   for d = 0 .. D (0 where t − d < 0)      attention_band (brute force: from full maps)
    span_row[t] = Σ_{s ≤ t} A[t, s] · (t − s)                             a full-row reduction, made as rows are
                                                                          computed (never stored)

From them (R = the response rows, ``mask``; Ā_loc / Ā_glob = the mean band of the local / global head group)::

    d(l,h)  = mean_{t ∈ R} span_row[t]                                    head_spans           (Eq. 7)
    H_loc, H_glob = the 30 % of heads with the smallest / largest d       group_heads          (Eq. 8)
    WAAD_t  = Σ_{s ≤ t} Ā_loc[t, s] · min(t − s, W)                       waad                 (Def. 4.1, W = 10)
            = W − Σ_{d=0}^{W−1} (W − d) · Ā_loc[t, t − d]                 (the rows sum to 1: only d < W is read)
    FAI_s   = mean_{t ∈ R, s + H_lo ≤ t ≤ s + H_hi} Ā_glob[t, s]          fai                  (Def. 4.2, [10, 100])

and the credit rules (Sec. 5.2; TopQ = the ⌈q·n⌉ response tokens of a row with the largest values, q = 0.4, earlier
positions first among ties; γ_amp = 1.5), each a detached ``γ [B, N]`` (1 outside the response)::

    local-chunk     Δ_t = |WAAD_t − WAAD_{t+1}| (0 at the last response token), γ = 1 + (γ_amp − 1)·1{t ∈ TopQ(Δ)}
    global-anchor   γ = 1 + (γ_amp − 1)·1{t ∈ TopQ(FAI)}
    coupled rhythm  D = {t ∈ TopQ(FAI): WAAD_t ≤ τ_waad and max_{u ∈ [t−k, t−1]} Δ_u ≥ τ_Δ}   (locally dominated)
                    I(D) = {argmax_{u ∈ [t−k, t−1]} Δ_u : t ∈ D}                           (their introductions)
                    γ = 1 + (γ_amp − 1)·(1{TopQ(FAI) \\ D} + (1 − α)·1{D} + α·1{I(D)})      (Eq. 19)

The paper leaves τ_waad, τ_Δ, α, k and intro(·) open; the defaults here (the medians of WAAD and Δ over the row's
response tokens, α = 0.5, k = 3, the argmax above) are the third-party ports' choices, each a parameter. Positions
are the rows of the teacher-forced forward over prompt + response; which row stands for response token t (its own,
or the one before, which sampled it) is the caller's choice (``trainers.attention``, ``attention_credit_alignment``).
"""

from __future__ import annotations

import torch

CREDIT_RULES = ("local_chunk", "global_anchor", "coupled")


def attention_band(probs: torch.Tensor, width: int, first_row: int = 0) -> torch.Tensor:
    """``[..., rows, width]`` band of causal attention rows ``[..., rows, N]`` (row i is query position
    ``first_row + i``; a full map: ``first_row = 0``): ``band[..., t, d] = probs[..., t, t − d]``, 0 where
    ``t − d < 0``."""
    rows = torch.arange(first_row, first_row + probs.size(-2), device=probs.device).unsqueeze(1)
    columns = rows - torch.arange(width, device=probs.device)
    band = probs.gather(-1, columns.clamp(min=0).expand(*probs.shape[:-1], width))
    return band * (columns >= 0)


def span_rows(probs: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """``[..., rows]`` the mean attention distance of causal attention rows ``[..., rows, N]`` (row i is query
    position ``first_row + i``): ``Σ_{s ≤ t} A[t, s] · (t − s)`` (what the attention forward reduces each row to)."""
    rows = torch.arange(first_row, first_row + probs.size(-2), device=probs.device).unsqueeze(1)
    distance = (rows - torch.arange(probs.size(-1), device=probs.device)).clamp(min=0)
    return (probs * distance).sum(-1)


def head_spans(rows: torch.Tensor, mask: torch.Tensor, reduce_sum=None) -> torch.Tensor:
    """Head span ``d(l,h)`` (Eq. 7): the mean of ``span_rows`` ``[B, heads, N]`` over the response rows ``mask``
    ``[B, N]``, over the batch's sequences too: ``[heads]`` (the heads are grouped once per batch). ``reduce_sum``
    sums the per-head totals and the row count over processes before the division (None: this batch only)."""
    weights = mask.to(rows.dtype).unsqueeze(1)
    totals = torch.cat([(rows * weights).sum((0, 2)), weights.sum().reshape(1)])
    totals = totals if reduce_sum is None else reduce_sum(totals)
    return totals[:-1] / totals[-1].clamp(min=1.0)


def group_heads(spans: torch.Tensor, fraction: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local, global)`` head indices (Eq. 8): the ``max(1, round(fraction · heads))`` heads with the smallest and
    the largest span (ties: lower index first)."""
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"the head group fraction must be in (0, 0.5], got {fraction}")
    size = max(1, round(fraction * spans.numel()))
    return torch.sort(spans, stable=True).indices[:size], torch.sort(-spans, stable=True).indices[:size]


def waad(band: torch.Tensor, window: int = 10) -> torch.Tensor:
    """WAAD ``[B, N]`` (Def. 4.1) from the local group's mean band ``[B, N, ≥ window]``:
    ``W − Σ_{d=0}^{W−1} (W − d) · band[t, d]`` (= Σ_s A[t, s] · min(t − s, W), the rows summing to 1)."""
    weights = window - torch.arange(window, device=band.device, dtype=band.dtype)
    return window - (band[..., :window] * weights).sum(-1)


def fai(band: torch.Tensor, mask: torch.Tensor, horizon: tuple[int, int] = (10, 100)) -> torch.Tensor:
    """FAI ``[B, N]`` (Def. 4.2) from the global group's mean band ``[B, N, > H_hi]`` and the response rows ``mask``:
    ``FAI_s = mean_{t ∈ R, H_lo ≤ t − s ≤ H_hi} band[t, t − s]`` (0 where no such t)."""
    low, high = horizon
    if not 0 <= low <= high < band.size(-1):
        raise ValueError(f"the FAI horizon must satisfy 0 <= H_lo <= H_hi < band width, got {horizon}")
    n = band.size(1)
    offsets = torch.arange(low, high + 1, device=band.device)  # d = t − s
    rows = torch.arange(n, device=band.device).unsqueeze(1) + offsets  # t = s + d, [N (s), offsets]
    inside = rows < n
    rows = rows.clamp(max=n - 1)
    values = band[:, rows, offsets]  # [B, N, offsets]: band[b, s + d, d]
    weight = mask.to(band.dtype)[:, rows] * inside
    return (values * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)


def top_quantile(values: torch.Tensor, mask: torch.Tensor, quantile: float = 0.4) -> torch.Tensor:
    """``[B, N]`` bool: in each row, the ``⌈quantile · n⌉`` masked positions with the largest values (n = the row's
    masked positions; earlier positions first among equal values)."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"the top quantile must be in [0, 1], got {quantile}")
    valid = mask.bool()
    counts = torch.ceil(valid.sum(-1) * quantile - 1e-9).long()
    keyed = torch.where(valid, values, float("-inf"))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(values.size(-1), device=values.device).expand_as(order))
    return (ranks < counts.unsqueeze(-1)) & valid


def waad_jumps(waad_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Δ_t = |WAAD_t − WAAD_{t+1}|`` ``[B, N]`` over consecutive response positions (0 at a row's last response
    token and outside the response)."""
    valid = mask.bool()
    jumps = torch.zeros_like(waad_values)
    both = valid[:, :-1] & valid[:, 1:]
    jumps[:, :-1] = (waad_values[:, :-1] - waad_values[:, 1:]).abs() * both
    return jumps


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` the lower median of each row's masked values (torch.median's; 0 for an empty row)."""
    masked = torch.where(mask.bool(), values, float("nan"))
    return torch.nanmedian(masked, dim=-1, keepdim=True).values.nan_to_num(0.0)


def credit_multipliers(
    rule: str,
    mask: torch.Tensor,
    waad_values: torch.Tensor | None = None,
    fai_values: torch.Tensor | None = None,
    *,
    quantile: float = 0.4,
    amplification: float = 1.5,
    alpha: float = 0.5,
    lookback: int = 3,
) -> torch.Tensor:
    """The detached credit ``γ [B, N]`` of ``rule`` (module docstring), 1 outside ``mask``. ``local_chunk`` reads
    WAAD, ``global_anchor`` FAI, ``coupled`` both (τ_waad, τ_Δ: the row medians over its response tokens)."""
    if rule not in CREDIT_RULES:
        raise ValueError(f"unknown credit rule {rule!r}; expected one of {CREDIT_RULES}")
    bonus = amplification - 1.0
    valid = mask.bool()
    if rule == "local_chunk":
        chosen = top_quantile(waad_jumps(waad_values, mask), mask, quantile)
        return (1.0 + bonus * chosen).detach()
    anchors = top_quantile(fai_values, mask, quantile)
    if rule == "global_anchor":
        return (1.0 + bonus * anchors).detach()
    jumps = waad_jumps(waad_values, mask)
    n = mask.size(1)
    # the k positions before t: u = t − 1 .. t − k, [B, N, k] (invalid before the start or outside the response)
    before = torch.arange(n, device=mask.device).unsqueeze(1) - torch.arange(1, lookback + 1, device=mask.device)
    in_row = before >= 0
    window = torch.where(in_row & valid[:, before.clamp(min=0)], jumps[:, before.clamp(min=0)], float("-inf"))
    peak, peak_at = window.max(-1)  # the largest jump before t, and where (the first among equals)
    dominated = anchors & (waad_values <= masked_median(waad_values, mask)) & (peak >= masked_median(jumps, mask))
    introductions = torch.zeros_like(valid)
    rows, positions = dominated.nonzero(as_tuple=True)
    introductions[rows, before[positions, peak_at[rows, positions]]] = True
    credited = (anchors & ~dominated).float() + (1 - alpha) * dominated.float() + alpha * introductions.float()
    return (1.0 + bonus * credited).detach()
