"""Tests of HAPO's signals: entropy signal ĥ, adaptive temperature, token-level group advantage, advantage
redistribution and adaptive clip bounds (arXiv 2509.16591). Hand-computed values are written out."""

import math

import pytest
import torch
from transformers import LogitsProcessorList

from tokenweave.losses.policy import adaptive_clip_bounds, redistribute_advantage
from tokenweave.models import build_tiny_tokenizer
from tokenweave.tokens.advantage import token_group_advantage, token_group_advantage_values
from tokenweave.tokens.entropy import EntropyStats, adaptive_temperature, entropy_signal, entropy_stats
from tokenweave.trainers.hapo import AdaptiveTemperatureLogitsProcessor

SQRT3 = math.sqrt(3.0)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Entropy signal ĥ.
# Valid log-entropies l = [−2, −1, 0, 1, 2] (the padding entropy 100 must not count).
#   pivot: nearest 0.8-quantile = sorted l[round(0.8·4) = 3] = 1
#   l − pivot = [−3, −2, −1, 0, 1], mean square = (9+4+1+0+1)/5 = 3 → rms = √3, z = [−3, −2, −1, 0, 1]/√3
#   max z = 1/√3 → scale_pos = √3;  min z = −√3
#   paper:    ĥ = z/|min z| below the pivot → [−1, −2/3, −1/3, 0, 1]   (scale_neg = +1/√3)
#   released: ĥ = z·(1/min z)              → [ 1,  2/3,  1/3, 0, 1]   (scale_neg = −1/√3)
# ---------------------------------------------------------------------------------------------------------------
ENTROPY = torch.tensor([[-2.0, -1.0, 0.0], [1.0, 2.0, 0.0]]).exp()
ENTROPY[1, 2] = 100.0  # padding
ENTROPY_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "released_sign, expected, scale_neg",
    [
        (False, [[-1.0, -2 / 3, -1 / 3], [0.0, 1.0, 0.0]], 1 / SQRT3),
        (True, [[1.0, 2 / 3, 1 / 3], [0.0, 1.0, 0.0]], -1 / SQRT3),
    ],
)
def test_entropy_signal_hand_values(released_sign, expected, scale_neg):
    close(entropy_signal(ENTROPY, ENTROPY_MASK, 0.8, released_sign=released_sign), expected)
    stats = entropy_stats(ENTROPY, ENTROPY_MASK, 0.8, released_sign=released_sign)
    close(stats.pivot, 1.0)
    close(stats.rms, SQRT3)
    close(stats.scale_pos, SQRT3)
    close(stats.scale_neg, scale_neg)


def test_entropy_pivot_is_the_nearest_quantile():
    # 4 valid values [−2, −1, 0, 1], q = 0.5: index round(1.5) = 2 (round half to even, as the official code) → 0
    entropy = torch.tensor([[-2.0, -1.0, 0.0, 1.0]]).exp()
    close(entropy_stats(entropy, torch.ones(1, 4), entropy_pivot=0.5).pivot, 0.0)


def test_entropy_signal_sign_conventions_on_random_entropies():
    torch.manual_seed(0)
    entropy = torch.rand(6, 20) * 3
    mask = (torch.arange(20) < torch.randint(5, 21, (6, 1))).long()
    valid = mask.bool()
    paper = entropy_signal(entropy, mask, 0.8)
    released = entropy_signal(entropy, mask, 0.8, released_sign=True)
    pivot = entropy_stats(entropy, mask, 0.8).pivot

    below = valid & (entropy.log() < pivot)
    assert below.any()
    assert (paper[below] < 0).all()  # paper: negative below the pivot
    assert (released[valid] >= 0).all()  # released code's sign slip: never negative
    close(released[below], -paper[below])  # the two conventions differ only by the sign below the pivot
    assert paper[valid].min() == -1.0 and paper[valid].max() == 1.0
    assert (paper[~valid] == 0).all()


# Statistics of ENTROPY (pivot 1, rms √3) applied to another batch of log-entropies l' = [1.5, 3, −0.5, −5]:
#   above the pivot ĥ = (l'−1)/√3 · √3 = l' − 1 → [0.5, 2]
#   below: paper (l'−1)/√3 · (1/√3) = (l'−1)/3 → [−0.5, −2], released → [0.5, 2]
#   T = T_base·(1 + τ·clamp(ĥ, −1, 1)) with T_base = 2, τ = 0.1
NEXT_ENTROPY = torch.tensor([1.5, 3.0, -0.5, -5.0]).exp()


@pytest.mark.parametrize(
    "released_sign, signal, temperature",
    [
        (False, [0.5, 2.0, -0.5, -2.0], [2.1, 2.2, 1.9, 1.8]),
        (True, [0.5, 2.0, 0.5, 2.0], [2.1, 2.2, 2.1, 2.2]),
    ],
)
def test_stats_applied_to_the_next_batch(released_sign, signal, temperature):
    stats = entropy_stats(ENTROPY, ENTROPY_MASK, 0.8, released_sign=released_sign)
    close(stats.signal(NEXT_ENTROPY), signal)
    close(adaptive_temperature(NEXT_ENTROPY, stats, base_temperature=2.0, tau=0.1), temperature)


def test_adaptive_temperature_without_stats_is_the_base_temperature():
    close(adaptive_temperature(NEXT_ENTROPY, None, base_temperature=2.0, tau=0.1), [2.0] * 4)


@pytest.mark.parametrize("released_sign", [False, True])
@pytest.mark.parametrize("entropy, mask", [
    (torch.ones(1, 0), torch.ones(1, 0)),  # no token gathered from any process
    (ENTROPY, torch.zeros_like(ENTROPY_MASK)),  # every completion masked (e.g. all truncated)
], ids=["no-tokens", "all-masked"])
def test_statistics_of_no_valid_token_are_neutral(entropy, mask, released_sign):
    # no statistics to take: ĥ = 0 for every entropy, so the next generation samples at T_base, as the first one
    stats = entropy_stats(entropy, mask, 0.8, released_sign=released_sign)
    close(stats.signal(NEXT_ENTROPY), [0.0] * 4)
    close(adaptive_temperature(NEXT_ENTROPY, stats, base_temperature=2.0, tau=0.1), [2.0] * 4)
    close(entropy_signal(entropy, mask, 0.8, released_sign=released_sign), torch.zeros(entropy.shape))


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["statistics-in-the-loss", "statistics-at-generation"])
def test_hapo_trains_when_every_completion_is_truncated_and_masked(model_dir, tmp_path, num_iterations):
    # TRL's mask_truncated_completions masks every completion that hits max_completion_length (EOS suppressed here):
    # HAPO's statistics then have no token, from the loss's entropies (on-policy) or from π_old's at generation
    from .grpo_harness import make_trainer

    trainer = make_trainer(model_dir, tmp_path, policy_loss="hapo", mask_truncated_completions=True,
                           max_completion_length=2, num_iterations=num_iterations, max_steps=1,
                           generation_kwargs={"suppress_tokens": [build_tiny_tokenizer().eos_token_id]})
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.signals["hapo"].temperature_processor.stats.scale_pos == 0  # neutral: the next samples at T_base


def test_logits_processor_hand_values():
    # pivot log(log 2), rms 1, scales 1/log 2:
    #   uniform over 2 tokens: H = log 2        → z = 0            → T = 1
    #   uniform over 4 tokens: H = 2·log 2      → z = log 2, ĥ = 1 → T = 1 + τ = 1.5
    #   one-hot:               H = 0 (→ 1e-8)   → ĥ ≪ −1, clamped  → T = 1 − τ = 0.5
    log2 = math.log(2.0)
    stats = EntropyStats(*torch.tensor([math.log(log2), 1.0, 1 / log2, 1 / log2]))
    inf = float("inf")
    scores = torch.tensor([[1.0, 1.0, -inf, -inf], [3.0, 3.0, 3.0, 3.0], [5.0, -inf, -inf, -inf]])
    processor = AdaptiveTemperatureLogitsProcessor(stats, base_temperature=1.0, tau=0.5)
    out = LogitsProcessorList([processor])(torch.zeros(3, 2, dtype=torch.long), scores)
    close(out, [[1.0, 1.0, -inf, -inf], [2.0, 2.0, 2.0, 2.0], [10.0, -inf, -inf, -inf]])

    first_step = AdaptiveTemperatureLogitsProcessor(None, base_temperature=2.0, tau=0.5)  # no statistics yet
    close(first_step(None, scores), scores / 2.0)


def test_logits_processor_on_random_logits():
    torch.manual_seed(0)
    scores = torch.randn(5, 50) * torch.tensor([0.1, 1.0, 3.0, 6.0, 10.0]).unsqueeze(-1)
    stats = entropy_stats(torch.rand(4, 30) * 3, torch.ones(4, 30))
    out = AdaptiveTemperatureLogitsProcessor(stats, base_temperature=0.7, tau=0.05)(None, scores)

    p = (scores / 0.7).softmax(-1)  # the entropy at the base temperature, as the trainer's statistics are
    entropy = -(p * p.log()).sum(-1)
    temperature = 0.7 * (1 + 0.05 * stats.signal(entropy).clamp(-1, 1))
    close(out, scores / temperature.unsqueeze(-1))
    assert ((temperature >= 0.7 * 0.95 - 1e-6) & (temperature <= 0.7 * 1.05 + 1e-6)).all()
    assert temperature[0] > temperature[-1]  # flat rows (high entropy) sample hotter than peaked rows


def test_logits_processor_records_its_temperatures():
    # no statistics: every row at T_base = 2 → the record is [B = 3, steps = 2] of 2.0; popping clears it
    processor = AdaptiveTemperatureLogitsProcessor(None, base_temperature=2.0, record_temperatures=True)
    for _ in range(2):
        processor(None, torch.randn(3, 5))
    close(processor.pop_temperatures(), [[2.0, 2.0]] * 3)
    assert processor.temperatures == []
    silent = AdaptiveTemperatureLogitsProcessor(None)
    silent(None, torch.randn(3, 5))
    assert silent.temperatures == []


# ---------------------------------------------------------------------------------------------------------------
# Token-level group advantage.
#   group 7: rewards [1, 0], lengths [1, 3]: tokens [1, 0, 0, 0], μ = 1/4, σ² = (9/16 + 3/16)/4 = 3/16, σ = √3/4
#            A = (3/4)/(√3/4) = √3 and (−1/4)/(√3/4) = −1/√3;   Σ_tokens A = √3 − 3/√3 = 0
#   group 3: rewards [1, 0, 0], lengths [1, 13, 13]: μ = 1/27, σ = √26/27 → A_1 = √26 ≈ 5.10 ≥ 5
#            → GRPO fall-back: mean 1/3, unbiased std √((4/9 + 2/9)/2) = 1/√3 → [2/√3, −1/√3, −1/√3]
#   with lengths [1, 12, 12] instead: A_1 = √24 ≈ 4.90 < 5, kept: [√24, −1/√24, −1/√24]
# ---------------------------------------------------------------------------------------------------------------
def lengths_mask(lengths, width=13):
    return (torch.arange(width) < torch.tensor(lengths).unsqueeze(-1)).long()


@pytest.mark.parametrize(
    "long_length, group3_adv",
    [(13, [2 / SQRT3, -1 / SQRT3, -1 / SQRT3]), (12, [math.sqrt(24), -1 / math.sqrt(24), -1 / math.sqrt(24)])],
)
def test_token_group_advantage_hand_values(long_length, group3_adv):
    # rows: (group 7, r=1, len 1), (group 3, r=1, len 1), (group 7, r=0, len 3), (group 3, r=0), (group 3, r=0)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    mask = lengths_mask([1, 1, 3, long_length, long_length])
    adv = token_group_advantage(rewards, mask, group_ids=torch.tensor([7, 3, 7, 3, 3]))
    expected = torch.tensor([SQRT3, group3_adv[0], -1 / SQRT3, group3_adv[1], group3_adv[2]])
    close(adv, expected.unsqueeze(-1) * mask, atol=1e-4)  # the eps = 1e-6 added to σ moves √24 by 2.5e-5


def test_token_group_advantage_with_group_size():
    # group 0 as group 7 above; group 1 has equal rewards → σ = 0 → A = 0 (no fall-back)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = lengths_mask([1, 3, 2, 2], width=4)
    adv = token_group_advantage(rewards, mask, group_size=2)
    close(adv, torch.tensor([SQRT3, -1 / SQRT3, 0.0, 0.0]).unsqueeze(-1) * mask)
    close(adv[:2].sum(), 0.0)  # zero-sum over the group's tokens
    # a response without valid tokens neither enters μ, σ nor triggers the fall-back (its A = (10 − 1/4)/(√3/4) ≫ 5)
    with_empty = token_group_advantage(torch.tensor([1.0, 0.0, 10.0]), lengths_mask([1, 3, 0], width=4), group_size=3)
    close(with_empty, torch.tensor([SQRT3, -1 / SQRT3, 0.0]).unsqueeze(-1) * lengths_mask([1, 3, 0], width=4))
    with pytest.raises(ValueError):
        token_group_advantage(rewards, mask)
    with pytest.raises(ValueError):
        token_group_advantage(rewards, mask, group_size=3)


def test_token_group_advantage_values_from_lengths():
    # the same hand group 7 (rewards [1, 0], lengths [1, 3]) given by lengths, and an unscored (NaN) response added
    # to it: it enters neither μ, σ nor the fall-back, and gets A = 0
    values = token_group_advantage_values(torch.tensor([1.0, 0.0]), torch.tensor([1, 3]), group_size=2)
    close(values, [SQRT3, -1 / SQRT3])
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    values = token_group_advantage_values(rewards, torch.tensor([1, 5, 3, 2]), group_ids=torch.tensor([0, 0, 0, 1]))
    close(values, [SQRT3, 0.0, -1 / SQRT3, 0.0])
    # GRPO fall-back (hand group 3 above, lengths [1, 13, 13]) with an unscored response: unbiased std over 3, not 4
    rewards = torch.tensor([1.0, 0.0, 0.0, float("nan")])
    values = token_group_advantage_values(rewards, torch.tensor([1, 13, 13, 4]), group_size=4)
    close(values, [2 / SQRT3, -1 / SQRT3, -1 / SQRT3, 0.0])


# ---------------------------------------------------------------------------------------------------------------
# Advantage redistribution, off-policy. A = 2, adv_beta = 1, ε_lo = 0.2, ε_hi = 0.28 → neutral band (0.9, 1.14).
#   ĥ      0.5   0.5   −0.5  −0.5  0.5   1.0   0.0
#   r      1.2   1.0   1.0   0.8   0.85  1.15  1.0
#   band   out   in    in    out   out   out   in
#   A'     3     2     1     2     3     4     2      (A·(1+ĥ) when ĥ>0 & out, or ĥ≤0 & in: ĥ = 0 is "low")
# ---------------------------------------------------------------------------------------------------------------
H_HAT = torch.tensor([[0.5, 0.5, -0.5, -0.5, 0.5, 1.0, 0.0]])
RATIO = torch.tensor([[1.2, 1.0, 1.0, 0.8, 0.85, 1.15, 1.0]])


def test_redistribute_advantage_hand_values():
    adv, redistributed = redistribute_advantage(torch.tensor([2.0]), H_HAT, RATIO, 0.2, 0.28, adv_beta=1.0)
    close(adv, [[3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 2.0]])
    assert redistributed.tolist() == [[True, False, True, False, True, True, True]]


def test_redistribute_advantage_with_per_token_bounds():
    # The adaptive bounds of these ĥ: ε_lo = 0.2·1.5 = 0.3 where ĥ = −0.5; ε_hi = 0.28·1.5 = 0.42 (ĥ = 0.5),
    # 0.56 (ĥ = 1). Bands: (0.9, 1.21) (0.9, 1.21) (0.85, 1.14) (0.85, 1.14) (0.9, 1.21) (0.9, 1.28) (0.9, 1.14):
    # now r = 1.2 and r = 1.15 are neutral (kept), r = 0.8 still out.
    eps_low, eps_high = adaptive_clip_bounds(H_HAT, 0.2, 0.28, clip_alpha=1.0)
    adv, redistributed = redistribute_advantage(torch.tensor([2.0]), H_HAT, RATIO, eps_low, eps_high, adv_beta=0.5)
    close(adv, [[2.0, 2.0, 1.5, 2.0, 2.5, 2.0, 2.0]])
    assert redistributed.tolist() == [[False, False, True, False, True, False, True]]


def test_redistribution_is_a_no_op_on_policy_for_high_entropy_tokens():
    h_hat = torch.tensor([[0.3, 0.9, -0.4]])
    adv, _ = redistribute_advantage(torch.tensor([[1.0, -1.0, 1.0]]), h_hat, torch.ones(1, 3), 0.2, 0.28)
    close(adv, [[1.0, -1.0, 0.6]])  # only the low-entropy token (attenuated) moves


@pytest.mark.parametrize(
    "clip_alpha, eps_low, eps_high",
    [
        (1.0, [0.4, 0.3, 0.2, 0.2, 0.2], [0.28, 0.28, 0.28, 0.42, 0.56]),
        (0.5, [0.3, 0.25, 0.2, 0.2, 0.2], [0.28, 0.28, 0.28, 0.35, 0.42]),
    ],
)
def test_adaptive_clip_bounds_hand_values(clip_alpha, eps_low, eps_high):
    # ε_lo·(1 − α·ĥ) where ĥ ≤ 0, ε_hi·(1 + α·ĥ) where ĥ > 0
    low, high = adaptive_clip_bounds(torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), 0.2, 0.28, clip_alpha)
    close(low, eps_low)
    close(high, eps_high)
