"""Exact resume under ``accelerate launch`` with 2 CPU processes and DeepSpeed ZeRO-2: a run interrupted right after
its step-2 checkpoint and resumed with ``--resume_from_checkpoint true`` logs the uninterrupted run's losses (1e-6),
for SFT, cDPO (per-token scores), TDPO2 and GRPO with each token-signal component (HAPO, Rank-GRPO, attention
credit).

Two launches (``tests/distributed/runs.py``): the first trains each method uninterrupted, then interrupted (by an
exception on every process right after the checkpoint; the last one by ``kill -9`` of the launcher and of both
workers, waiting there); the second resumes them all and records which steps it trained.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenweave.train import RUN_INFO_FILE

from ..test_resume import RUNS, assert_same_losses, run_argv
from .runs import LAUNCH, REPO_ROOT, kill_tree, launch_runs

pytestmark = pytest.mark.slow

METHODS = ["sft", "cdpo", "tdpo2", "hapo", "rank_grpo", "attention_credit"]
ATTENTION_CREDIT = ["--signal_control", "none"]  # the coupled rule itself, not the single-process control


def argv(name: str, scored_pairs: str, output_dir: Path) -> list[str]:
    extra = ATTENTION_CREDIT if name == "attention_credit" else []
    return [*run_argv(name, scored_pairs, output_dir), *extra]


def launch_until_killed(spec: list, root: Path, ready: Path, timeout: int = 900) -> None:
    """One ``cpu_zero2`` launch of ``spec``, whose last entry waits at its checkpoint: SIGKILL everything then."""
    (root / "interrupted.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu_zero2.yaml"),
               str(Path(__file__).with_name("runs.py")), str(root / "interrupted.json")]
    log = root / "interrupted.log"
    with log.open("w") as output:
        launcher = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                    stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert launcher.poll() is None, f"the launch ended before it was killed:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"no checkpoint to kill at in {timeout} s"
            time.sleep(1)
    finally:
        kill_tree(launcher)
    assert launcher.returncode == -9


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, scored_pairs) -> Path:
    """The directory of the runs: ``<method>/whole``, ``<method>/interrupted`` (resumed), ``<method>/steps.json``."""
    root = tmp_path_factory.mktemp("resume-zero2")
    ready = root / "ready"
    whole = [argv(name, scored_pairs, root / name / "whole") for name in METHODS]
    interrupted = [{"argv": argv(name, scored_pairs, root / name / "interrupted"), "stop_after_checkpoint": 2,
                    "stop": "raise"} for name in METHODS]
    interrupted[-1].update(stop="kill", ready_file=str(ready))
    launch_until_killed(whole + interrupted, root, ready)
    resume = [{"argv": [*entry["argv"], "--resume_from_checkpoint", "true"],
               "steps_file": str(root / name / "steps.json")} for name, entry in zip(METHODS, interrupted)]
    launch_runs("cpu_zero2.yaml", resume, root)
    return root


@pytest.mark.parametrize("name", METHODS)
def test_a_resumed_zero2_run_logs_the_losses_of_an_uninterrupted_one(name, resumed):
    assert name in RUNS
    run = resumed / name
    assert json.loads((run / "steps.json").read_text()) == [3, 4]  # only the steps after the checkpoint
    whole = json.loads((run / "whole" / RUN_INFO_FILE).read_text())
    info = json.loads((run / "interrupted" / RUN_INFO_FILE).read_text())
    assert info["num_processes"] == whole["num_processes"] == 2 and info["zero_stage"] == 2
    assert_same_losses(info, whole)
