"""Non-finite values never pass silently (tokenweave/trainers/finite.py): infinite rewards follow TRL's rule for a
missing reward and are counted; a token signal's NaN stops the run naming it; a non-finite loss stops before its
backward pass and a non-finite gradient norm before the optimizer step, with nothing logged or saved."""

import pytest
import torch

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


def sft_trainer(model_dir, tmp_path):
    from tokenweave.data.arithmetic import load_arithmetic
    from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer

    config = TokenSFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, max_steps=2, logging_steps=1,
                            per_device_train_batch_size=2, report_to="none", save_strategy="steps", save_steps=1,
                            activation_checkpointing=False, max_length=256)
    return TokenSFTTrainer(model=model_dir, args=config, train_dataset=load_arithmetic("train", "sft", 8))


def test_a_non_finite_loss_stops_before_backward_and_nothing_is_logged_or_saved(model_dir, tmp_path):
    trainer = sft_trainer(model_dir, tmp_path)
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="loss is not finite .* at step 0 on 1 of 1"):
        trainer.train()
    assert not any("loss" in entry for entry in trainer.state.log_history)
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())


def test_a_non_finite_gradient_norm_stops_before_the_optimizer_step(model_dir, tmp_path):
    trainer = sft_trainer(model_dir, tmp_path)
    weight = trainer.model.lm_head.weight
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite
    with pytest.raises(NonFiniteError, match="gradient norm is (inf|nan) at step 0"):
        trainer.train()
    assert torch.equal(weight.detach(), before)  # no optimizer step
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
