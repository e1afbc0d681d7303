"""Tests of TokenGRPOTrainer: the registered policy losses against TRL's own GRPOTrainer._compute_loss, off-policy
effects worked out by hand, gradient-accumulation invariance, and short HAPO runs of the tiny model (CPU)."""

import math

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from tokenweave.data.arithmetic import load_arithmetic
from tokenweave.losses.policy import POLICY_LOSSES
from tokenweave.models import build_tiny_tokenizer
from tokenweave.tokens.advantage import token_group_advantage
from tokenweave.tokens.entropy import entropy_signal, entropy_stats
from tokenweave.train import train
from tokenweave.trainers import TokenGRPOConfig, TokenGRPOTrainer

from .conftest import CONFIGS
from .grpo_invariance_probe import token_logps_and_entropies

HAPO_OFF = dict(
    hapo_adaptive_temperature=False, hapo_token_advantage=False, hapo_adaptive_advantage=False, hapo_adaptive_clip=False
)
DATASET = load_arithmetic("train", "prompt", 16)


def digit_reward(completions, **kwargs):
    """The share of digits in the completion: varied rewards even for a random model (character tokenizer)."""
    texts = [completion[-1]["content"] for completion in completions]
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in texts]


def make_trainer(model_dir, output_dir, trainer_class=TokenGRPOTrainer, config_class=TokenGRPOConfig, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    config = config_class(**(kwargs | overrides))
    trainer = trainer_class(model=model_dir, reward_funcs=[digit_reward], args=config, train_dataset=DATASET)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps  # set by Trainer when training
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# A generation batch of 8 completions (2 prompts × 4) as _generate_and_score_completions returns it, off-policy:
# old log-probs are the model's, shifted by N(0, 0.3²), so ratios leave the clip range. Lengths are unequal, so a
# per-micro-batch token mean would differ from the global one.
# ---------------------------------------------------------------------------------------------------------------
LENGTHS = [6, 3, 5, 1, 6, 2, 4, 6]


def make_batch(trainer, lengths=LENGTHS, seed=0, log_ratio_std=0.3):
    generator = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    pad = trainer.processing_class.pad_token_id
    prompt_mask = (torch.arange(5) >= torch.tensor([0, 2] * (n // 2)).unsqueeze(1)).long()  # left padding
    completion_mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    batch = {
        "prompt_ids": torch.randint(4, 100, (n, 5), generator=generator).masked_fill(prompt_mask == 0, pad),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(4, 100, (n, width), generator=generator).masked_fill(completion_mask == 0, pad),
        "completion_mask": completion_mask,
        "advantages": torch.randn(n, generator=generator),
        "num_items_in_batch": completion_mask.sum(),
    }
    logps, _ = token_logps_and_entropies(trainer, batch)
    batch["old_per_token_logps"] = logps + log_ratio_std * torch.randn(logps.shape, generator=generator)
    batch["ref_per_token_logps"] = logps + log_ratio_std * torch.randn(logps.shape, generator=generator)
    return batch


def loss_and_grads(trainer, batches):
    """Σ of the micro-batch losses (as Trainer accumulates them), and the accumulated gradients."""
    trainer.model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        total += loss.item()
    return total, [param.grad.clone() for param in trainer.model.parameters()]


def assert_same_update(actual, expected, atol=1e-5):
    assert actual[0] == pytest.approx(expected[0], abs=atol)
    for grad, expected_grad in zip(actual[1], expected[1], strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=0)


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


def test_without_policy_loss_it_is_trl(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, loss_type="bnpo")
    reference = make_trainer(model_dir, tmp_path, GRPOTrainer, GRPOConfig, loss_type="bnpo")
    batch = make_batch(trainer)
    assert trainer.policy_loss_fn is None
    assert_same_update(loss_and_grads(trainer, [batch]), loss_and_grads(reference, [batch]))


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
        batch["entropy_signal"] = trainer._generation_entropy_signal(batch)[1]
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
            trainer._compute_loss(trainer.model, batch)


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
        trainer._compute_loss(trainer.model, batch)


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
    batch = make_batch(one_step)
    assert batch["completion_mask"][:4].sum() != batch["completion_mask"][4:].sum()
    if policy_loss == "hapo":
        batch["entropy_signal"] = one_step._generation_entropy_signal(batch)[1]
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
    assert calls == [(1.0, [trainer.temperature_processor])]
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
    assert trainer.temperature_processor.stats is not None
    region = max(entry["clip_ratio/region_mean"] for entry in logs)
    assert region > 0 if steps_per_generation == 2 else region == 0  # the second update of a batch is off-policy
    assert trainer._buffered_inputs[0]["advantages"].dim() == 2
    assert any(not torch.equal(param, initial[name]) for name, param in trainer.model.named_parameters())


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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy_loss="nope"), "unknown policy loss 'nope'"),
        (dict(hapo_adaptive_temperature=True), "need a policy_loss"),
        (dict(token_weights_column="w"), "need a policy_loss"),
        (dict(policy_loss="dapo", hapo_adaptive_clip=True), "parts of the hapo policy loss"),
        (dict(policy_loss="dapo", loss_agg_mode="mean"), "unknown loss_agg_mode"),
        (dict(policy_loss="hapo", dual_clip_c=0.5), "dual_clip_c must be > 1"),
        (dict(policy_loss="hapo", entropy_coef=0.01), "entropy bonus"),
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
        ("dapo_tiny", "clip_ratio/high_mean_high_entropy"),
        ("cispo_tiny", "cispo_clip_ratio"),
        ("gspo_tiny", "clip_ratio/region_mean"),
    ],
)
def test_tiny_config_trains(name, metric, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWEAVE_CACHE", str(tmp_path / "cache"))
    overrides = ["--max_steps", "2", "--max_completion_length", "8"]  # one generation batch, two updates
    info = train(["--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", str(tmp_path / "out"), *overrides])
    assert info["global_step"] == 2
    logs = [entry for entry in info["log_history"] if "loss" in entry]
    assert len(logs) == 2 and all("entropy/q80" in entry and metric in entry for entry in logs)
    assert (tmp_path / "out" / "config.json").exists()
