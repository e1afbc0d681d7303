"""Tests of tokenweave.losses.policy: the registry, the aggregation modes and TRL's normalisers, the clipped surrogate,
and every registered loss on hand-computed off-policy batches (ratio ≠ 1), plus gradient checks for gspo and cispo."""

import dataclasses
import math

import pytest
import torch

from tokenweave.losses.policy import (
    POLICY_LOSS_DEFAULTS,
    POLICY_LOSSES,
    PolicyLossConfig,
    aggregate_loss,
    get_policy_loss,
    nan_extreme,
    ppo_clip,
    register_policy_loss,
    trl_aggregate_loss,
    trl_token_normalizer,
)
from tokenweave.tokens.entropy import entropy_signal


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The hand batch: B = 2, T = 4, advantages A = [+1, −1], the last token of row 0 is padding.
#   ratios r = [[1.5, 0.5, 1.0, (1.2)], [1.1, 0.7, 4.0, 0.9]],  logps written out, old_logps = logps − log r
# PPO clip with ε_lo = 0.2, ε_hi = 0.28 → clip range [0.8, 1.28]:
#   row 0 (A=+1): −min(r, clip r)       → [−1.28, −0.5, −1.0, (−1.2)]
#   row 1 (A=−1):  max(r, clip r)       → [ 1.1,   0.8,  4.0,   0.9 ]   (0.7 is low-clipped to 0.8)
# Row sums: −2.78 over 3 tokens, 6.8 over 4 tokens; total 4.02 over 7 tokens.
# ---------------------------------------------------------------------------------------------------------------
RATIOS = torch.tensor([[1.5, 0.5, 1.0, 1.2], [1.1, 0.7, 4.0, 0.9]])
LOGPS = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-0.3, -1.5, -2.5, -0.8]])
OLD_LOGPS = LOGPS - RATIOS.log()
ADVANTAGES = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
PPO_PER_TOKEN = [[-1.28, -0.5, -1.0, -1.2], [1.1, 0.8, 4.0, 0.9]]


def hand_loss(name, config=PolicyLossConfig(), **kwargs):
    return get_policy_loss(name)(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, config, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Registry and config
# ---------------------------------------------------------------------------------------------------------------
def test_builtin_losses_are_registered():
    assert {"grpo", "dapo", "cispo", "gspo", "hapo"} <= set(POLICY_LOSSES)
    with pytest.raises(ValueError, match="unknown policy loss 'nope'.*cispo.*dapo.*grpo.*gspo.*hapo"):
        get_policy_loss("nope")


def test_each_loss_registers_its_papers_aggregation_clip_and_trl_loss_type():
    defaults = POLICY_LOSS_DEFAULTS
    assert defaults["grpo"].loss_agg_mode == defaults["gspo"].loss_agg_mode == "seq-mean-token-mean"
    assert {defaults[name].loss_agg_mode for name in ("dapo", "cispo", "hapo")} == {"token-mean"}
    assert {name: defaults[name].epsilon_high for name in ("grpo", "gspo", "dapo", "cispo", "hapo")} == {
        "grpo": None, "gspo": None, "dapo": 0.28, "cispo": 5.0, "hapo": 0.28
    }
    assert {name: defaults[name].trl_loss_type for name in ("grpo", "gspo", "dapo", "cispo", "hapo")} == {
        "grpo": "grpo", "gspo": "grpo", "dapo": "dapo", "cispo": "cispo", "hapo": "dapo"
    }
    assert [name for name, spec in defaults.items() if spec.importance_sampling_level] == ["gspo"]
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        register_policy_loss("test_bad_mode", loss_agg_mode="sum")


def test_user_registered_loss_is_found_by_name():
    @register_policy_loss("test_reinforce")
    def reinforce(logps, old_logps, advantages, mask, config, token_weights=None, entropy=None, entropy_signal=None):
        return -advantages.unsqueeze(-1) * logps, {}

    try:
        assert get_policy_loss("test_reinforce") is reinforce
        per_token, _ = hand_loss("test_reinforce")
        close(aggregate_loss(per_token, MASK), (3.5 - 5.1) / 7)  # −A·logp: row 0 sums 3.5, row 1 sums −5.1
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_reinforce")(lambda *args: None)
    finally:
        del POLICY_LOSSES["test_reinforce"], POLICY_LOSS_DEFAULTS["test_reinforce"]


def test_config_is_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PolicyLossConfig().epsilon_low = 0.1
    for bad in (dict(dual_clip_c=1.0), dict(importance_sampling_level="seq"), dict(entropy_pivot=1.5)):
        with pytest.raises(ValueError):
            PolicyLossConfig(**bad)


# ---------------------------------------------------------------------------------------------------------------
# Aggregation, on PPO_PER_TOKEN (the padded −1.2 must never count)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, normalizer, expected",
    [
        ("token-mean", None, 4.02 / 7),
        ("token-mean", 10.0, 0.402),
        ("seq-mean-token-mean", None, (-2.78 / 3 + 6.8 / 4) / 2),
        ("seq-mean-token-mean", 4.0, (-2.78 / 3 + 6.8 / 4) / 4),
        ("seq-mean-token-sum", None, 2.01),
        ("seq-mean-token-sum", 4.0, 1.005),
        ("seq-mean-token-sum-norm", None, 4.02 / 8),  # Dr. GRPO: B·T
        ("seq-mean-token-sum-norm", 20.0, 0.201),  # B · max_completion_length = 2·10
    ],
)
def test_aggregation_modes_by_hand(mode, normalizer, expected):
    close(aggregate_loss(torch.tensor(PPO_PER_TOKEN), MASK, mode, normalizer), expected)


def test_aggregation_rejects_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.zeros(2, 4), MASK, "token-sum")


def test_token_mean_with_global_normalizer_is_invariant_to_the_micro_batch_split():
    torch.manual_seed(0)
    per_token = torch.randn(8, 10) + torch.arange(8.0).unsqueeze(-1)  # rows differ, and so do their lengths
    mask = (torch.arange(10) < torch.tensor([1, 10, 3, 7, 2, 9, 5, 4]).unsqueeze(-1)).long()
    full = aggregate_loss(per_token, mask, "token-mean")
    global_tokens = mask.sum()
    for micro in (4, 2):  # (batch 8, GA 1) == (batch 4, GA 2) == (batch 2, GA 4), or processes
        micro_batches = list(zip(per_token.split(micro), mask.split(micro)))
        close(sum(aggregate_loss(p, m, "token-mean", global_tokens) for p, m in micro_batches), full)
        local_means = [aggregate_loss(p, m, "token-mean") for p, m in micro_batches]
        assert abs(sum(local_means) / len(local_means) - full) > 0.04  # the silent bug the normaliser avoids


# TRL's normalisers. N_glob = max(N, 1) / P · GA / steps_per_generation: 7 tokens, 2 processes, GA 2, 4 steps per
# generation → 7/2 · 2/4 = 1.75; eval (GA = steps = 1): 3.5; no tokens: max(0, 1) = 1 → 1/2.
@pytest.mark.parametrize(
    "num_items, processes, accumulation, steps, expected",
    [(7, 2, 2, 4, 1.75), (7, 2, 1, 1, 3.5), (0, 2, 1, 1, 0.5), (7, 1, 1, 1, 7.0)],
)
def test_trl_token_normalizer_by_hand(num_items, processes, accumulation, steps, expected):
    close(trl_token_normalizer(torch.tensor(num_items), processes, accumulation, steps), expected)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 4.02 / 1.75),  # Σ ℓ·m / N_glob: the GA scaling is inside N_glob
        ("seq-mean-token-mean", (-2.78 / 3 + 6.8 / 4) / 2 / 2),  # per-micro-batch mean / GA
        ("seq-mean-token-sum", 2.01 / 2),
        ("seq-mean-token-sum-norm", 4.02 / (2 * 10) / 2),  # Dr. GRPO: / (B · max_completion_length) / GA
    ],
)
def test_trl_aggregate_loss_by_hand(mode, expected):
    per_token = torch.tensor(PPO_PER_TOKEN)
    loss = trl_aggregate_loss(per_token, MASK, mode, torch.tensor(7), num_processes=2, accumulation_steps=2,
                              steps_per_generation=4, max_completion_length=10)
    close(loss, expected)


def test_trl_token_mean_is_invariant_to_accumulation_and_processes():
    # 8 rows as one micro-batch on one process (GA 1), as 2 micro-batches (GA 2), and as 2 processes × 2 micro-batches
    # (GA 2, gradients averaged over processes): Σ over micro-batches (mean over processes) = the global token mean.
    torch.manual_seed(0)
    per_token = torch.randn(8, 10) + torch.arange(8.0).unsqueeze(-1)
    mask = (torch.arange(10) < torch.tensor([1, 10, 3, 7, 2, 9, 5, 4]).unsqueeze(-1)).long()
    full = aggregate_loss(per_token, mask, "token-mean")
    n = mask.sum()
    close(trl_aggregate_loss(per_token, mask, "token-mean", n, 1), full)
    accumulated = sum(trl_aggregate_loss(p, m, "token-mean", n, 1, accumulation_steps=2, steps_per_generation=2)
                      for p, m in zip(per_token.split(4), mask.split(4)))
    close(accumulated, full)
    processes = [sum(trl_aggregate_loss(p, m, "token-mean", n, 2, accumulation_steps=2, steps_per_generation=2)
                     for p, m in zip(rows.split(2), rows_mask.split(2)))
                 for rows, rows_mask in zip(per_token.split(4), mask.split(4))]
    close(sum(processes) / 2, full)


# ---------------------------------------------------------------------------------------------------------------
# The clipped surrogate, flag-free: ppo_clip(r, A, ε_lo, ε_hi, δ, c) on the hand batch's ratios (PPO_PER_TOKEN), with
# per-token bounds, TRL's δ and the dual clip.
# ---------------------------------------------------------------------------------------------------------------
def test_ppo_clip_by_hand():
    advantages = ADVANTAGES.unsqueeze(-1)
    per_token, dual = ppo_clip(RATIOS, advantages, 0.2, 0.28)
    close(per_token, PPO_PER_TOKEN)
    assert dual is None
    # per-token bounds: ε_hi = 0.6 on row 0's first token → clip(1.5, 0.8, 1.6) = 1.5
    eps_high = torch.full_like(RATIOS, 0.28)
    eps_high[0, 0] = 0.6
    close(ppo_clip(RATIOS, advantages, 0.2, eps_high)[0][0], [-1.5, -0.5, -1.0, -1.2])
    # δ = 2.5 caps the unclipped ratio (4 → 2.5); c = 3 caps the A < 0 loss at 3 (r = 4 → 3)
    close(ppo_clip(RATIOS, advantages, 0.2, 0.28, delta=2.5)[0][1], [1.1, 0.8, 2.5, 0.9])
    per_token, dual = ppo_clip(RATIOS, advantages, 0.2, 0.28, dual_clip_c=3.0)
    close(per_token[1], [1.1, 0.8, 3.0, 0.9])
    assert dual.tolist() == [[False] * 4, [False, False, True, False]]


def test_nan_extreme():
    nan = float("nan")
    close(nan_extreme(torch.tensor([nan, 0.25, 0.5]), largest=False), 0.25)
    close(nan_extreme(torch.tensor([nan, 0.25, 0.5]), largest=True), 0.5)
    assert nan_extreme(torch.tensor([nan, nan]), largest=True).isnan()
    close(nan_extreme(torch.tensor([[nan, 1.0], [0.5, 2.0]]), largest=False, dim=0), [0.5, 1.0])
    assert nan_extreme(torch.tensor([[nan, 1.0], [nan, 2.0]]), largest=True, dim=0)[0].isnan()


# ---------------------------------------------------------------------------------------------------------------
# Clipped losses (grpo, dapo): same per-token loss, hand batch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_clipped_loss_hand_values(name):
    per_token, metrics = hand_loss(name)
    close(per_token, PPO_PER_TOKEN)
    close(metrics["clip_ratio/low_mean"], 1 / 7)  # r = 0.7 < 0.8 with A < 0
    close(metrics["clip_ratio/high_mean"], 1 / 7)  # r = 1.5 > 1.28 with A > 0 (r = 4 has A < 0)
    close(metrics["clip_ratio/region_mean"], 2 / 7)
    # TRL's per-sequence extremes: low-clipped fractions [0, 1/4] → min 0; high-clipped [1/3, 0] → max 1/3
    close(metrics["clip_ratio/low_min"], 0.0)
    close(metrics["clip_ratio/high_max"], 1 / 3)
    assert "entropy_signal/mean" not in metrics  # no ĥ given: no entropy statistics


def test_grpo_symmetric_clip():
    per_token, _ = hand_loss("grpo", PolicyLossConfig(epsilon_low=0.2, epsilon_high=0.2))
    close(per_token, [[-1.2, -0.5, -1.0, -1.2], [1.1, 0.8, 4.0, 0.9]])  # upper bound 1.2


def test_dual_clip_and_delta():
    # dual clip c = 3 caps the A < 0 loss at −A·c = 3: r = 4 gives 3 instead of 4
    per_token, metrics = hand_loss("dapo", PolicyLossConfig(dual_clip_c=3.0))
    close(per_token, [[-1.28, -0.5, -1.0, -1.2], [1.1, 0.8, 3.0, 0.9]])
    close(metrics["clip_ratio/dual_mean"], 1 / 7)
    # TRL's delta = 2.5 caps the unclipped ratio: max(min(4, 2.5), 1.28) = 2.5
    per_token, _ = hand_loss("dapo", PolicyLossConfig(delta=2.5))
    close(per_token, [[-1.28, -0.5, -1.0, -1.2], [1.1, 0.8, 2.5, 0.9]])


@pytest.mark.parametrize("name", sorted({"grpo", "dapo", "gspo", "cispo", "hapo"}))
def test_token_weights_multiply_the_per_token_loss(name):
    torch.manual_seed(0)
    entropy, weights = torch.rand(2, 4) * 2, torch.rand(2, 4)
    plain, _ = hand_loss(name, entropy=entropy)
    weighted, _ = hand_loss(name, entropy=entropy, token_weights=weights)
    close(weighted, plain * weights)


# ---------------------------------------------------------------------------------------------------------------
# CISPO: ℓ = −sg(min(r, ε_max))·A·logp, ε_max = 1.2 → w = [[1.2, 0.5, 1.0, (1.2)], [1.1, 0.7, 1.2, 0.9]]
#   row 0 (A=+1): −w·logp = [1.2, 1.0, 0.5, (1.2)]
#   row 1 (A=−1):  w·logp = [−0.33, −1.05, −3.0, −0.72]
#   token-mean: (2.7 − 5.1)/7 = −2.4/7;  gradient wrt logp = −w·A·m/7 (the weight is detached)
# ---------------------------------------------------------------------------------------------------------------
def test_cispo_hand_values_and_gradient():
    logps = LOGPS.clone().requires_grad_(True)
    config = PolicyLossConfig(cispo_epsilon_max=1.2)
    per_token, metrics = get_policy_loss("cispo")(logps, OLD_LOGPS, ADVANTAGES, MASK, config)
    close(per_token, [[1.2, 1.0, 0.5, 1.2], [-0.33, -1.05, -3.0, -0.72]])
    close(metrics["cispo_clip_ratio"], 1 / 7)  # r = 1.5 > 1.2 with A > 0

    loss = aggregate_loss(per_token, MASK, "token-mean")
    close(loss, -2.4 / 7)
    loss.backward()
    close(logps.grad, torch.tensor([[-1.2, -0.5, -1.0, 0.0], [1.1, 0.7, 1.2, 0.9]]) / 7)


# ---------------------------------------------------------------------------------------------------------------
# GSPO: one ratio per sequence, s = exp(masked mean of the log-ratio), old_logps = 0, A = [1, 1]
#   row 0 log-ratios [0.2, 0.1, 0.0, (5.0)] → mean 0.1 → s = e^0.1 ≈ 1.10517 (in [0.8, 1.28]) → ℓ = −e^0.1
#   row 1 log-ratios [1.0, 0.5, 0.3, 0.2]   → mean 0.5 → s = e^0.5 ≈ 1.64872 (clipped)           → ℓ = −1.28
#   seq-mean-token-mean: (−e^0.1 − 1.28)/2
#   gradient: row 0 valid tokens −e^0.1 · (1/3) · (1/2) (through the mean), padding 0; row 1 (clipped) 0
# ---------------------------------------------------------------------------------------------------------------
GSPO_LOG_RATIOS = torch.tensor([[0.2, 0.1, 0.0, 5.0], [1.0, 0.5, 0.3, 0.2]])


@pytest.mark.parametrize(
    "name, config",
    [("gspo", PolicyLossConfig()), ("grpo", PolicyLossConfig(importance_sampling_level="sequence"))],
)
def test_gspo_hand_values_and_gradient(name, config):
    logps = GSPO_LOG_RATIOS.clone().requires_grad_(True)
    per_token, _ = get_policy_loss(name)(logps, torch.zeros(2, 4), torch.ones(2), MASK, config)
    e01 = math.exp(0.1)
    close(per_token, [[-e01] * 4, [-1.28] * 4])
    loss = aggregate_loss(per_token, MASK, "seq-mean-token-mean")
    close(loss, (-e01 - 1.28) / 2)
    loss.backward()
    g = -e01 / 3 / 2
    close(logps.grad, [[g, g, g, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_gspo_differs_from_token_level():
    grpo = get_policy_loss("grpo")
    token_level, _ = grpo(GSPO_LOG_RATIOS, torch.zeros(2, 4), torch.ones(2), MASK, PolicyLossConfig())
    close(token_level[0, :3], [-math.exp(0.2), -math.exp(0.1), -1.0])


# ---------------------------------------------------------------------------------------------------------------
# HAPO on a hand batch, off-policy. Both rows have log-entropies [−2, −1, 0, 1, 2] and a padded last token (entropy
# 100, ratio 3, never counted) → (paper) ĥ = [−1, −2/3, −1/3, 0, 1],
# (released) ĥ = [1, 2/3, 1/3, 0, 1]. ε_lo = 0.2, ε_hi = 0.28, clip_alpha = 1, adv_beta = 0.5, A = [+1, −1].
#
# paper ĥ:   ε_lo(t) = [0.4, 0.3333, 0.2667, 0.2, 0.2], ε_hi(t) = [0.28 ×4, 0.56]
#            neutral bands (1 − ε_lo/2, 1 + ε_hi/2) =
#                (0.8, 1.14) (0.8333, 1.14) (0.8667, 1.14) (0.9, 1.14) (0.9, 1.28)
#            A_ent = A·(1 + ĥ/2) = ±[0.5, 0.6667, 0.8333, 1, 1.5]
#  row 0, r = [1.0, 0.7, 1.5, 1.1, 1.7]:
#    t0 in band, ĥ≤0 → A' 0.5,  ℓ = −0.5            t1 out → A' 1, ℓ = −0.7
#    t2 out → A' 1, clip 1.28 → ℓ = −1.28           t3 in, ĥ=0 → A' 1, ℓ = −1.1
#    t4 out, ĥ>0 → A' 1.5, clip 1.56 → ℓ = −2.34
#  row 1, r = [0.5, 0.75, 1.0, 0.85, 1.2]:
#    t0 out → A' −1, clip low 0.6 → ℓ = 0.6         t1 out → A' −1, 0.75 > 0.6667 (DAPO clips it to 0.8): 0.75
#    t2 in → A' −0.8333, ℓ = 0.8333                 t3 out → 0.85        t4 in, ĥ>0 → A' −1, ℓ = 1.2
#  redistributed: row 0 t0, t3, t4; row 1 t2 → 4/10. low clip: row 1 t0 (low entropy); high clip: row 0 t2
#  (low entropy), row 0 t4 (high entropy). Low-entropy tokens: 8, high-entropy: 2. mean ĥ = −0.2.
#
# released ĥ: ε_lo(t) = 0.2 (only ĥ = 0 is "low"), ε_hi(t) = 0.28·(1 + ĥ) = [0.56, 0.4667, 0.3733, 0.28, 0.56]
#            upper band edges 1 + ε_hi/2 = [1.28, 1.2333, 1.1867, 1.14, 1.28], lower 0.9;
#            A_ent = A·(1 + ĥ/2) = ±[1.5, 1.3333, 1.1667, 1, 1.5]
#  row 0: t0 in → A' 1, ℓ = −1.0   t1 out → 4/3·0.7 → −0.9333   t2 out → −(7/6)·1.37333 = −1.60222
#         t3 in → −1.1             t4 out → −1.5·1.56 = −2.34
#  row 1: t0 out → A' −1.5, max(0.5, 0.8)·1.5 = 1.2   t1 out → max(0.75, 0.8)·4/3 = 1.06667
#         t2 in → 1.0              t3 out → 0.85        t4 in → 1.2
# DAPO on the same batch: row 0 [−1.0, −0.7, −1.28, −1.1, −1.28], row 1 [0.8, 0.8, 1.0, 0.85, 1.2]
# ---------------------------------------------------------------------------------------------------------------
HAPO_ENTROPY = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0, math.log(100.0)]] * 2).exp()
HAPO_RATIOS = torch.tensor([[1.0, 0.7, 1.5, 1.1, 1.7, 3.0], [0.5, 0.75, 1.0, 0.85, 1.2, 3.0]])
HAPO_LOGPS = -torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) - 0.1
HAPO_MASK = torch.tensor([[1, 1, 1, 1, 1, 0]] * 2)
HAPO_CONFIG = PolicyLossConfig(epsilon_low=0.2, epsilon_high=0.28, clip_alpha=1.0, adv_beta=0.5)


def hapo_batch_loss(name, config):
    return get_policy_loss(name)(
        HAPO_LOGPS, HAPO_LOGPS - HAPO_RATIOS.log(), ADVANTAGES, HAPO_MASK, config, entropy=HAPO_ENTROPY
    )


def test_hapo_hand_values_paper_sign():
    per_token, metrics = hapo_batch_loss("hapo", HAPO_CONFIG)
    close(per_token[:, :5], [[-0.5, -0.7, -1.28, -1.1, -2.34], [0.6, 0.75, 5 / 6, 0.85, 1.2]])
    close(aggregate_loss(per_token, HAPO_MASK), (-5.92 + 0.6 + 0.75 + 5 / 6 + 0.85 + 1.2) / 10)
    expected_metrics = {
        "hapo/redistributed_frac": 0.4,
        "clip_ratio/low_mean": 0.1,
        "clip_ratio/high_mean": 0.2,
        "clip_ratio/low_mean_high_entropy": 0.0,
        "clip_ratio/high_mean_high_entropy": 0.5,
        "clip_ratio/low_mean_low_entropy": 1 / 8,
        "clip_ratio/high_mean_low_entropy": 1 / 8,
        "entropy_signal/mean": -0.2,
    }
    for key, value in expected_metrics.items():
        close(metrics[key], value)


def test_hapo_hand_values_released_sign():
    per_token, _ = hapo_batch_loss("hapo", dataclasses.replace(HAPO_CONFIG, released_sign=True))
    close(per_token[:, :5], [[-1.0, -0.7 * 4 / 3, -1.37333 * 7 / 6, -1.1, -2.34], [1.2, 0.8 * 4 / 3, 1.0, 0.85, 1.2]])


def test_hapo_takes_a_given_entropy_signal_over_the_micro_batch_statistics():
    # The trainer passes ĥ computed with the generation batch's statistics: the loss uses it as given (the entropies
    # are then ignored); the ĥ this batch's own statistics give reproduces the hand values above.
    own = entropy_signal(HAPO_ENTROPY, HAPO_MASK, HAPO_CONFIG.entropy_pivot)
    per_token, metrics = get_policy_loss("hapo")(
        HAPO_LOGPS, HAPO_LOGPS - HAPO_RATIOS.log(), ADVANTAGES, HAPO_MASK, HAPO_CONFIG,
        entropy=torch.ones_like(HAPO_ENTROPY), entropy_signal=own,
    )
    close(per_token[:, :5], [[-0.5, -0.7, -1.28, -1.1, -2.34], [0.6, 0.75, 5 / 6, 0.85, 1.2]])
    # ĥ = 0.5 on every token: all "high entropy", ε_hi = 0.28·1.5 = 0.42, A' = A·(1 + 0.25) outside the neutral band
    # (0.9, 1.21). Row 0 (A = +1): t0 r = 1.0 in → −1.0; t1 0.7 → −1.25·0.7; t2 1.5 → −1.25·1.42; t3 1.1 in → −1.1;
    # t4 1.7 → −1.25·1.42. Row 1 (A = −1): t0 0.5 → 1.25·max(0.5, 0.8); t1 0.75 → 1.25·0.8; t2 1.0 in → 1.0;
    # t3 0.85 → 1.25·0.85; t4 1.2 in → 1.2.
    half = torch.full_like(HAPO_ENTROPY, 0.5)
    per_token, metrics = get_policy_loss("hapo")(
        HAPO_LOGPS, HAPO_LOGPS - HAPO_RATIOS.log(), ADVANTAGES, HAPO_MASK, HAPO_CONFIG,
        entropy=HAPO_ENTROPY, entropy_signal=half,
    )
    close(per_token[:, :5], [[-1.0, -0.875, -1.775, -1.1, -1.775], [1.0, 1.0, 1.0, 1.0625, 1.2]])
    close(metrics["entropy_signal/mean"], 0.5)


def test_dapo_on_the_hapo_batch():
    per_token, metrics = hapo_batch_loss("dapo", HAPO_CONFIG)
    close(per_token[:, :5], [[-1.0, -0.7, -1.28, -1.1, -1.28], [0.8, 0.8, 1.0, 0.85, 1.2]])
    assert "clip_ratio/low_mean_low_entropy" not in metrics  # entropies alone: dapo computes no entropy statistics
    h_hat = entropy_signal(HAPO_ENTROPY, HAPO_MASK, HAPO_CONFIG.entropy_pivot)
    _, metrics = get_policy_loss("dapo")(
        HAPO_LOGPS, HAPO_LOGPS - HAPO_RATIOS.log(), ADVANTAGES, HAPO_MASK, HAPO_CONFIG, entropy_signal=h_hat
    )
    close(metrics["clip_ratio/low_mean_low_entropy"], 2 / 8)  # ĥ given (a token signal's): the split for dapo too


@pytest.mark.parametrize("released_sign", [False, True])
def test_hapo_with_components_off_equals_dapo(released_sign):
    torch.manual_seed(0)
    B, T = 6, 12
    mask = (torch.arange(T) < torch.randint(2, T + 1, (B, 1))).float()
    old_logps = -torch.rand(B, T) * 3
    logps = old_logps + 0.4 * torch.randn(B, T)  # off-policy: ratios well away from 1
    advantages, entropy, weights = torch.randn(B), torch.rand(B, T) * 2, torch.rand(B, T)
    config = PolicyLossConfig(
        dual_clip_c=10.0, released_sign=released_sign, adaptive_clip=False, adaptive_advantage=False
    )

    def loss_and_grad(name, config):
        x = logps.clone().requires_grad_(True)
        per_token, _ = get_policy_loss(name)(x, old_logps, advantages, mask, config, weights, entropy)
        loss = aggregate_loss(per_token, mask)
        loss.backward()
        return loss, x.grad

    hapo_loss, hapo_grad = loss_and_grad("hapo", config)
    dapo_loss, dapo_grad = loss_and_grad("dapo", config)
    assert torch.equal(hapo_loss, dapo_loss) and torch.equal(hapo_grad, dapo_grad)
    on_loss, on_grad = loss_and_grad("hapo", dataclasses.replace(config, adaptive_clip=True, adaptive_advantage=True))
    assert not torch.allclose(on_grad, dapo_grad)  # and the components do act off-policy


def test_hapo_needs_entropy():
    with pytest.raises(ValueError, match="entropy"):
        hand_loss("hapo")
    per_token, _ = hand_loss("hapo", PolicyLossConfig(adaptive_clip=False, adaptive_advantage=False))
    close(per_token, PPO_PER_TOKEN)
