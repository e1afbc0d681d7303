"""Exact resume, one process: a run interrupted right after its step-2 checkpoint and resumed with
``--resume_from_checkpoint true`` logs the same losses (1e-6) as the uninterrupted run, for SFT, DPO,
TDPO2 and GRPO (DAPO; HAPO with every part on, whose sampler statistics come back from ``token_signals.pt``;
Rank-GRPO; attention credit with its random control, seeded by step and row).

The interruption: a callback raises once the step-2 checkpoint is written (what ``kill -9`` after a save leaves on
disk: the checkpoint, and nothing of the steps after it)."""

import pytest
from transformers import TrainerCallback

import tokenweave.train as train_module
from tokenweave.config import parse_run_config
from tokenweave.train import train_from_args

from .conftest import CONFIGS

RUNS = {
    "sft": ["--config", str(CONFIGS / "sft_tiny.yaml")],
    "tdpo2": ["--config", str(CONFIGS / "tdpo_tiny.yaml")],
    "dpo": ["--config", str(CONFIGS / "dpo_tiny.yaml")],
    "dapo": ["--config", str(CONFIGS / "dapo_tiny.yaml")],
    # τ 0.9, not 0.05: the resumed generation (step 3) samples at temperatures from the restored statistics, far
    # enough from T_base that a lost sampler state changes the samples
    "hapo": ["--config", str(CONFIGS / "hapo_tiny.yaml"), "--temperature_tau", "0.9"],
    "rank_grpo": ["--config", str(CONFIGS / "rank_grpo_tiny.yaml")],
    "attention_credit": ["--config", str(CONFIGS / "attention_credit_tiny.yaml"), "--attention_credit_control", "random"],
}


class Interrupted(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise Interrupted


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def with_callback(monkeypatch, callback) -> None:
    """Every trainer ``train_from_args`` builds gets ``callback``."""
    build = train_module.build_trainer

    def build_with_callback(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", build_with_callback)


def losses(info: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in info["log_history"] if "loss" in entry}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_resumed_run_logs_the_losses_of_an_uninterrupted_one(name, tmp_path, tiny_model_cache, monkeypatch):
    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]
    whole = train_from_args(*parse_run_config([*RUNS[name], *common, "--output_dir", str(tmp_path / "whole")]))

    interrupted_dir = str(tmp_path / "interrupted")
    with_callback(monkeypatch, InterruptAfterSave())
    with pytest.raises(Interrupted):
        train_from_args(*parse_run_config([*RUNS[name], *common, "--output_dir", interrupted_dir]))
    counter = CountSteps()
    with_callback(monkeypatch, counter)
    resumed = train_from_args(*parse_run_config([*RUNS[name], *common, "--output_dir", interrupted_dir,
                                                 "--resume_from_checkpoint", "true"]))
    assert counter.steps == [3, 4]  # it resumed: only the steps after the checkpoint were trained
    # the resumed run's history: steps 1-2 from the checkpoint's trainer state, steps 3-4 trained after the resume
    expected, actual = losses(whole), losses(resumed)
    assert sorted(actual) == sorted(expected) == [1, 2, 3, 4] and resumed["global_step"] == 4
    for step in (1, 2, 3, 4):
        assert actual[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-9), step
