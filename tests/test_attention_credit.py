"""Attention-derived credit (arXiv 2510.13554): the banded WAAD / FAI / head spans against brute force on full random
causal maps, and each credit rule against γ worked out by hand."""

import pytest
import torch

from tokenweave.tokens.attention import (
    attention_band,
    credit_multipliers,
    fai,
    group_heads,
    head_spans,
    span_rows,
    top_quantile,
    waad,
    waad_jumps,
)


def causal_maps(batch=2, heads=5, n=130, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, n, n, generator=generator, dtype=torch.float64) * 2
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def response_mask(batch, n, prompt_lengths):
    return (torch.arange(n) >= torch.tensor(prompt_lengths).unsqueeze(1)).long()


# Brute force, straight from the definitions (full N × N maps, loops).
def waad_brute(maps, window):
    b, n = maps.size(0), maps.size(-1)
    out = torch.zeros(b, n, dtype=maps.dtype)
    for t in range(n):
        for s in range(t + 1):
            out[:, t] += maps[:, t, s] * min(t - s, window)
    return out


def fai_brute(maps, mask, low, high):
    b, n = maps.size(0), maps.size(-1)
    out = torch.zeros(b, n, dtype=maps.dtype)
    for row in range(b):
        for s in range(n):
            targets = [t for t in range(s + low, min(n - 1, s + high) + 1) if mask[row, t]]
            if targets:
                out[row, s] = sum(maps[row, t, s] for t in targets) / len(targets)
    return out


def span_brute(maps, mask):
    b, h, n = maps.shape[:3]
    totals, count = torch.zeros(h, dtype=maps.dtype), 0
    for row in range(b):
        for t in range(n):
            if mask[row, t]:
                count += 1
                totals += sum(maps[row, :, t, s] * (t - s) for s in range(t + 1))
    return totals / count


def test_banded_signals_equal_brute_force_on_random_causal_maps():
    maps = causal_maps()
    b, h, n = maps.shape[:3]
    mask = response_mask(b, n, [7, 20])
    band = attention_band(maps, 101)  # d = 0 .. 100: WAAD's W = 10 and FAI's H_hi = 100
    assert band.shape == (b, h, n, 101)
    torch.testing.assert_close(head_spans(span_rows(maps), mask), span_brute(maps, mask), atol=1e-5, rtol=0)
    local = band[:, :2].mean(1)
    torch.testing.assert_close(waad(local, 10), waad_brute(maps[:, :2].mean(1), 10), atol=1e-5, rtol=0)
    glob = band[:, 3:].mean(1)
    torch.testing.assert_close(fai(glob, mask, (10, 100)), fai_brute(maps[:, 3:].mean(1), mask, 10, 100),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(fai(glob, mask, (0, 3)), fai_brute(maps[:, 3:].mean(1), mask, 0, 3), atol=1e-5, rtol=0)


def test_head_groups():
    local, glob = group_heads(torch.tensor([3.0, 1.0, 7.0, 2.0, 9.0, 1.0, 5.0, 4.0, 8.0, 6.0]), 0.3)
    assert local.tolist() == [1, 5, 3] and glob.tolist() == [4, 8, 2]
    with pytest.raises(ValueError, match="fraction"):
        group_heads(torch.ones(4), 0.8)


def test_top_quantile_and_jumps_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    values = torch.tensor([[9.0, 1.0, 3.0, 3.0, 0.0, 2.0]])
    assert top_quantile(values, mask, 0.4).tolist() == [[False, False, True, True, False, False]]  # ⌈0.4·5⌉ = 2
    assert top_quantile(values, mask, 0.5).tolist() == [[False, False, True, True, False, True]]  # ⌈2.5⌉ = 3
    torch.testing.assert_close(waad_jumps(values, mask), torch.tensor([[0.0, 2.0, 0.0, 3.0, 2.0, 0.0]]))


def test_local_chunk_and_global_anchor_credit_by_hand():
    mask = torch.ones(1, 5)
    # Δ = [1, 2, 0, 1, 0]: the top ⌈0.4·5⌉ = 2 are position 1 (2) and, of the ties at 1, the earlier one (0)
    gamma = credit_multipliers("local_chunk", mask, waad_values=torch.tensor([[0.0, 1.0, 3.0, 3.0, 2.0]]))
    torch.testing.assert_close(gamma, torch.tensor([[1.5, 1.5, 1.0, 1.0, 1.0]]))
    gamma = credit_multipliers("global_anchor", mask, fai_values=torch.tensor([[0.1, 0.5, 0.2, 0.4, 0.3]]))
    torch.testing.assert_close(gamma, torch.tensor([[1.0, 1.5, 1.0, 1.5, 1.0]]))


def test_coupled_credit_by_hand():
    # WAAD [5, 1, 6, 2, 2, 7] → Δ [4, 5, 4, 0, 5, 0]; τ_waad = median WAAD = 2 (lower median), τ_Δ = median Δ = 4.
    # Anchors: the top ⌈0.4·6⌉ = 3 of FAI, positions 3, 4, 5.
    #   3: WAAD 2 ≤ 2 and max Δ over [0, 2] = 5 ≥ 4 → dominated; its introduction: argmax = position 1
    #   4: WAAD 2 ≤ 2 and max Δ over [1, 3] = 5 ≥ 4 → dominated; introduction position 1 again
    #   5: WAAD 7 > 2 → an anchor not dominated: γ = 1.5
    # dominated: 1 + 0.5·(1 − α) = 1.25; introduction: 1 + 0.5·α = 1.25 (α = 0.5)
    mask = torch.ones(1, 6)
    waad_values = torch.tensor([[5.0, 1.0, 6.0, 2.0, 2.0, 7.0]])
    fai_values = torch.tensor([[0.0, 0.1, 0.2, 0.9, 0.8, 0.7]])
    gamma = credit_multipliers("coupled", mask, waad_values, fai_values)
    torch.testing.assert_close(gamma, torch.tensor([[1.0, 1.25, 1.0, 1.25, 1.25, 1.5]]))
    to_introductions = credit_multipliers("coupled", mask, waad_values, fai_values, alpha=1.0)
    torch.testing.assert_close(to_introductions, torch.tensor([[1.0, 1.5, 1.0, 1.0, 1.0, 1.5]]))
    # outside the response γ = 1: the same values behind a prompt of 2 positions
    prompt = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    padded = credit_multipliers("coupled", prompt, torch.cat([torch.zeros(1, 2), waad_values], 1),
                                torch.cat([torch.ones(1, 2), fai_values], 1))
    torch.testing.assert_close(padded[:, 2:], gamma)
    assert padded[:, :2].eq(1.0).all()
    with pytest.raises(ValueError, match="credit rule"):
        credit_multipliers("nope", mask)
