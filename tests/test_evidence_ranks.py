"""Rank-GRPO's spans against the sequence-level advantage (tokenweave.pipelines.evidence.ranks): the sign agreement of
each ranked item's advantage with its relevance, computed by hand, its ties, its units, and the model-level run."""

import inspect
import math
import statistics

import pytest
import torch

from tokenweave.data.loading import load_run_dataset
from tokenweave.models import build_tiny_llama, build_tiny_tokenizer
from tokenweave.pipelines.evidence import ranks
from tokenweave.pipelines.evidence.ranks import rank_evidence, rank_sign_agreement
from tokenweave.rewards.ranking import RANK_CREDITS, causal_rank_rewards, ndcg_at_k, parse_ranked_list
from tokenweave.tokens.ranks import rank_group_advantages

D2, D3 = 1 / math.log2(3), 1 / math.log2(4)  # DCG discounts of ranks 2 and 3 (rank 1: 1)

# One group of 3 completions, N = 3, 3 relevant items in the request: completion 1 lists 2 items, completion 2 lists
# 4 (its relevant 4th item is overflow: no unit, no reward).
GAINS = [[1.0, 0.0, 1.0], [0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
REWARDS = {  # r_{i,k} written out from the credit rules
    "exp_inf": [[1, 0, 1], [0, 1, 0], [0, 0, 0]],  # r_k = g_k
    "log_decay": [[1 + D3, D3, D3], [D2, D2, 0], [0, 0, 0]],  # r_k = Σ_{j≥k} g_j / log2(j + 1)
}
IDEAL = 1 + D2 + D3  # IDCG@3 of 3 relevant items
NDCG = [(1 + D3) / IDEAL, D2 / IDEAL, 0.0]
# The signs, by hand. NDCG: (0.704, 0.296, 0), mean 1/3: completion 0 above, 1 and 2 below.
# exp_inf ranks: (1, 0, 0), (0, 1, 0), (1, 0, 0): every hit above its rank's mean, every miss below.
# log_decay ranks: (1.5, 0.63, 0) mean 0.71; (0.5, 0.63, 0) mean 0.38: completion 0's miss at rank 1 is above it.
EXPECTED = {
    #             c0: hit, miss, hit        c1: miss, hit        c2: three misses
    "exp_inf": [(1, 1), (1, 0), (1, 1), (1, 1), (1, 0), (1, 1), (1, 1), (1, 1)],
    "log_decay": [(1, 1), (0, 0), (1, 1), (1, 1), (1, 0), (1, 1), (1, 1), (1, 1)],
}


def group_advantages(values, scale):
    """(v − mean) / (unbiased std + 1e-4), or v − mean: in exact fractions, so equal values give exactly 0."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / (std + 1e-4) if scale == "group" else v - mean for v in values]


def agreement(advantage, relevant):
    return 0.5 if advantage == 0 else float((advantage > 0) == relevant)


def test_the_default_credit_is_the_trainers():
    # configs/rank_grpo_smollm2_lora.yaml and RankGrpoConfig: exp_inf
    assert inspect.signature(rank_sign_agreement).parameters["credit"].default == "exp_inf"
    assert inspect.signature(rank_evidence).parameters["credit"].default == "exp_inf"
    assert set(EXPECTED) == set(RANK_CREDITS)


@pytest.mark.parametrize("credit", RANK_CREDITS)
@pytest.mark.parametrize("scale", ["group", "none"])
def test_agreement_by_hand(credit, scale):
    rank_advantages = [group_advantages(column, scale) for column in zip(*REWARDS[credit], strict=True)]  # [k][i]
    sequence_advantages = group_advantages(NDCG, scale)
    expected = [
        (agreement(rank_advantages[k][i], hit == 1.0), agreement(sequence_advantages[i], hit == 1.0))
        for i, gains in enumerate(GAINS)
        for k, hit in enumerate(gains[:3])
    ]
    assert expected == EXPECTED[credit]  # the hand reasoning above and the formula agree
    assert rank_sign_agreement(GAINS, [3, 3, 3], 3, 3, credit, scale) == EXPECTED[credit]


def test_a_rank_where_the_whole_group_has_the_same_hit_is_a_coin_flip():
    # Group 0 (2 relevant): rank 0 is a hit for all three (A = 0); NDCG 1, 0.61, 0.61. Group 1: three equal lists,
    # so every advantage is 0.
    gains = [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]] + [[0.0, 1.0]] * 3
    expected = [(0.5, 1), (1, 1), (0.5, 0), (1, 1), (0.5, 0), (1, 1)] + [(0.5, 0.5)] * 6
    assert rank_sign_agreement(gains, [2] * 6, 3, 2, "exp_inf") == expected


@pytest.mark.parametrize("credit, gains", [("log_decay", [0.0, 0.0, 1.0, 1.0, 0.0]),
                                           ("exp_inf", [1.0, 0.0, 0.0, 0.0, 0.0])])
def test_equal_rewards_whose_mean_rounds_are_still_ties(credit, gains):
    rewards = torch.tensor([causal_rank_rewards(gains, 5, credit)] * 3, dtype=torch.float64)
    ndcg = torch.full((3, 1), ndcg_at_k(gains, 5, 5), dtype=torch.float64)
    raw = torch.cat([rank_group_advantages(rewards, 3), rank_group_advantages(ndcg, 3)], dim=1)
    assert (raw != 0).any()  # the group mean of equal values rounded: the case the tie tolerance is for
    assert rank_sign_agreement([gains] * 3, [5] * 3, 3, 5, credit) == [(0.5, 0.5)] * 15


def test_units_are_the_ranked_items_within_n():
    # 1 item, none, 5 items of which 2 past N = 3: 1 + 0 + 3 units; the empty list still counts in the group means.
    units = rank_sign_agreement([[1.0], [], [0.0, 1.0, 0.0, 1.0, 1.0]], [2, 2, 2], 3, 3)
    # NDCG@3: 1/(1 + D2) = 0.61, 0, D2/(1 + D2) = 0.39, mean 1/3: the first and the third list above it, so the
    # third list's misses get a positive sequence advantage. Hits by rank: (1, 0, 0), (0, 0, 1), (0, 0, 0): a tie.
    assert units == [(1, 1), (1, 0), (1, 1), (0.5, 0)]
    assert rank_sign_agreement([[0.0], [1.0]], [1, 1], 2, 3) == [(1, 1), (1, 1)]
    # A hit past N earns nothing, in the ranks or in NDCG@N: the list ties with an empty one.
    assert rank_sign_agreement([[0.0, 0.0, 0.0, 1.0], []], [1, 1], 2, 3) == [(0.5, 0.5)] * 3
    with pytest.raises(ValueError, match="groups of 3"):
        rank_sign_agreement([[1.0]] * 4, [1] * 4, 3, 3)


def test_rank_evidence_scores_the_parsed_lists_of_each_request(monkeypatch):
    """Scripted completions: the parse, N, the history, repeat and overflow rules, and the rows' grouping."""

    def scripted(model, tokenizer, prompts, *, num_samples, temperature, seed, **kwargs):
        assert tokenizer.padding_side == "left" and (num_samples, temperature) == (2, 0.7)
        rows = load_run_dataset("recommendation", "test", "grpo", num_examples=2, seed=seed)
        assert prompts == rows["prompt"]
        texts = []
        for row in rows:
            first, second = row["relevant_items"][:2]
            texts.append([
                f"1. {first}\nHere is a line\n{second}\n",  # hit, miss, hit
                f"{row['history_items'][0]}\n{first}\n{first}\nNo Such Film (2001)\n\nNor This (2002)\n{second}",
            ])  # watched, hit, repeat, two misses; the 6th item (a relevant one) is past N = 5
        return texts

    monkeypatch.setattr(ranks, "generate_completions", scripted)
    tokenizer = build_tiny_tokenizer()
    result = rank_evidence(None, tokenizer, seeds=[0, 1], num_requests=2, num_samples_per_prompt=2, temperature=0.7)
    for seed in (0, 1):
        expected = []
        for row in load_run_dataset("recommendation", "test", "grpo", num_examples=2, seed=seed):
            expected += rank_sign_agreement([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]],
                                            [len(row["relevant_items"])] * 2, 2, 5)
        assert len(expected) == 16 and result.pairs[seed] == expected
    assert (result.signal, result.unit) == ("Rank-GRPO spans (exp_inf credit)", "ranked items")


def test_rank_evidence_on_the_tiny_model(monkeypatch):
    """The tiny model's gibberish names no relevant movie: every rank and every NDCG ties at 0, so each line it
    writes (up to N per completion) is one (0.5, 0.5) unit."""
    model, tokenizer = build_tiny_llama()
    sampled = []

    generate = ranks.generate_completions

    def spy(*args, **kwargs):
        texts = generate(*args, **kwargs)
        sampled.extend(texts)
        return texts

    monkeypatch.setattr(ranks, "generate_completions", spy)
    result = rank_evidence(model, tokenizer, seeds=[0], num_requests=2, num_samples_per_prompt=2, max_new_tokens=24,
                           batch_size=4)
    assert len(sampled) == 2 and all(len(texts) == 2 for texts in sampled)
    num_items = sum(min(len(parse_ranked_list(text)), 5) for texts in sampled for text in texts)
    assert num_items > 0 and result.pairs[0] == [(0.5, 0.5)] * num_items
