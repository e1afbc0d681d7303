"""Rank-GRPO's spans against the sequence-level advantage, on the recommendation task whose relevance rule is known.

Each item of a sampled list is relevant or not by the task's hidden rule (:mod:`tokenweave.data.recommendation`:
the wanted genre and decade, not watched; a hit of :func:`tokenweave.rewards.ranking.relevance_gains` also parses,
is not a repeat and counts once). That is the ground truth a per-item signal can be scored against: an advantage
pushes an item's tokens up when it is positive and down when it is negative, so its sign should be positive on a
relevant item and negative on an irrelevant one. Rank-GRPO gives each rank its own advantage; GRPO gives every item
of a completion the completion's one advantage. The measurement, per ranked item (:func:`rank_sign_agreement`), is
how often each sign agrees with the item's relevance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...data.loading import load_run_dataset
from ...inference.generation import generate_completions
from ...rewards.ranking import causal_rank_rewards, ndcg_at_k, parse_ranked_list, relevance_gains
from ...tokens.ranks import rank_group_advantages
from ...trainers.rank import RankGrpoConfig
from .table import Measurement

TIE = 1e-9
"""``|A| ≤ TIE`` counts as ``A = 0``: the rounding of a group mean of equal rewards (float64 here, about 1e-12 after
the 1e-4 std floor). In float32, as the trainer and TRL compute advantages, such a tie gets a spurious advantage of
about ±5e-4, harmless to a gradient but a coin flip to a sign."""


def _agreement(advantages: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """1 where the advantage's sign agrees with the relevance (+ on relevant, − on irrelevant), 0 where it
    disagrees, 0.5 where the advantage is 0 (within :data:`TIE`)."""
    sign = torch.sign(advantages) * (advantages.abs() > TIE)
    return 0.5 + 0.5 * sign * (2.0 * relevant - 1.0)


def rank_sign_agreement(
    gains: Sequence[Sequence[float]],
    num_relevant: Sequence[int],
    group_size: int,
    num_ranks: int,
    credit: str = RankGrpoConfig.rank_credit,
    scale: str = "group",
) -> list[tuple[float, float]]:
    """One ``(rank agreement, sequence agreement)`` per ranked item of every completion.

    ``gains[i]``: completion i's per-rank hits in rank order (1.0 relevant, 0.0 not: :func:`relevance_gains` of its
    items), ``num_relevant[i]``: the relevant items of its request; rows grouped by prompt, ``group_size``
    consecutive rows per prompt (as TRL orders them). Per-rank and sequence advantages as the trainers compute them
    (``trainers.rank`` and TRL's GRPO with ``reward_funcs: [ndcg]``, ``scale_rewards=scale``)::

        r_{i,k} = causal credit of g_i (credit)     A_{i,k} = (r_{i,k} − mean_group r_{·,k}) / (std r_{·,k} + 1e-4)
        R_i     = NDCG@N(g_i, num_relevant[i])      A_i     = (R_i − mean_group R) / (std R + 1e-4)

    (std: unbiased, over the group; ``scale="none"``: no division; ``num_relevant`` scales a group's NDCG alike, as
    its rows share a request, so it moves no sign: it makes R_i GRPO's reward). For each rank k < min(len(g_i), N)
    (items past N have no rank advantage, a completion with fewer items has fewer units), with ``a(A) = 1`` if
    ``A > 0`` on a relevant item or ``A < 0`` on an irrelevant one, ``0`` for the opposite sign and ``0.5`` for
    ``A = 0`` (no direction: a coin flip), the unit is ``(a(A_{i,k}), a(A_i))``.

    What it can show: how often each advantage pushes an item in the direction the task's rule says it should. What
    it cannot: with ``credit="exp_inf"`` (the default, the released checkpoints) ``r_{i,k} = g_{i,k}``, so a
    relevant item never gets a negative rank advantage nor an irrelevant one a positive: the rank agreement is 1,
    or 0.5 where the whole group has the same hit at that rank. There the test mostly measures how often the
    sequence-level advantage contradicts an item (a relevant item in a below-average list, an irrelevant one in an
    above-average list); only with ``"log_decay"`` (a rank also earns the later ranks' hits) can the rank signal
    itself disagree. It says nothing of the advantages' sizes, of the trainer's length shaping (EOS and overflow
    terms, not an item's), of the spans' token boundaries (``tests/test_rank_grpo.py``) or of whether training
    improves the lists (``benchmarks/rank_grpo_accuracy.py``).
    """
    if len(gains) != len(num_relevant):
        raise ValueError(f"{len(gains)} rows of gains but {len(num_relevant)} of num_relevant")
    rewards = torch.tensor([causal_rank_rewards(g, num_ranks, credit) for g in gains], dtype=torch.float64)
    ndcg = torch.tensor([[ndcg_at_k(g, r, num_ranks)] for g, r in zip(gains, num_relevant, strict=True)],
                        dtype=torch.float64)
    hits = torch.tensor([(list(g) + [0.0] * num_ranks)[:num_ranks] for g in gains], dtype=torch.float64) > 0
    rank_agree = _agreement(rank_group_advantages(rewards, group_size, scale), hits)
    sequence_agree = _agreement(rank_group_advantages(ndcg, group_size, scale), hits)  # [N, 1] against [N, N_ranks]
    return [
        pair
        for row, g in enumerate(gains)
        for pair in zip(rank_agree[row, : len(g)].tolist(), sequence_agree[row, : len(g)].tolist(), strict=True)
    ]


def rank_evidence(
    model,
    tokenizer,
    *,
    seeds: Sequence[int],
    num_requests: int = 64,
    num_samples_per_prompt: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    credit: str = RankGrpoConfig.rank_credit,
    batch_size: int = 16,
) -> Measurement:
    """:func:`rank_sign_agreement` on the model's own lists: for each seed, the first ``num_requests`` requests of the
    recommendation test split drawn with that seed, ``num_samples_per_prompt`` completions each (the chat template,
    sampling at ``temperature``, ``max_new_tokens``; the defaults: ``configs/rank_grpo_smollm2_lora.yaml``), their
    items parsed as the trainer parses them and scored against the request's relevant and watched movies (N: the
    request's ``list_length``)."""
    measurement = Measurement(
        signal=f"Rank-GRPO spans ({credit} credit)",
        measurement="sign of the item's advantage agrees with its relevance",
        control="the completion's sequence-level advantage (GRPO)",
        unit="ranked items",
    )
    tokenizer.padding_side = "left"
    for seed in seeds:
        rows = load_run_dataset("recommendation", "test", "grpo", num_examples=num_requests, seed=seed)
        completions = generate_completions(
            model, tokenizer, rows["prompt"], batch_size=batch_size, max_new_tokens=max_new_tokens,
            num_samples=num_samples_per_prompt, temperature=temperature, seed=seed,
            desc=f"sampling lists (seed {seed})",
        )
        for row, texts in zip(rows, completions, strict=True):
            n = row["list_length"]
            gains = [
                relevance_gains([item.text for item in parse_ranked_list(text)][:n], row["relevant_items"],
                                row["history_items"])
                for text in texts
            ]
            units = rank_sign_agreement(gains, [len(row["relevant_items"])] * len(texts), len(texts), n, credit)
            for rank_value, sequence_value in units:
                measurement.add(seed, rank_value, sequence_value)
    return measurement
