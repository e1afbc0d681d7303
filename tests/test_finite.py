"""Non-finite values never pass silently (tokenweave/trainers/finite.py): infinite rewards follow TRL's rule for a
missing reward and are counted; a token signal's NaN stops the run naming it; a non-finite loss stops before its
backward pass and a non-finite gradient norm before the optimizer step, with nothing logged or saved, and the step
numbered as the log numbers it; under fp16 loss scaling a non-finite gradient norm is the scaler's overflow: the step
is skipped and counted, and training goes on."""

import math

import pytest
import torch
from transformers import TrainerCallback

from tokenweave.trainers.finite import NonFiniteError
from tokenweave.trainers.signals import TokenSignal, TOKEN_SIGNALS, register_token_signal

from .grpo_harness import make_trainer, train_dataset


def rows():
    dataset = train_dataset()
    return [dataset[0]] * 4 + [dataset[1]] * 4


def reward_with(value):
    """A reward of 0.1·i for completion i, and ``value`` for completion 2."""

    def reward(completions, **kwargs):
        return [value if index == 2 else 0.1 * index for index in range(len(completions))]

    return reward


def generation_with_reward(model_dir, tmp_path, value, **overrides):
    trainer = make_trainer(model_dir, tmp_path, **overrides)
    trainer.reward_funcs = [reward_with(value)]
    torch.manual_seed(0)
    return trainer, trainer._generate_and_score_completions(rows())


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_an_infinite_reward_counts_as_missing_as_trl_treats_none(model_dir, tmp_path, value):
    trainer, output = generation_with_reward(model_dir, tmp_path, value)
    _, missing = generation_with_reward(model_dir, tmp_path, None)
    assert torch.isfinite(output["advantages"]).all()
    torch.testing.assert_close(output["advantages"], missing["advantages"])
    assert output["advantages"][2] == 0  # no reward at all: TRL's advantage 0
    assert trainer._metrics["train"]["rewards/non_finite"] == [1.0]


def test_an_infinite_reward_under_hapo_leaves_finite_advantages(model_dir, tmp_path):
    _, output = generation_with_reward(model_dir, tmp_path, float("inf"), policy_loss="hapo")
    assert torch.isfinite(output["advantages"]).all()


def test_a_token_signal_returning_nan_stops_the_run_naming_it(model_dir, tmp_path):
    @register_token_signal("nan_test_signal")
    class NanSignal(TokenSignal):
        def after_generation(self, generation):
            advantages = generation.output["advantages"].clone()
            advantages[1] = float("nan")
            return {"advantages": advantages}

    try:
        trainer = make_trainer(model_dir, tmp_path, token_signals=["nan_test_signal"])
        with pytest.raises(NonFiniteError, match="token signal 'nan_test_signal' .* in 'advantages'"):
            trainer._generate_and_score_completions(rows())
    finally:
        TOKEN_SIGNALS.pop("nan_test_signal")


def sft_trainer(model_dir, tmp_path, trainer_class=None, config_class=None, **overrides):
    """An SFT trainer of the tiny model (``TokenSFTTrainer`` unless given TRL's classes), batch 2, logging and saving
    every step."""
    from tokenweave.data.arithmetic import load_arithmetic
    from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer

    options = dict(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, max_steps=2, logging_steps=1,
                   per_device_train_batch_size=2, report_to="none", save_strategy="steps", save_steps=1,
                   activation_checkpointing=False, max_length=256)
    config = (config_class or TokenSFTConfig)(**(options | overrides))
    return (trainer_class or TokenSFTTrainer)(model=model_dir, args=config,
                                              train_dataset=load_arithmetic("train", "sft", 8))


def test_a_non_finite_loss_stops_before_backward_and_nothing_is_logged_or_saved(model_dir, tmp_path):
    trainer = sft_trainer(model_dir, tmp_path)
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="loss is not finite .* at step 1 on 1 of 1"):
        trainer.train()
    assert not any("loss" in entry for entry in trainer.state.log_history)
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())


def test_a_non_finite_gradient_norm_stops_before_the_optimizer_step(model_dir, tmp_path):
    trainer = sft_trainer(model_dir, tmp_path)
    weight = trainer.model.lm_head.weight
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite
    with pytest.raises(NonFiniteError, match="gradient norm is (inf|nan) at step 1 .*no loss scaler"):
        trainer.train()
    assert torch.equal(weight.detach(), before)  # no optimizer step
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())


def test_the_error_numbers_the_step_as_the_log_does(model_dir, tmp_path):
    # the log numbers optimizer steps from 1 (state.global_step once the step is done): the first step is logged
    # as step 1, and the error of the second names step 2
    trainer = sft_trainer(model_dir, tmp_path, save_strategy="no")
    backward_passes = []
    trainer.model.lm_head.weight.register_hook(
        lambda grad: grad * (float("inf") if backward_passes.append(1) or len(backward_passes) == 2 else 1.0))
    with pytest.raises(NonFiniteError, match="gradient norm is (inf|nan) at step 2 "):
        trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history] == [1]
    assert "skipped_steps" not in trainer.state.log_history[0]  # no loss scaler, no such metric


def test_under_fp16_loss_scaling_an_overflow_skips_the_step_counts_it_and_training_goes_on(model_dir, tmp_path):
    """A real loss scaler, on CPU: fp16 autocast with accelerate's GradScaler, whose first scale (2^40) overflows the
    gradients. transformers' Trainer runs it through ``accelerator.scaler`` (accelerate builds none on CPU, so the test
    gives it one): the scaler skips the step and lowers its scale (×2^-30 here), the next steps train."""
    trainer = sft_trainer(model_dir, tmp_path, fp16=True, max_steps=3, save_strategy="no")
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    trainer.accelerator.native_amp = True  # fp16 autocast, and the gradients unscaled before the norm
    weight = trainer.model.lm_head.weight
    weights = [weight.detach().clone()]

    class AfterEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights.append(weight.detach().clone())

    trainer.add_callback(AfterEachStep())
    trainer.train()  # stopped with NonFiniteError before: the overflow's gradient norm is not finite
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["skipped_steps"] for entry in logs] == [1.0, 0.0, 0.0]
    assert not math.isfinite(logs[0]["grad_norm"]) and all(math.isfinite(entry["grad_norm"]) for entry in logs[1:])
    assert trainer.accelerator.scaler.get_scale() == 2.0**10  # lowered once
    assert torch.equal(weights[1], weights[0])  # the skipped step left the weights alone
    assert not torch.equal(weights[3], weights[1]) and torch.isfinite(weights[3]).all()


def test_a_float16_model_without_a_loss_scaler_stops_where_trls_trainer_trains_on_into_nan_weights(model_dir, tmp_path):
    """Kept divergence from TRL's suite (test_train_model_dtype of its SFT and DPO trainers: a model loaded in float16,
    learning rate 0.1, no fp16 loss scaling): TRL's trainer trains on and ends with every weight NaN (Adam's ε = 1e-8
    is 0 in float16, so the first steps' updates are huge, then 0/0), logging the NaN losses as 0
    (``logging_nan_inf_filter``); that test passes only because a NaN weight differs from the old one. No scaler
    skips those steps, so tokenweave stops at the first non-finite value, with nothing saved."""
    from trl import SFTConfig, SFTTrainer

    float16 = dict(model_init_kwargs={"dtype": torch.float16}, learning_rate=0.1, max_steps=4, save_strategy="no")
    trl_trainer = sft_trainer(model_dir, tmp_path / "trl", SFTTrainer, SFTConfig, **float16)
    trl_trainer.train()
    assert all(torch.isnan(parameter).all() for parameter in trl_trainer.model.parameters())

    trainer = sft_trainer(model_dir, tmp_path, **float16)
    with pytest.raises(NonFiniteError, match="not finite|gradient norm"):
        trainer.train()
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())


def test_every_trainer_wraps_its_loss_in_the_guard():
    # the guard's compute_loss must come before every other compute_loss in the MRO (the token signals' host, first
    # among the bases, defines none), for SFT, DPO and GRPO alike
    from tokenweave.trainers import TokenDPOTrainer, TokenGRPOTrainer, TokenSFTTrainer
    from tokenweave.trainers.finite import FiniteTrainingMixin
    from tokenweave.trainers.host import SignalHostMixin

    for trainer_class in (TokenSFTTrainer, TokenDPOTrainer, TokenGRPOTrainer):
        assert trainer_class.__mro__[1:3] == (SignalHostMixin, FiniteTrainingMixin)
        for cls in trainer_class.__mro__[:2]:
            assert "compute_loss" not in vars(cls) and "_get_grad_norm" not in vars(cls)
