"""Rank-GRPO: rank spans from token offsets, per-rank rewards and advantages, the rank-level ratio and loss (by hand
and, with one rank, against TRL's sequence-level ratio), and the token signal on generated completions."""

import math

import pytest
import torch
import yaml
from trl import GRPOConfig, GRPOTrainer

from tokenweave.config import parse_run_config
from tokenweave.losses.policy import PolicyLossConfig, rank_grpo_policy_loss
from tokenweave.models import build_tiny_tokenizer
from tokenweave.rewards.ranking import (
    causal_rank_rewards,
    item_key,
    ndcg_at_k,
    ndcg_reward,
    parse_ranked_list,
    recall_at_k,
    relevance_gains,
)
from tokenweave.tokens.ranks import rank_group_advantages, rank_log_ratio, token_ranks
from tokenweave.train import train
from tokenweave.trainers import TokenGRPOConfig

from .conftest import CONFIGS
from .grpo_harness import assert_same_update, loss_and_grads, make_batch, make_trainer, with_generation_signals


class PieceTokenizer:
    """A tokenizer given by its tokens' texts: ``decode`` concatenates them (the special token ``<eos>`` skipped)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and self.pieces[i] == "<eos>"))


def ranks_of(pieces, num_ranks):
    tokenizer = PieceTokenizer(pieces)
    ids = list(range(len(pieces)))
    items = parse_ranked_list(tokenizer.decode(ids))
    return token_ranks(tokenizer, ids, [item.start for item in items], num_ranks), [item.text for item in items]


# ---------------------------------------------------------------------------------------------------------------
# (a) Rank spans.
# ---------------------------------------------------------------------------------------------------------------
def test_an_item_spread_over_several_tokens():
    pieces = ["Wild", " Gar", "den", " (", "1977", ")", "\n", "Hollow", " Radio (1973)", "<eos>"]
    ranks, items = ranks_of(pieces, num_ranks=5)
    assert items == ["Wild Garden (1977)", "Hollow Radio (1973)"]
    assert ranks == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]  # the newline ends item 0; EOS is the last item's


def test_newlines_merged_into_tokens_and_overflow():
    # ")\n" ends item 0; "\nC" starts with the newline that ends item 1, so it is item 1's (as the released code's
    # newline counter); " (1992)" is item 2's first token of its own, past N = 2: overflow, as the rest
    pieces = ["A (1990", ")\n", "B (1991)", "\nC", " (1992)", "\n", "<eos>"]
    ranks, items = ranks_of(pieces, num_ranks=2)
    assert items == ["A (1990)", "B (1991)", "C (1992)"]
    assert ranks == [0, 0, 1, 1, 2, 2, 2]


def test_a_malformed_line_takes_its_own_rank_and_blank_lines_none():
    pieces = ["Here you go:", "\n\n", "A (1990)", "\n", "B", " (1991)\n", "<eos>"]
    ranks, items = ranks_of(pieces, num_ranks=5)
    assert items == ["Here you go:", "A (1990)", "B (1991)"]
    assert ranks == [0, 0, 1, 1, 2, 2, 2]  # the trailing newline opens no item: EOS stays with rank 2
    # the rewards use the same parse: the malformed line earns nothing at rank 0, A its hit at rank 1
    assert relevance_gains(items, ["A (1990)", "B (1991)"]) == [0.0, 1.0, 1.0]


def line_ranks_by_hand(text, num_ranks):
    """Each character's rank, line by line: a non-blank line is the next item and all its characters (its newline
    too) are that item's; a blank line's belong to the item before (0 before the first); clamped to ``num_ranks``."""
    ranks, item = [], -1
    for line in text.split("\n"):
        item += bool(line.strip())
        ranks += [min(max(item, 0), num_ranks)] * (len(line) + 1)
    return ranks[: len(text)]


@pytest.mark.parametrize("seed", range(5))
def test_spans_on_a_real_tokenizer_against_the_lines(seed):
    tokenizer = build_tiny_tokenizer()  # a fast tokenizer (one character per token, special tokens skipped)
    generator = torch.Generator().manual_seed(seed)
    alphabet = "ab (19)\n\n  "
    text = "".join(alphabet[i] for i in torch.randint(len(alphabet), (60,), generator=generator))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    starts = [item.start for item in parse_ranked_list(text)]
    ranks = token_ranks(tokenizer, ids, starts, num_ranks=3)
    expected = line_ranks_by_hand(text, 3)
    assert ranks == expected + [expected[-1]]  # EOS: the last character's rank


# ---------------------------------------------------------------------------------------------------------------
# (b) Rank rewards and metrics, by hand.
# ---------------------------------------------------------------------------------------------------------------
def test_relevance_gains_ground_every_item():
    items = ["1. X (1990)", "Y (1991)", "x  (1990)", "Z (1992)", "junk", "H (1980)", "Q (1999)"]
    relevant = ["X (1990)", "Z (1992)", "H (1980)", "Q (1999)"]
    catalog = {item_key(text) for text in ["X (1990)", "Y (1991)", "Z (1992)", "H (1980)"]}
    # X hit; Y not relevant; X again a repeat; Z hit; junk does not parse; H already owned; Q not in the catalog
    assert relevance_gains(items, relevant, ["H (1980)"], catalog) == [1, 0, 0, 1, 0, 0, 0]
    assert relevance_gains(items, relevant, ["H (1980)"]) == [1, 0, 0, 1, 0, 0, 1]  # no catalog check


def test_causal_credit_variants():
    gains = [1.0, 0.0, 1.0]
    assert causal_rank_rewards(gains, 4, "exp_inf") == [1.0, 0.0, 1.0, 0.0]
    # DCG from rank k to N: d_j = 1 / log2(j + 1): d_1 = 1, d_3 = 0.5
    assert causal_rank_rewards(gains, 4, "log_decay") == pytest.approx([1.5, 0.5, 0.5, 0.0])
    assert causal_rank_rewards([1.0, 1.0, 1.0], 2, "log_decay") == pytest.approx([1 + 1 / math.log2(3), 1 / math.log2(3)])
    with pytest.raises(ValueError, match="rank credit"):
        causal_rank_rewards(gains, 4, "dcg")


def test_recall_and_ndcg_by_hand():
    assert recall_at_k([1, 0, 1], num_relevant=4, k=3) == 0.5
    assert recall_at_k([1, 0, 1], num_relevant=4, k=1) == 0.25
    assert ndcg_at_k([1, 0, 1], num_relevant=2, k=3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k([0, 1], num_relevant=1, k=2) == pytest.approx(1 / math.log2(3))
    answers = [[{"role": "assistant", "content": "A (1990)\nB (1991)\nA (1990)"}], "B (1991)\nC (1992)"]
    rewards = ndcg_reward(answers, relevant_items=[["B (1991)"], ["C (1992)", "A (1990)"]], list_length=[2, 2])
    assert rewards == pytest.approx([1 / math.log2(3) / 1, 1 / math.log2(3) / (1 + 1 / math.log2(3))])


# ---------------------------------------------------------------------------------------------------------------
# (c) Per-rank advantages, by hand.
# ---------------------------------------------------------------------------------------------------------------
def test_per_rank_group_advantages():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # mean 0.5, unbiased std sqrt(0.5) of {1, 0}
    expected = torch.tensor([[a, 0.0], [-a, 0.0], [a, 0.0], [-a, 0.0]])
    torch.testing.assert_close(rank_group_advantages(rewards, group_size=2), expected)
    torch.testing.assert_close(rank_group_advantages(rewards, 2, "none"), torch.tensor(
        [[0.5, 0.0], [-0.5, 0.0], [0.5, 0.0], [-0.5, 0.0]]))
    batch_std = rewards.std(dim=0)  # "batch": one std per rank over all rows
    torch.testing.assert_close(rank_group_advantages(rewards, 2, "batch"), expected / a * 0.5 / (batch_std + 1e-4))


# ---------------------------------------------------------------------------------------------------------------
# (d) The rank-level ratio and the loss, off-policy, by hand.
# ---------------------------------------------------------------------------------------------------------------
def test_rank_log_ratio_and_its_gradient():
    logps = torch.tensor([[0.1, 0.3, -0.2, 0.4, 0.0]], requires_grad=True)
    old = torch.zeros(1, 5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]])
    rank_ids = torch.tensor([[0, 0, 1, 1, 3]])  # rank 3 ≥ N = 2: the overflow bin
    log_w = rank_log_ratio(logps, old, mask, rank_ids, num_ranks=2)
    torch.testing.assert_close(log_w, torch.tensor([[0.2, 0.2, -0.2, -0.2, 0.0]]))  # masked token 3 not in the mean
    (log_w * torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])).sum().backward()
    # d/d logp_t of Σ_s c_s · mean_span(t): token t gets (Σ of c over its span) / (masked tokens of the span) · m_t
    torch.testing.assert_close(logps.grad, torch.tensor([[1.5, 1.5, 7.0, 0.0, 5.0]]))


def test_rank_grpo_loss_clips_each_rank_by_hand():
    config = PolicyLossConfig(epsilon_low=0.06, epsilon_high=0.08)
    # two ranks of 2 tokens: log-ratios give w_0 = 1.5, w_1 = 0.9 (ratios ≠ 1: off-policy)
    logps = torch.tensor([[math.log(1.5)] * 2 + [math.log(0.9)] * 2], requires_grad=True)
    old, mask, rank_ids = torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([[0, 0, 1, 1]])
    for advantage, expected, grads in [
        (+1.0, [-1.08, -1.08, -0.9, -0.9], [0.0, 0.0, -0.9, -0.9]),  # w_0 clipped at 1 + 0.08; w_1 not (A > 0)
        (-1.0, [1.5, 1.5, 0.94, 0.94], [1.5, 1.5, 0.0, 0.0]),  # w_0 not clipped (A < 0); w_1 clipped at 0.94
    ]:
        logps.grad = None
        loss, metrics = rank_grpo_policy_loss(
            logps, old, torch.tensor([advantage]), mask, config, rank_ids=rank_ids, num_ranks=2
        )
        torch.testing.assert_close(loss, torch.tensor([expected]))
        loss.sum().backward()
        # Σ over the span's 2 tokens of −w·A, w = exp(mean log-ratio): ∂/∂logp_t = 2 · (−A · w / 2) = −A · w for an
        # unclipped rank, 0 for a clipped one
        torch.testing.assert_close(logps.grad, torch.tensor([grads]))
        assert metrics["clip_ratio/region_mean"] == 0.5
    with pytest.raises(ValueError, match="rank_ids"):
        rank_grpo_policy_loss(logps, old, torch.tensor([1.0]), mask, config)


# ---------------------------------------------------------------------------------------------------------------
# (e) One rank (N = 1, the whole completion one span) = TRL's importance_sampling_level "sequence".
# ---------------------------------------------------------------------------------------------------------------
RANK_CLIP = dict(epsilon=0.06, epsilon_high=0.08)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_one_rank_equals_trl_sequence_level(model_dir, tmp_path, beta):
    trainer = make_trainer(model_dir, tmp_path, policy_loss="rank_grpo", rank_list_length=1, beta=beta, **RANK_CLIP)
    reference = make_trainer(
        model_dir, tmp_path, GRPOTrainer, GRPOConfig, loss_type="dapo", importance_sampling_level="sequence",
        beta=beta, use_bias_correction_kl=False, **RANK_CLIP,
    )
    trainer.args.use_bias_correction_kl = False
    batch = make_batch(trainer)
    ours = with_generation_signals(trainer, batch) | {"rank_ids": torch.zeros_like(batch["completion_ids"])}
    assert_same_update(loss_and_grads(trainer, [ours]), loss_and_grads(reference, [batch]))
    assert max(trainer._metrics["train"]["clip_ratio/region_mean"]) > 0  # off-policy: clipping acted


def test_rank_ratio_differs_from_the_sequence_ratio_with_several_ranks(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, policy_loss="rank_grpo", rank_list_length=3, **RANK_CLIP)
    gspo = make_trainer(model_dir, tmp_path, policy_loss="gspo", loss_agg_mode="token-mean", **RANK_CLIP)
    batch = make_batch(trainer)
    ranked = with_generation_signals(trainer, batch)  # items of 2 tokens
    single = batch | {"rank_ids": torch.zeros_like(batch["completion_ids"])}
    assert loss_and_grads(trainer, [single])[0] == pytest.approx(loss_and_grads(gspo, [batch])[0], abs=1e-6)
    assert loss_and_grads(trainer, [ranked])[0] != pytest.approx(loss_and_grads(gspo, [batch])[0], abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# (f) The signal on generated completions: spans, gains, per-rank advantages and shaping recomputed from the text.
# ---------------------------------------------------------------------------------------------------------------
def digit_gains(items, **columns):
    """Gain 1 for an item line holding a digit (a test gain function, named as 'tests.test_rank_grpo:digit_gains')."""
    return [[float(any(char.isdigit() for char in text)) for text in answer] for answer in items]


@pytest.mark.parametrize("shaping", [True, False])
def test_after_generation_gives_per_rank_advantages(model_dir, tmp_path, shaping):
    # the EOS token's own advantage is zeroed with or without the length shaping (the released code's rule)
    tokenizer = build_tiny_tokenizer()
    newline, eos = tokenizer.convert_tokens_to_ids("\n"), tokenizer.eos_token_id
    n = 3
    trainer = make_trainer(
        model_dir, tmp_path, policy_loss="rank_grpo", rank_list_length=n, rank_gain_func="tests.test_rank_grpo:digit_gains",
        max_completion_length=24, generation_kwargs={"sequence_bias": {(newline,): 4.0, (eos,): 2.5}},
        rank_length_shaping=shaping, **RANK_CLIP,
    )
    from tokenweave.data.recommendation import load_recommendation

    rows = load_recommendation("train", num_examples=2)
    output = trainer._generate_and_score_completions([rows[0]] * 4 + [rows[1]] * 4)
    mask = output["completion_mask"]
    gains, ranks, eos_rows, items_per_row = [], [], [], []
    for row, length in zip(output["completion_ids"].tolist(), mask.sum(-1).tolist()):
        ids = row[:length]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        lines = [line for line in text.split("\n") if line.strip()]
        gains.append([float(any(c.isdigit() for c in line)) for line in lines[:n]] + [0.0] * (n - len(lines[:n])))
        char_ranks = line_ranks_by_hand(text, n) or [0]
        # one character per token, none for a special token (<|unk|>, EOS): the rank of the character it stands before
        starts = [sum(len(tokenizer.decode([i], skip_special_tokens=True)) for i in ids[:t]) for t in range(length)]
        ranks.append([char_ranks[min(start, len(char_ranks) - 1)] for start in starts])
        eos_rows.append(ids[-1] == eos)
        items_per_row.append(len(lines))
    assert any(count > n for count in items_per_row) and any(eos_rows)  # overflow and EOS both exercised
    advantages = rank_group_advantages(torch.tensor(gains), group_size=4)
    # an EOS whose rank has an advantage: keeping it would differ from zeroing it
    assert any(eos_rows[b] and row_ranks[-1] < n and advantages[b, row_ranks[-1]] != 0 for b, row_ranks in
               enumerate(ranks))
    overflow_penalty = -0.1 if shaping else 0.0
    expected = torch.zeros_like(output["advantages"])
    for b, row_ranks in enumerate(ranks):
        for t, rank in enumerate(row_ranks):
            expected[b, t] = advantages[b, rank] if rank < n else overflow_penalty
        if eos_rows[b]:  # the EOS token: its shaping value only (0 without shaping)
            last = len(row_ranks) - 1
            expected[b, last] = (0.1 if items_per_row[b] == n else -0.1 if items_per_row[b] < n else 0.0) + (
                -0.1 if row_ranks[last] >= n else 0.0) if shaping else 0.0
    torch.testing.assert_close(output["advantages"], expected)
    torch.testing.assert_close(output["rank_ids"] * mask, torch.tensor(
        [r + [0] * (mask.size(1) - len(r)) for r in ranks]))
    assert f"rank/ndcg@{n}" in trainer._metrics["train"]


# ---------------------------------------------------------------------------------------------------------------
# (g) Config and a training run of the shipped tiny config.
# ---------------------------------------------------------------------------------------------------------------
def config(**kwargs):
    return TokenGRPOConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=False, **kwargs)


def test_config_follows_the_policy_loss():
    rank = config(policy_loss="rank_grpo")
    assert rank.token_signals == ["rank_grpo"]
    assert (rank.loss_agg_mode, rank.epsilon_high, rank.loss_type) == ("token-mean", 0.08, "dapo")
    # HAPO's adaptive clip with the rank ratio: the hapo signal gives ĥ, its generation parts stay off
    clipped = config(policy_loss="rank_grpo", hapo_adaptive_clip=True)
    assert set(clipped.token_signals) == {"hapo", "rank_grpo"}
    assert not (clipped.hapo_adaptive_temperature or clipped.hapo_token_advantage)
    assert clipped.policy_loss_config().adaptive_clip
    with pytest.raises(ValueError, match="both set the advantages"):
        config(policy_loss="rank_grpo", hapo_token_advantage=True)


def test_a_rank_config_without_epsilon_clips_at_the_papers_bounds(tmp_path):
    # configs/rank_grpo_tiny.yaml sets neither epsilon nor epsilon_high: the loss clips the rank ratio to [0.94, 1.08]
    # (TRL's epsilon default 0.2 would clip at 0.8); a value the user sets, even TRL's 0.2, is kept
    tiny = CONFIGS / "rank_grpo_tiny.yaml"
    assert not {"epsilon", "epsilon_high"} & set(yaml.safe_load(tiny.read_text()))
    training_args = parse_run_config(["--config", str(tiny)])[1]
    bounds = training_args.policy_loss_config()
    assert (bounds.epsilon_low, bounds.epsilon_high) == (0.06, 0.08)
    # the bounds the loss applies: a rank ratio of 0.5 with A = -1 is clipped to 0.94, one of 2.0 with A = 1 to 1.08
    loss, _ = rank_grpo_policy_loss(torch.log(torch.tensor([[0.5], [2.0]])), torch.zeros(2, 1),
                                    torch.tensor([-1.0, 1.0]), torch.ones(2, 1), bounds,
                                    rank_ids=torch.zeros(2, 1, dtype=torch.long), num_ranks=1)
    torch.testing.assert_close(loss, torch.tensor([[0.94], [-1.08]]))
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(tiny.read_text() + "epsilon: 0.2\n")
    assert parse_run_config(["--config", str(explicit)])[1].policy_loss_config().epsilon_low == 0.2
    assert parse_run_config(["--config", str(tiny), "--epsilon", "0.1"])[1].epsilon == 0.1
    # other policy losses, and the rank_grpo signal under another loss, keep TRL's default
    assert config(policy_loss="dapo").epsilon == 0.2
    assert config(policy_loss="dapo", token_signals=["rank_grpo"]).epsilon == 0.2
    assert config().epsilon == 0.2


def test_the_entropy_adaptive_clip_combines_with_the_rank_ratio():
    config = PolicyLossConfig(epsilon_low=0.06, epsilon_high=0.08)
    logps = torch.full((1, 2), math.log(1.5))
    args = (logps, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), config)
    h_hat = torch.tensor([[0.5, -0.5]])  # ε_hi · (1 + ĥ) = 0.12 where ĥ > 0
    loss, _ = rank_grpo_policy_loss(*args, entropy_signal=h_hat, rank_ids=torch.zeros(1, 2, dtype=torch.long),
                                    num_ranks=1)
    torch.testing.assert_close(loss, torch.tensor([[-1.12, -1.08]]))


def test_tiny_config_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWEAVE_CACHE", str(tmp_path / "cache"))
    info = train(["--config", str(CONFIGS / "rank_grpo_tiny.yaml"), "--output_dir", str(tmp_path / "out"),
                  "--max_steps", "2"])
    assert info["global_step"] == 2
    logs = [entry for entry in info["log_history"] if "loss" in entry]
    assert all("rank/ndcg@5" in entry and math.isfinite(entry["grad_norm"]) for entry in logs)
    assert any(entry["grad_norm"] > 0 for entry in logs)


def test_token_weights_multiply_the_rank_grpo_loss():
    config = PolicyLossConfig(epsilon_low=0.06, epsilon_high=0.08)
    generator = torch.Generator().manual_seed(0)
    logps, old = torch.randn(2, 5, generator=generator), torch.randn(2, 5, generator=generator)
    args = (logps, old, torch.tensor([1.0, -0.5]), torch.ones(2, 5), config)
    ranks = dict(rank_ids=torch.tensor([[0, 0, 1, 1, 2]] * 2), num_ranks=2)
    weights = torch.rand(2, 5, generator=generator)
    plain, _ = rank_grpo_policy_loss(*args, **ranks)
    weighted, _ = rank_grpo_policy_loss(*args, token_weights=weights, **ranks)
    torch.testing.assert_close(weighted, plain * weights)


def semicolon_items(text):
    """A user's item parser (named as 'tests.test_rank_grpo:semicolon_items'): items separated by '; '."""
    from tokenweave.rewards.ranking import RankedItem

    items, offset = [], 0
    for part in text.split("; "):
        if part.strip():
            items.append(RankedItem(offset, part))
        offset += len(part) + 2
    return items


def test_a_user_item_parser_gives_the_spans():
    from tokenweave.rewards.ranking import get_item_parser

    parser = get_item_parser("tests.test_rank_grpo:semicolon_items")
    pieces = ["A (1990)", ";", " B", " (1991); C", " (1992)", "<eos>"]
    tokenizer, ids = PieceTokenizer(pieces), list(range(len(pieces)))
    items = parser(tokenizer.decode(ids))
    assert [item.text for item in items] == ["A (1990)", "B (1991)", "C (1992)"]
    # a token is the item's in which its first character lies: " B" starts with the separator's space (item 0's, as
    # "\nThe" is the previous line's), " (1991); C" in item 1, " (1992)" in item 2
    assert token_ranks(tokenizer, ids, [item.start for item in items], num_ranks=5) == [0, 0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="item parser"):
        get_item_parser("tests.test_rank_grpo:nothing_here")
