"""What the multi-process tests share: ``accelerate launch`` on CPU, several training runs in one launch, and the check
that a run's saved model or adapter was trained.

Several runs in one launch. A 2-process CPU launch spends 20-50 s importing torch / TRL / DeepSpeed and starting the
ranks, and a tiny 2-step run trains in a few seconds, so the runs of a ZeRO stage share ONE launch of this file as a
script (:func:`launch_runs`)::

    accelerate launch --config_file launch/cpu_zero3.yaml tests/distributed/runs.py RUNS.json

``RUNS.json`` is a list of argument lists, each the command line of ``python -m tokenweave.train``, parsed and run
one after another by :func:`tokenweave.train.train_from_args`. Each run is a full run (its own trainer,
DeepSpeedEngine, saved model or adapter and ``run_info.json``); only the last one finishes the process group
(``finish_distributed``), as a single run does.

An entry may instead be a dict: ``{"argv": [...], "stop_after_checkpoint": N, "stop": "raise" | "kill",
"ready_file": F}`` interrupts the run once its step-N checkpoint is written on every process
(:class:`StopAfterCheckpoint`), by an exception that the script catches before it goes on to the next entry, or,
for ``kill``, by the test: every process waits, ``F`` says so, and the test SIGKILLs the launch (:func:`kill_tree`);
``"steps_file": F`` writes the steps the run trained (:class:`RecordSteps`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH = REPO_ROOT / "launch"


def run_subprocess(command: list[str], timeout: int) -> str:
    """Run ``command`` from the repository root with one OpenMP thread per process; fail with its output's tail.
    Returns its standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def accelerate_launch(launch_config: str, args: list[str], timeout: int = 600) -> None:
    """``accelerate launch --config_file launch/<launch_config> <args>``."""
    run_subprocess(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / launch_config), *args],
        timeout=timeout,
    )


def save_tiny_models(root: Path, seeds: dict[str, int]) -> Path:
    """The tiny Llama of each seed (``{name: seed}``) saved under ``root/name``, with its tokenizer: the policy and
    the frozen models of the multi-process tests."""
    from tokenweave.models import build_tiny_llama

    for name, seed in seeds.items():
        model, tokenizer = build_tiny_llama(seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def launch_runs(launch_config: str, spec: list[list[str]], root: Path, timeout: int = 900) -> None:
    """Run every argument list of ``spec`` with ``tokenweave.train`` inside one launch (module docstring)."""
    (root / "runs.json").write_text(json.dumps(spec))
    accelerate_launch(launch_config, [str(Path(__file__).resolve()), str(root / "runs.json")], timeout=timeout)


def stage_launcher(
    tmp_path_factory, prefix: str, stage_spec: Callable[[int, Path], list[list[str]]]
) -> Callable[[int], Path]:
    """``launch(zero_stage)``: the directory holding the runs ``stage_spec(zero_stage, root)`` of that ZeRO stage,
    all launched in one ``cpu_zero<stage>.yaml`` launch on first use; a failed launch (non-zero exit, even
    after the runs finished) fails every later call for that stage too."""
    outcomes: dict[int, Path | BaseException] = {}

    def launch(zero_stage: int) -> Path:
        if zero_stage not in outcomes:
            root = tmp_path_factory.mktemp(f"{prefix}-zero{zero_stage}")
            try:
                launch_runs(f"cpu_zero{zero_stage}.yaml", stage_spec(zero_stage, root), root)
                outcomes[zero_stage] = root
            except (AssertionError, subprocess.TimeoutExpired) as error:
                outcomes[zero_stage] = error
        if isinstance(outcomes[zero_stage], BaseException):
            raise outcomes[zero_stage]
        return outcomes[zero_stage]

    return launch


def run_name(loss: str, lora: bool) -> str:
    """The directory name of one run of a stage: ``<loss>-lora`` or ``<loss>-full``."""
    return f"{loss}-{'lora' if lora else 'full'}"


def deepspeed_run_info(output_dir: Path, zero_stage: int, lora: bool, global_step: int) -> dict:
    """The run's ``run_info.json``, checked to be a 2-process DeepSpeed run of ``zero_stage`` (the model wrapped in a
    ``DeepSpeedEngine``), with LoRA or not, that took ``global_step`` steps."""
    from tokenweave.train import RUN_INFO_FILE

    info = json.loads((output_dir / RUN_INFO_FILE).read_text())
    assert info["model_wrapper"] == "DeepSpeedEngine" and info["distributed_type"] == "DistributedType.DEEPSPEED"
    assert info["zero_stage"] == zero_stage and info["num_processes"] == 2 and info["global_step"] == global_step
    assert info["use_peft"] is lora
    return info


def assert_trained(output_dir: Path, lora: bool, initial_weights: dict, num_lora_b: int) -> None:
    """The run saved finite weights that differ from the initial ones; with LoRA, an adapter (only) whose
    ``num_lora_b`` B matrices, zero at initialisation, are not all zero."""
    if lora:
        adapter = load_file(output_dir / "adapter_model.safetensors")
        lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
        assert len(lora_b) == num_lora_b
        assert all(torch.isfinite(tensor).all() for tensor in adapter.values())
        assert any(tensor.abs().sum() > 0 for tensor in lora_b), "LoRA B is still zero: the adapter was not trained"
        assert not (output_dir / "model.safetensors").exists()
    else:
        trained = load_file(output_dir / "model.safetensors")
        assert all(torch.isfinite(weight).all() for weight in trained.values())
        assert any(not torch.equal(weight, initial_weights[name]) for name, weight in trained.items()), (
            "the saved model equals the initial one: the ZeRO gather on save or the training did not happen"
        )


class Interrupted(Exception):
    """Raised by :class:`StopAfterCheckpoint` to interrupt a run."""


class StopAfterCheckpoint(TrainerCallback):
    """Interrupt a run right after its step-``step`` checkpoint is complete on every process: what ``kill -9`` after
    a save leaves on disk (the checkpoint, nothing of the steps after it). ``stop="raise"`` raises
    :class:`Interrupted`; ``stop="kill"`` writes ``ready_file`` and waits for the test to SIGKILL the processes."""

    def __init__(self, step: int, stop: str = "raise", ready_file: str | None = None):
        if stop not in ("raise", "kill") or (stop == "kill") != (ready_file is not None):
            raise ValueError(f"stop={stop!r}, ready_file={ready_file!r}")
        self.step, self.stop, self.ready_file = step, stop, ready_file

    def on_save(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its part of the checkpoint
        if self.stop == "raise":
            raise Interrupted
        if state.is_world_process_zero:
            Path(self.ready_file).write_text(str(os.getpid()))
        while True:
            time.sleep(1)


class RecordSteps(TrainerCallback):
    """The global steps a run trained, in ``steps`` (and, if ``path`` is given, in that JSON file at the end)."""

    def __init__(self, path: str | None = None):
        self.path, self.steps = path, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.path is not None and state.is_world_process_zero:
            Path(self.path).write_text(json.dumps(self.steps))


@contextlib.contextmanager
def callbacks_added(*callbacks: TrainerCallback) -> Iterator[None]:
    """Every trainer :func:`tokenweave.train.train_from_args` builds inside the block gets ``callbacks``."""
    import tokenweave.train as train_module

    build = train_module.build_trainer

    def build_with_callbacks(*args, **kwargs):
        trainer = build(*args, **kwargs)
        for callback in callbacks:
            trainer.add_callback(callback)
        return trainer

    train_module.build_trainer = build_with_callbacks
    try:
        yield
    finally:
        train_module.build_trainer = build


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and every process it started (torch starts the workers in sessions of their own, so a
    process group kill does not reach them), and wait until they are gone."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    process.kill()
    for descendant in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendant.kill()
    process.wait()  # reaped by Popen, so that its returncode is the signal's
    psutil.wait_procs(descendants, timeout=30)


def runs(spec: str) -> None:
    """Script mode: each entry of the JSON file ``spec`` through ``tokenweave.train`` (module docstring); only the
    last run finishes the process group (waits for every rank, destroys it)."""
    from tokenweave.config import parse_run_config
    from tokenweave.train import train_from_args, trainer_is_main_process

    spec_runs = json.loads(Path(spec).read_text())
    for index, entry in enumerate(spec_runs):
        entry = entry if isinstance(entry, dict) else {"argv": entry}
        argv, last = entry["argv"], index == len(spec_runs) - 1
        callbacks = []
        if "stop_after_checkpoint" in entry:
            callbacks.append(StopAfterCheckpoint(entry["stop_after_checkpoint"], entry["stop"], entry.get("ready_file")))
        if "steps_file" in entry:
            callbacks.append(RecordSteps(entry["steps_file"]))
        with callbacks_added(*callbacks):
            try:
                info = train_from_args(*parse_run_config(argv), finish_distributed=last)
            except Interrupted:
                if trainer_is_main_process():
                    print(f"[runs] interrupted: {' '.join(argv)}", flush=True)
                continue
        if trainer_is_main_process():
            print(f"[runs] done: {' '.join(argv)} (step {info['global_step']})", flush=True)
        gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # the last run was interrupted
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # tokenweave from this checkout
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} RUNS.json")
    runs(sys.argv[1])
