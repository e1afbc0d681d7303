"""Tests of TokenGRPOTrainer: the registered policy losses against TRL's own GRPOTrainer._compute_loss, off-policy
effects worked out by hand, gradient-accumulation invariance, and short HAPO runs of the tiny model (CPU)."""

import json
import math

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from tokenweave.losses.policy import POLICY_LOSSES
from tokenweave.models import build_tiny_tokenizer
from tokenweave.tokens.advantage import token_group_advantage
from tokenweave.tokens.entropy import entropy_signal, entropy_stats
from tokenweave.train import train
from tokenweave.trainers import TokenGRPOConfig

from .conftest import CONFIGS
from .grpo_harness import (
    assert_same_update,
    digit_reward,
    loss_and_grads,
    make_batch,
    make_trainer,
    token_logps_and_entropies,
    train_dataset,
    with_generation_signals,
)

HAPO_OFF = dict(
    hapo_adaptive_temperature=False, hapo_token_advantage=False, hapo_adaptive_advantage=False, hapo_adaptive_clip=False
)
DATASET = train_dataset()


# ---------------------------------------------------------------------------------------------------------------
# (a) Each policy loss = TRL's loss_type on the same batch: loss and gradients.
# ---------------------------------------------------------------------------------------------------------------
GSPO_CLIP = dict(epsilon=3e-4, epsilon_high=4e-4)  # GSPO's recipe (TRL's examples/scripts/gspo.py)


@pytest.mark.parametrize(
    "policy_loss, ours, trl",
    [
        ("hapo", HAPO_OFF, dict(loss_type="dapo", epsilon_high=0.28)),
        ("dapo", {}, dict(loss_type="dapo", epsilon_high=0.28)),
        ("grpo", {}, dict(loss_type="grpo")),
        ("cispo", {}, dict(loss_type="cispo", epsilon_high=5.0)),
        ("gspo", GSPO_CLIP, dict(loss_type="grpo", importance_sampling_level="sequence", **GSPO_CLIP)),
        ("grpo", dict(loss_agg_mode="seq-mean-token-sum-norm"), dict(loss_type="dr_grpo")),
        ("gspo", dict(loss_agg_mode="seq-mean-token-sum", **GSPO_CLIP),
         dict(loss_type="luspo", importance_sampling_level="sequence", **GSPO_CLIP)),
        ("dapo", dict(beta=0.04), dict(loss_type="dapo", epsilon_high=0.28, beta=0.04)),
        ("grpo", dict(beta=0.04, top_entropy_quantile=0.5),
         dict(loss_type="grpo", beta=0.04, top_entropy_quantile=0.5)),
    ],
)
def test_policy_loss_equals_trl_loss_type(model_dir, tmp_path, policy_loss, ours, trl):
    trainer = make_trainer(model_dir, tmp_path, policy_loss=policy_loss, **ours)
    reference = make_trainer(model_dir, tmp_path, GRPOTrainer, GRPOConfig, **trl)
    batch = make_batch(trainer)
    assert_same_update(loss_and_grads(trainer, [batch]), loss_and_grads(reference, [batch]))
    if policy_loss != "cispo":  # a real off-policy batch: clipping acted
        assert max(trainer._metrics["train"]["clip_ratio/region_mean"]) > 0

    # and the metrics TRL logs (the loss's: a superset of TRL's), with the same values
    ours, theirs = trainer._metrics["train"], reference._metrics["train"]
    expected = {"cispo_clip_ratio"} if policy_loss == "cispo" else {
        f"clip_ratio/{name}" for name in ("low_mean", "high_mean", "region_mean", "low_min", "high_max")
    }
    expected |= {"entropy"} | ({"kl"} if trainer.beta else set())
    assert expected <= set(theirs) and set(theirs) <= set(ours)
    for name in theirs:
        if policy_loss == "gspo" and name.endswith("_mean"):
            continue  # one ratio per sequence: TRL's clip means count sequences, ours tokens (losses.policy)
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


ENTROPY_BONUS = dict(entropy_coef=0.1)
ADAPTIVE_ENTROPY = dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_coef_delta=0.02, entropy_target=100.0)


@pytest.mark.parametrize(
    "policy_loss, ours, trl",
    [
        ("grpo", ENTROPY_BONUS, dict(loss_type="grpo", **ENTROPY_BONUS)),
        ("dapo", ENTROPY_BONUS, dict(loss_type="dapo", epsilon_high=0.28, **ENTROPY_BONUS)),
        ("grpo", dict(top_entropy_quantile=0.5, **ENTROPY_BONUS),
         dict(loss_type="grpo", top_entropy_quantile=0.5, **ENTROPY_BONUS)),
        ("hapo", HAPO_OFF | ADAPTIVE_ENTROPY, dict(loss_type="dapo", epsilon_high=0.28, **ADAPTIVE_ENTROPY)),
        ("grpo", dict(gradient_accumulation_steps=2, **ADAPTIVE_ENTROPY),
         dict(loss_type="grpo", gradient_accumulation_steps=2, **ADAPTIVE_ENTROPY)),
    ],
    ids=["grpo", "dapo", "grpo-entropy-mask", "hapo-adaptive", "grpo-adaptive-ga2"],
)
def test_trl_entropy_bonus_with_a_policy_loss_equals_trl(model_dir, tmp_path, policy_loss, ours, trl):
    """TRL's entropy bonus (static and adaptive) on a registered loss equals TRL's on the same batches: loss,
    gradients, the adaptive coefficient over two optimizer steps, and the logged policy_loss / entropy_coef."""
    trainer = make_trainer(model_dir, tmp_path, policy_loss=policy_loss, **ours)
    reference = make_trainer(model_dir, tmp_path, GRPOTrainer, GRPOConfig, **trl)
    batches = [make_batch(trainer, seed=seed) for seed in (0, 1)]
    for batch in batches:  # two optimizer steps: the adaptive coefficient of the first applies in the second
        assert_same_update(loss_and_grads(trainer, [batch]), loss_and_grads(reference, [batch]))
        assert trainer.entropy_coef == pytest.approx(reference.entropy_coef, abs=1e-12)
    if trainer.use_adaptive_entropy:
        assert trainer.entropy_coef == pytest.approx(0.05 + 2 * 0.02)  # entropy <= target at both steps: up twice
    ours, theirs = trainer._metrics["train"], reference._metrics["train"]
    for name in ("policy_loss", "entropy_coef", "entropy"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


def test_the_entropy_bonus_subtracts_coef_times_the_masked_mean_entropy(model_dir, tmp_path):
    """By hand: loss(c) = loss(0) − c · Σ H·m / Σ m on one micro-batch."""
    plain = make_trainer(model_dir, tmp_path, policy_loss="dapo")
    bonus = make_trainer(model_dir, tmp_path, policy_loss="dapo", entropy_coef=0.3)
    batch = make_batch(plain)
    _, entropies = token_logps_and_entropies(plain, batch)
    mask = batch["completion_mask"]
    mean_entropy = ((entropies * mask).sum() / mask.sum()).item()
    assert loss_and_grads(bonus, [batch])[0] == pytest.approx(loss_and_grads(plain, [batch])[0] - 0.3 * mean_entropy,
                                                              abs=1e-6)


def test_without_policy_loss_it_is_trl(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, loss_type="bnpo")
    reference = make_trainer(model_dir, tmp_path, GRPOTrainer, GRPOConfig, loss_type="bnpo")
    batch = make_batch(trainer)
    assert trainer.policy_loss_fn is None
    assert_same_update(loss_and_grads(trainer, [batch]), loss_and_grads(reference, [batch]))


def limit_torch_quantile(monkeypatch, limit: int) -> None:
    """``torch.quantile`` refusing more than ``limit`` elements, as it refuses more than 2^24: a generation batch's
    tokens gathered over 64 processes (16 completions × 16k tokens each) pass that."""
    unlimited = torch.quantile

    def limited(values, *args, **kwargs):
        if values.numel() > limit:
            raise RuntimeError("quantile() input tensor is too large")
        return unlimited(values, *args, **kwargs)

    monkeypatch.setattr(torch, "quantile", limited)


@pytest.mark.parametrize("ours", [dict(policy_loss="grpo"), dict(loss_type="grpo")], ids=["policy-loss", "trl-path"])
def test_entropy_quantiles_and_trls_top_entropy_mask_take_any_number_of_tokens(model_dir, tmp_path, monkeypatch, ours):
    """The entropy metrics' quantiles and TRL's top-entropy mask (``top_entropy_quantile``, which TRL's own
    ``_compute_loss`` also calls) use tokens.quantile.quantile: TRL's values, with torch.quantile's limit mocked down
    to 4 of the batch's 33 tokens."""
    trainer = make_trainer(model_dir, tmp_path, top_entropy_quantile=0.5, **ours)
    reference = make_trainer(model_dir, tmp_path, GRPOTrainer, GRPOConfig, loss_type="grpo", top_entropy_quantile=0.5)
    batch = make_batch(trainer)
    mask = batch["completion_mask"]
    _, entropies = token_logps_and_entropies(trainer, batch)
    trl_mask = reference.get_high_entropy_mask(entropies, mask, 0.5)
    trl_update = loss_and_grads(reference, [batch])
    trl_quantiles = torch.quantile(entropies[mask.bool()], torch.tensor([0.2, 0.5, 0.8])).tolist()
    assert 0 < trl_mask.sum() < mask.sum()

    limit_torch_quantile(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="too large"):
        reference.get_high_entropy_mask(entropies, mask, 0.5)
    assert torch.equal(trainer.get_high_entropy_mask(entropies, mask, 0.5), trl_mask)
    assert_same_update(loss_and_grads(trainer, [batch]), trl_update)
    if "policy_loss" in ours:  # the metrics tokenweave adds to TRL's
        metrics = trainer._metrics["train"]
        assert [metrics[f"entropy/q{q}"][-1] for q in (20, 50, 80)] == pytest.approx(trl_quantiles, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (b) Off-policy effects by hand. Old log-probs are set so that every ratio is exactly r = 1.5, A = +1:
#   dapo: clip(1.5, 0.8, 1.28) = 1.28 → ℓ = −1.28 on every token, loss = −1.28, and no gradient (all clipped);
#         with A = −1 the ratio is not clipped: ℓ = 1.5·... and the gradient flows.
#   hapo (paper sign): every ratio is outside the neutral band (0.9, 1.14), so
#         ĥ > 0: A' = 1 + ĥ (amplified), ε_hi = 0.28·(1 + ĥ) → ℓ = −(1 + ĥ)·min(1.5, 1.28 + 0.28·ĥ)
#         ĥ ≤ 0: A' = A, ε_hi = 0.28                     → ℓ = −1.28
#         redistributed tokens = the ĥ > 0 ones.
# ---------------------------------------------------------------------------------------------------------------
def ratio_batch(trainer, ratio, advantage):
    batch = make_batch(trainer)
    logps, entropies = token_logps_and_entropies(trainer, batch)
    batch["old_per_token_logps"] = logps - math.log(ratio)
    batch["advantages"] = torch.full_like(batch["advantages"], advantage)
    return batch, entropies


def test_dapo_clipping_by_hand(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo")
    clipped, _ = ratio_batch(trainer, 1.5, +1.0)
    loss, grads = loss_and_grads(trainer, [clipped])
    assert loss == pytest.approx(-1.28, abs=1e-5)
    assert all(grad.abs().max() == 0 for grad in grads)
    assert trainer._metrics["train"]["clip_ratio/high_mean"][-1] == 1.0

    unclipped, _ = ratio_batch(trainer, 1.5, -1.0)
    loss, grads = loss_and_grads(trainer, [unclipped])
    assert loss == pytest.approx(1.5, abs=1e-5)
    assert max(grad.abs().max() for grad in grads) > 0


@pytest.mark.parametrize("entropy_stats_scope", ["generation_batch", "micro_batch"])
def test_hapo_redistribution_and_adaptive_clip_by_hand(model_dir, tmp_path, entropy_stats_scope):
    # One micro-batch and unchanged weights: both scopes give the ĥ of this batch's entropies and statistics.
    trainer = make_trainer(
        model_dir, tmp_path, policy_loss="hapo", hapo_adaptive_temperature=False, hapo_entropy_stats=entropy_stats_scope
    )
    batch, entropies = ratio_batch(trainer, 1.5, +1.0)
    if entropy_stats_scope == "generation_batch":
        batch = with_generation_signals(trainer, batch)
    mask = batch["completion_mask"].bool()
    h_hat = entropy_signal(entropies, batch["completion_mask"], 0.8)
    high = h_hat > 0
    expected = torch.where(high, -(1 + h_hat) * torch.clamp(1.28 + 0.28 * h_hat, max=1.5), -1.28)
    loss, grads = loss_and_grads(trainer, [batch])
    assert loss == pytest.approx((expected[mask].sum() / mask.sum()).item(), abs=1e-5)
    metrics = trainer._metrics["train"]
    assert metrics["hapo/redistributed_frac"][-1] == pytest.approx(high[mask].float().mean().item())
    assert 0 < metrics["hapo/redistributed_frac"][-1] < 1
    assert metrics["clip_ratio/high_mean_low_entropy"][-1] == 1.0  # 1.5 > 1.28: clipped
    # high-entropy tokens are clipped only where 1.28 + 0.28·ĥ < 1.5, i.e. ĥ < 0.22/0.28; the others carry a gradient
    assert metrics["clip_ratio/high_mean_high_entropy"][-1] < 1.0
    assert max(grad.abs().max() for grad in grads) > 0
    if entropy_stats_scope == "generation_batch":
        del batch["entropy_signal"]
        with pytest.raises(KeyError, match="entropy_signal"):
            trainer.compute_loss(trainer.model, batch)


def test_token_weights_column_multiplies_the_loss(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo", token_weights_column="critical_weights")
    batch, _ = ratio_batch(trainer, 1.5, +1.0)
    weights = torch.rand(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(1))
    batch["critical_weights"] = weights
    loss, _ = loss_and_grads(trainer, [batch])
    mask = batch["completion_mask"]
    assert loss == pytest.approx((-1.28 * (weights * mask).sum() / mask.sum()).item(), abs=1e-5)
    del batch["critical_weights"]
    with pytest.raises(KeyError, match="critical_weights"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("policy_loss", ["grpo", "dapo", "gspo", "cispo", "hapo"])
def test_only_a_signal_that_is_on_computes_entropy_statistics(model_dir, tmp_path, monkeypatch, policy_loss):
    # grpo, dapo, gspo, cispo run no token signal: no entropy statistics at generation or in the loss, no ĥ metrics;
    # hapo (the control: the spy sees it) computes them.
    trainer = make_trainer(model_dir, tmp_path, policy_loss=policy_loss, num_iterations=2)
    calls = []

    def spy(original):
        return lambda *args, **kwargs: calls.append(original) or original(*args, **kwargs)

    import tokenweave.tokens.entropy as token_entropy
    import tokenweave.trainers.hapo as hapo

    monkeypatch.setattr(token_entropy, "entropy_stats", spy(token_entropy.entropy_stats))
    monkeypatch.setattr(hapo, "entropy_stats", spy(hapo.entropy_stats))
    output = trainer._generate_and_score_completions([DATASET[0]] * 4 + [DATASET[1]] * 4)
    loss_and_grads(trainer, [output])
    metrics = set(trainer._metrics["train"])
    if policy_loss == "hapo":
        assert trainer.args.token_signals == ["hapo"] and calls and "entropy_signal/mean" in metrics
    else:
        assert trainer.args.token_signals == [] and trainer.signals == {} and calls == []
        assert not {name for name in metrics if "entropy_signal" in name or name.endswith("_entropy")}


# ---------------------------------------------------------------------------------------------------------------
# (c) Gradient accumulation: (batch 8, GA 1) and (batch 4, GA 2) give the same update, micro-batches split as TRL
# splits a generation batch. HAPO's ĥ comes with the batch (column entropy_signal, statistics of the whole generation
# batch, as _generate_and_score_completions adds it); the halves' own statistics differ, so per-micro-batch
# statistics (hapo_entropy_stats: micro_batch, the released code's) would not be invariant.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_loss", sorted(POLICY_LOSSES))
def test_gradient_accumulation_invariance(model_dir, tmp_path, policy_loss):
    one_step = make_trainer(model_dir, tmp_path, policy_loss=policy_loss, hapo_adaptive_temperature=False)
    accumulated = make_trainer(
        model_dir, tmp_path, policy_loss=policy_loss, hapo_adaptive_temperature=False,
        per_device_train_batch_size=4, gradient_accumulation_steps=2,
    )
    batch = with_generation_signals(one_step, make_batch(one_step))
    assert batch["completion_mask"][:4].sum() != batch["completion_mask"][4:].sum()
    if policy_loss == "hapo":
        _, entropies = token_logps_and_entropies(one_step, batch)
        halves = [entropy_stats(entropies[rows], batch["completion_mask"][rows]) for rows in (slice(0, 4), slice(4, 8))]
        assert not torch.allclose(halves[0].pivot, halves[1].pivot)
    assert_same_update(loss_and_grads(accumulated, split_tensor_dict(batch, 2)), loss_and_grads(one_step, [batch]))


# ---------------------------------------------------------------------------------------------------------------
# Token-level group advantage from the generation step: the rewards of the sampled completions, recomputed here
# from their text, give token_group_advantage over groups of num_generations.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_loss", ["dapo", None])  # None: TRL's loss_type path, which takes [B, T] too
def test_generation_gives_token_level_group_advantages(model_dir, tmp_path, policy_loss):
    eos = build_tiny_tokenizer().eos_token_id
    trainer = make_trainer(  # EOS made likelier (+3 logits), for completions of varied lengths
        model_dir, tmp_path, policy_loss=policy_loss, hapo_token_advantage=True, max_completion_length=12,
        generation_kwargs={"sequence_bias": {(eos,): 3.0}},
    )
    rows = [DATASET[0]] * 4 + [DATASET[1]] * 4
    output = trainer._generate_and_score_completions(rows)
    mask = output["completion_mask"]
    texts = trainer.processing_class.batch_decode(
        output["completion_ids"].masked_fill(mask == 0, trainer.processing_class.pad_token_id), skip_special_tokens=True
    )
    rewards = torch.tensor(digit_reward([[{"role": "assistant", "content": text}] for text in texts]))
    assert output["advantages"].shape == mask.shape
    assert len(set(mask.sum(-1).tolist())) > 1  # unequal lengths: token-level differs from sequence-level
    torch.testing.assert_close(output["advantages"], token_group_advantage(rewards, mask, group_size=4))


def test_adaptive_sampling_hands_the_processor_to_generate(model_dir, tmp_path, monkeypatch):
    # T_base = 0.7: generate must get the processor and temperature 1 (not 0.7 twice); evaluation samples as TRL does
    trainer = make_trainer(model_dir, tmp_path, policy_loss="hapo", temperature=0.7, max_completion_length=4)
    calls = []
    generate = type(trainer.model).generate

    def spy(model, *args, generation_config, logits_processor=None, **kwargs):
        calls.append((generation_config.temperature, list(logits_processor or [])))
        return generate(model, *args, generation_config=generation_config, logits_processor=logits_processor, **kwargs)

    monkeypatch.setattr(type(trainer.model), "generate", spy)
    trainer._generate_and_score_completions([DATASET[0]] * 8)
    assert calls == [(1.0, [trainer.signals["hapo"].temperature_processor])]
    assert trainer._metrics["train"]["hapo/sampling_temperature"] == [pytest.approx(0.7)]  # no statistics yet
    assert trainer.generation_config.temperature == 0.7 and "generate" not in vars(trainer.model)
    trainer.model.eval()
    trainer._generate_and_score_completions([DATASET[0]] * 8)
    assert calls[-1] == (0.7, [])


@pytest.mark.parametrize(
    "batching, generation_forwards",
    [
        (dict(), []),  # on-policy, one micro-batch per generation: the loss's forward gives the entropies
        (dict(num_iterations=2), [True]),  # TRL's old-log-prob forward computes them too
        (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2), [True]),  # on-policy, 2 micro-batches
    ],
)
def test_the_generation_batch_entropy_signal_costs_at_most_one_forward(
    model_dir, tmp_path, monkeypatch, batching, generation_forwards
):
    trainer = make_trainer(model_dir, tmp_path, policy_loss="hapo", hapo_adaptive_temperature=False, **batching)
    forwards = []
    trl_forward = GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, model, *args, **kwargs):
        forwards.append(kwargs.get("compute_entropy", False))
        return trl_forward(self, model, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    output = trainer._generate_and_score_completions([DATASET[0]] * 4 + [DATASET[1]] * 4)
    assert forwards == generation_forwards
    monkeypatch.undo()
    _, entropies = token_logps_and_entropies(trainer, output)
    expected = entropy_signal(entropies, output["completion_mask"], trainer.args.entropy_pivot)
    assert (expected[output["completion_mask"].bool()] < 0).any() and (expected > 0).any()
    if generation_forwards:
        torch.testing.assert_close(output["entropy_signal"], expected, atol=1e-5, rtol=0)
    else:  # the loss computes ĥ from its own entropies: the same update as with the column given
        assert "entropy_signal" not in output
        output["advantages"] = torch.randn(len(output["advantages"]), generator=torch.Generator().manual_seed(0))
        own = loss_and_grads(trainer, [output])
        assert_same_update(own, loss_and_grads(trainer, [output | {"entropy_signal": expected}]))
        # and ĥ acts on-policy: low-entropy tokens (ĥ ≤ 0, ratio 1) get A·(1 + ĥ), so another ĥ moves the loss
        assert abs(loss_and_grads(trainer, [output | {"entropy_signal": 0.5 * expected}])[0] - own[0]) > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# (d) Short HAPO runs, every part on: 2 updates per generation (steps_per_generation 2 > GA 1: the generation
# batch's entropies come from TRL's old-log-prob forward), and on-policy with one update per generation (they come
# from the loss's forward). Either way the second generation samples with the first one's statistics.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps_per_generation", [2, 1])
def test_hapo_training_run(model_dir, tmp_path, steps_per_generation):
    trainer = make_trainer(
        model_dir, tmp_path, policy_loss="hapo", dual_clip_c=10.0, per_device_train_batch_size=4,
        steps_per_generation=steps_per_generation, max_steps=2 * steps_per_generation, learning_rate=2e-2,
        max_completion_length=8,
    )
    assert trainer.args.hapo_adaptive_temperature and trainer.args.hapo_token_advantage
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 * steps_per_generation
    for key in ("entropy", "entropy/q20", "entropy/q80", "hapo/redistributed_frac", "entropy_signal/mean",
                "clip_ratio/high_mean_high_entropy", "clip_ratio/low_mean_low_entropy"):
        assert all(key in entry for entry in logs), key
    temperatures = [entry["hapo/sampling_temperature"] for entry in logs if "hapo/sampling_temperature" in entry]
    assert len(temperatures) == 2  # one per generation
    assert temperatures[0] == pytest.approx(1.0)  # first generation: no statistics yet, T_base
    assert temperatures[1] != pytest.approx(1.0, abs=1e-4)  # then entropy-adaptive, within T_base·[0.95, 1.05]
    assert 0.95 - 1e-6 <= temperatures[1] <= 1.05 + 1e-6
    assert trainer.signals["hapo"].temperature_processor.stats is not None
    region = max(entry["clip_ratio/region_mean"] for entry in logs)
    assert region > 0 if steps_per_generation == 2 else region == 0  # the second update of a batch is off-policy
    assert trainer._buffered_inputs[0]["advantages"].dim() == 2
    assert any(not torch.equal(param, initial[name]) for name, param in trainer.model.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# A token signal's state goes into each checkpoint and comes back on resume: HAPO's sampler statistics, so the first
# generation of a resumed run samples as the saved run's next one would have (not at T_base, as a fresh run does).
# ---------------------------------------------------------------------------------------------------------------
def test_signal_state_round_trips_through_a_checkpoint(model_dir, tmp_path):
    from tokenweave.trainers.host import SIGNAL_STATE_FILE, TOKEN_METRICS_FILE

    settings = dict(policy_loss="hapo", per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    saved = make_trainer(model_dir, tmp_path, max_steps=2, **settings)
    saved.train()
    stats = saved.signals["hapo"].temperature_processor.stats
    assert stats is not None
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / SIGNAL_STATE_FILE).exists()
    prefixes = json.loads((checkpoint / TOKEN_METRICS_FILE).read_text())  # what `tokenweave plot` shows of it
    assert {"entropy/q", "clip_ratio/", "hapo/", "entropy_signal/"} <= set(prefixes)

    resumed = make_trainer(model_dir, tmp_path, max_steps=3, **settings)
    hapo = resumed.signals["hapo"]
    assert hapo.temperature_processor.stats is None  # a fresh trainer samples its first generation at T_base
    sampled_with = []
    sample = hapo.sample

    def recording_sample(generate, training):
        sampled_with.append(hapo.temperature_processor.stats)
        return sample(generate, training)

    hapo.sample = recording_sample
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3 and len(sampled_with) == 1
    for name in ("pivot", "rms", "scale_pos", "scale_neg"):
        assert torch.equal(getattr(sampled_with[0], name), getattr(stats, name)), name


# ---------------------------------------------------------------------------------------------------------------
# Config resolution and errors.
# ---------------------------------------------------------------------------------------------------------------
def config(**kwargs):
    return TokenGRPOConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=False, **kwargs)


def test_config_defaults_follow_the_policy_loss():
    hapo = config(policy_loss="hapo")
    assert (hapo.loss_agg_mode, hapo.epsilon_high, hapo.loss_type) == ("token-mean", 0.28, "dapo")
    assert hapo.hapo_adaptive_temperature and hapo.hapo_token_advantage
    assert hapo.hapo_adaptive_advantage and hapo.hapo_adaptive_clip
    assert (hapo.temperature_tau, hapo.entropy_pivot, hapo.adv_beta, hapo.clip_alpha) == (0.05, 0.8, 1.0, 1.0)
    gspo = config(policy_loss="gspo")
    assert (gspo.loss_agg_mode, gspo.importance_sampling_level) == ("seq-mean-token-mean", "sequence")
    assert gspo.loss_type == "grpo"
    assert not gspo.hapo_token_advantage
    assert config(policy_loss="cispo").policy_loss_config().cispo_epsilon_max == 5.0
    assert config(policy_loss="grpo").policy_loss_config().epsilon_high == 0.2
    assert config(policy_loss="dapo", hapo_token_advantage=True, hapo_adaptive_temperature=True).hapo_token_advantage
    assert config().policy_loss is None and config(hapo_token_advantage=True).hapo_token_advantage


def test_token_signals_follow_the_config():
    assert config(policy_loss="hapo").token_signals == ["hapo"]  # policy_loss: hapo keeps its meaning
    assert config(policy_loss="dapo").token_signals == [] and config().token_signals == []
    # the hapo signal with another loss: HAPO's generation parts (3.1, 3.2) are on, its loss parts are the hapo loss's
    dapo = config(policy_loss="dapo", token_signals=["hapo"])
    assert dapo.token_signals == ["hapo"] and dapo.hapo_adaptive_temperature and dapo.hapo_token_advantage
    assert not (dapo.hapo_adaptive_clip or dapo.hapo_adaptive_advantage)
    assert config(hapo_token_advantage=True).token_signals == ["hapo"]  # TRL's loss_type path, [B, T] advantages
    assert config(token_signals=["hapo"]).hapo_token_advantage
    # a signal with nothing to do is dropped: the released code's ĥ is the loss's own, per micro-batch
    generation_off = dict(hapo_adaptive_temperature=False, hapo_token_advantage=False)
    assert config(policy_loss="hapo", hapo_entropy_stats="micro_batch", **generation_off).token_signals == []
    assert config(policy_loss="hapo", **generation_off).token_signals == ["hapo"]  # ĥ from the generation batch
    assert config(policy_loss="dapo", token_signals=["hapo"], **generation_off).token_signals == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy_loss="nope"), "unknown policy loss 'nope'"),
        (dict(hapo_adaptive_temperature=True), "need a policy_loss"),
        (dict(token_weights_column="w"), "need a policy_loss"),
        (dict(policy_loss="dapo", hapo_adaptive_clip=True), "a part of the hapo and rank_grpo policy losses"),
        (dict(policy_loss="dapo", hapo_adaptive_advantage=True), "a part of the hapo policy loss"),
        (dict(policy_loss="rank_grpo", rank_list_length=0), "rank_list_length must be >= 1, got 0"),
        (dict(policy_loss="rank_grpo", rank_credit="dcg"), "rank_credit must be one of .*got .dcg."),
        (dict(policy_loss="rank_grpo", hapo_adaptive_clip=True, hapo_entropy_stats="micro_batch"),
         "hapo_entropy_stats must be .generation_batch."),
        (dict(policy_loss="dapo", loss_agg_mode="mean"), "unknown loss_agg_mode"),
        (dict(policy_loss="hapo", dual_clip_c=0.5), "dual_clip_c must be > 1"),
        (dict(policy_loss="dapo", token_signals=["nope"]), "unknown token signal 'nope'; registered: .*hapo"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# (e) The shipped configs run through tokenweave train.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, metric",
    [
        ("hapo_tiny", "hapo/redistributed_frac"),
        ("dapo_tiny", "clip_ratio/high_max"),
        ("cispo_tiny", "cispo_clip_ratio"),
        ("gspo_tiny", "clip_ratio/region_mean"),
        ("attention_credit_tiny", "attention_credit/credited_frac"),
        ("dapo_adaptive_entropy_tiny", "entropy_coef"),
    ],
)
def test_tiny_config_trains(name, metric, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWEAVE_CACHE", str(tmp_path / "cache"))
    overrides = ["--max_steps", "2", "--max_completion_length", "8"]  # one generation batch, two updates
    info = train(["--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", str(tmp_path / "out"), *overrides])
    assert info["global_step"] == 2
    logs = [entry for entry in info["log_history"] if "loss" in entry]
    assert len(logs) == 2 and all("entropy/q80" in entry and metric in entry for entry in logs)
    assert all(("entropy_signal/mean" in entry) == (name == "hapo_tiny") for entry in logs)  # only hapo's signal
    assert (tmp_path / "out" / "config.json").exists()


def test_a_policy_loss_from_user_code_gets_its_own_hyperparameters(model_dir, tmp_path):
    """``policy_loss: package.module:function`` with ``policy_loss_kwargs``: the loss and its gradients are
    ``scale`` × those of the registered loss it wraps, on the same batch (an undecorated loss gets the registry's
    defaults, token-mean: here set to grpo's)."""
    registered = make_trainer(model_dir, tmp_path, policy_loss="grpo")
    user = make_trainer(model_dir, tmp_path, policy_loss="tests.user_policy_loss:scaled_grpo", loss_type="grpo",
                        loss_agg_mode="seq-mean-token-mean", policy_loss_kwargs='{"scale": 2.5}')  # JSON, as on the CLI
    assert user.args.policy_loss_kwargs == {"scale": 2.5}
    batch = make_batch(registered)
    loss, grads = loss_and_grads(user, [batch])
    expected_loss, expected_grads = loss_and_grads(registered, [batch])
    assert loss == pytest.approx(2.5 * expected_loss, rel=1e-5) and expected_loss != 0
    assert_same_update((loss, grads), (2.5 * expected_loss, [2.5 * grad for grad in expected_grads]))
    with pytest.raises(ValueError, match="has no function 'nope'"):
        TokenGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, policy_loss="tests.user_policy_loss:nope")
    with pytest.raises(ValueError, match="need a policy_loss"):
        TokenGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, policy_loss_kwargs={"scale": 2.0})
