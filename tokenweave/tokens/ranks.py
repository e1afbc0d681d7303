"""Rank-GRPO's token signals (Zhu et al. 2025, arXiv 2510.20150): the rank of every completion token, per-rank
advantages and the rank-level importance ratio. Pure and batched; the trainer side is ``trainers.rank``.

A ranked-list answer is split into items by a parser (``rewards.ranking``: one item per non-blank line by default)
that returns each item's first character. The tokens get their rank from their character offsets in the decoded
completion, so the split is exact for any tokenizer (an item spread over several tokens, a newline merged into a
token such as ``")\\n"`` or ``"\\nThe"``)::

    c_i       = len(decode(ids[:i]))                     the first character of token i
    rank(i)   = #{item starts s_k ≤ c_i} − 1, at least 0   a token belongs to the last item started at or before
                                                         its first character: the newline ending item k is item
                                                         k's (as the released code's newline counter), EOS (no
                                                         characters) the last item's
    rank(i) ≥ N → N                                      the overflow bin: every token past the N-th item

The reward of rank k is computed on the same parse (``rewards.ranking``), so a malformed line costs its own rank
and never shifts the rewards of the others (the released code's reward index skips lines that do not parse while
its span index counts them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def decode_completion(tokenizer, token_ids: Sequence[int]) -> str:
    """The completion's text as TRL's reward functions see it (special tokens skipped, spaces not cleaned up)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def token_ranks(tokenizer, token_ids: Sequence[int], item_starts: Sequence[int], num_ranks: int) -> list[int]:
    """Rank (0-based) of each token of a completion (module docstring): the last item whose first character
    ``item_starts[k]`` (ascending, in :func:`decode_completion`'s text) is at or before the token's first character
    ``c_i = len(decode(ids[:i]))``, 0 before the first item, ``num_ranks`` (overflow) from item ``num_ranks`` on.

    ``c_i`` grows with ``i``, so the first token of each item is found by bisection over prefix decodes
    (O(N log T) decodes, not T). A prefix that ends inside a multi-byte character may read one character long;
    an item start follows a newline, which no multi-byte character contains, so no rank moves.
    """
    ids = list(token_ids)

    def first_char(i: int) -> int:
        return len(decode_completion(tokenizer, ids[:i]))

    first_tokens, low = [], 0
    for start in item_starts[1 : num_ranks + 1]:
        high = len(ids)
        while low < high:
            middle = (low + high) // 2
            if first_char(middle) >= start:
                high = middle
            else:
                low = middle + 1
        first_tokens.append(low)
    return torch.searchsorted(torch.tensor(first_tokens, dtype=torch.long), torch.arange(len(ids)), right=True).tolist()


def rank_ids_tensor(ranks: Sequence[Sequence[int]], width: int, device=None) -> torch.Tensor:
    """``[B, width]`` long tensor of each row's token ranks, 0 past its tokens (masked out by the completion mask)."""
    out = torch.zeros(len(ranks), width, dtype=torch.long)
    for row, values in enumerate(ranks):
        out[row, : len(values)] = torch.tensor(list(values), dtype=torch.long)
    return out.to(device)


def rank_group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", epsilon: float = 1e-4
) -> torch.Tensor:
    """Per-rank group advantages ``[N_total, N]`` from per-rank rewards ``[N_total, N]`` (rows grouped by prompt,
    ``group_size`` consecutive rows per prompt, as TRL orders them). For every rank k separately (Rank-GRPO, Eq. 6;
    TRL's ``scale_rewards`` applied per rank)::

        A_{i,k} = (r_{i,k} − mean_{group(i)} r_{·,k}) / (std r_{·,k} + 1e-4)

    ``scale``: ``"group"`` (std over the group, torch's unbiased std, the released code and TRL's default),
    ``"batch"`` (std over all rows), ``"none"`` (no division). Call it on the rewards of every process (a group
    may span processes) and keep this process's rows.
    """
    if rewards.size(0) % group_size:
        raise ValueError(f"{rewards.size(0)} rows do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size, rewards.size(1))
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view_as(rewards)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape_as(rewards) if group_size > 1 else None
    elif scale == "batch":
        std = rewards.std(dim=0, keepdim=True) if rewards.size(0) > 1 else None
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred if std is None else centred / (std + epsilon)


def rank_log_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, rank_ids: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """Rank-level log importance ratio ``[B, T]`` (Rank-GRPO's ``importance_sampling_level="item"``): the mean of the
    token log-ratios over the masked tokens of each rank's span (the overflow bin ``num_ranks`` one more span),
    broadcast back to the span's tokens; the gradient flows through the mean (no stop-gradient)::

        log w_{i,k} = Σ_{t ∈ span(i,k)} (logp_t − old_logp_t) · m_t / max(Σ_{t ∈ span(i,k)} m_t, 1)

    With a single span per completion this is GSPO's sequence-level ratio (``losses.policy.importance_ratio``).
    """
    mask = mask.to(logps.dtype)
    bins = rank_ids.clamp(0, num_ranks)
    log_ratio = (logps - old_logps) * mask
    sums = torch.zeros(logps.size(0), num_ranks + 1, dtype=logps.dtype, device=logps.device)
    counts = torch.zeros_like(sums)
    sums = sums.scatter_add(1, bins, log_ratio)
    counts = counts.scatter_add(1, bins, mask)
    return (sums / counts.clamp(min=1.0)).gather(1, bins)
