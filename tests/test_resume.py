"""Exact resume, one process: a run interrupted right after its step-2 checkpoint and resumed with
``--resume_from_checkpoint true`` logs the same losses (1e-6) as the uninterrupted run, for SFT, DPO (sigmoid,
cDPO on per-token scores, TDPO2) and GRPO (DAPO; HAPO with every part on, whose sampler statistics come back from
``token_signals.pt``; Rank-GRPO; attention credit with its random control, seeded by step and row).

The interruption: a callback raises once the step-2 checkpoint is written (what ``kill -9`` after a save leaves on
disk: the checkpoint, and nothing of the steps after it); and once, for HAPO, a real ``kill -9`` of a training
process waiting right after that checkpoint. The 2-process DeepSpeed case is ``tests/distributed/test_resume.py``."""

import json
import subprocess
import sys
import time

import pytest

from tokenweave.config import parse_run_config
from tokenweave.train import train_from_args

from .conftest import CONFIGS, REPO_ROOT
from .distributed.runs import Interrupted, RecordSteps, StopAfterCheckpoint, callbacks_added, kill_tree

RUNS = {
    "sft": ["--config", str(CONFIGS / "sft_tiny.yaml")],
    "tdpo2": ["--config", str(CONFIGS / "tdpo_tiny.yaml")],
    "dpo": ["--config", str(CONFIGS / "dpo_tiny.yaml")],
    "cdpo": ["--config", str(CONFIGS / "cdpo_tiny.yaml")],  # + --dataset_name: the scored_pairs fixture
    "dapo": ["--config", str(CONFIGS / "dapo_tiny.yaml")],
    # τ 0.9, not 0.05: the resumed generation (step 3) samples at temperatures from the restored statistics, far
    # enough from T_base that a lost sampler state changes the samples
    "hapo": ["--config", str(CONFIGS / "hapo_tiny.yaml"), "--temperature_tau", "0.9"],
    "rank_grpo": ["--config", str(CONFIGS / "rank_grpo_tiny.yaml")],
    "attention_credit": ["--config", str(CONFIGS / "attention_credit_tiny.yaml"), "--signal_control", "shuffle"],
}


def losses(info: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in info["log_history"] if "loss" in entry}


COMMON = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]


def run_argv(name: str, scored_pairs: str, output_dir) -> list[str]:
    dataset = ["--dataset_name", scored_pairs] if name == "cdpo" else []
    return [*RUNS[name], *dataset, *COMMON, "--output_dir", str(output_dir)]


def resume(argv: list[str]) -> dict:
    """Resume the run of ``argv`` from its newest checkpoint; only steps 3 and 4 may be trained."""
    counter = RecordSteps()
    with callbacks_added(counter):
        resumed = train_from_args(*parse_run_config([*argv, "--resume_from_checkpoint", "true"]))
    assert counter.steps == [3, 4]  # it resumed: only the steps after the checkpoint were trained
    return resumed


def assert_same_losses(resumed: dict, whole: dict) -> None:
    """The resumed run's history (steps 1-2 from the checkpoint's trainer state, steps 3-4 trained after the resume)
    is the uninterrupted run's, within 1e-6."""
    expected, actual = losses(whole), losses(resumed)
    assert sorted(actual) == sorted(expected) == [1, 2, 3, 4] and resumed["global_step"] == 4
    for step in (1, 2, 3, 4):
        assert actual[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-9), step


@pytest.mark.parametrize("name", list(RUNS))
def test_a_resumed_run_logs_the_losses_of_an_uninterrupted_one(name, tmp_path, tiny_model_cache, scored_pairs):
    whole = train_from_args(*parse_run_config(run_argv(name, scored_pairs, tmp_path / "whole")))
    interrupted = run_argv(name, scored_pairs, tmp_path / "interrupted")
    with callbacks_added(StopAfterCheckpoint(2)), pytest.raises(Interrupted):
        train_from_args(*parse_run_config(interrupted))
    assert_same_losses(resume(interrupted), whole)


def test_a_run_killed_after_a_checkpoint_resumes_exactly(tmp_path, tiny_model_cache, scored_pairs):
    """HAPO, whose sampler state is in the checkpoint: the training process gets ``kill -9`` (it waits right after
    its step-2 checkpoint, so the kill lands there); the resumed run logs the uninterrupted run's losses."""
    whole = train_from_args(*parse_run_config(run_argv("hapo", scored_pairs, tmp_path / "whole")))
    interrupted = run_argv("hapo", scored_pairs, tmp_path / "killed")
    ready = tmp_path / "ready"
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([{"argv": interrupted, "stop_after_checkpoint": 2, "stop": "kill",
                                 "ready_file": str(ready)}]))
    log = tmp_path / "run.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "distributed" / "runs.py"), str(spec)],
                                   cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert process.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach its step-2 checkpoint in 300 s"
            time.sleep(0.5)
    finally:
        kill_tree(process)
    assert process.returncode == -9
    assert_same_losses(resume(interrupted), whole)
