"""Stopping a multi-process run: ``kill -9`` of ``accelerate launch`` stops its workers too (they get SIGTERM when
their launcher dies, ``tokenweave.train.exit_with_launcher``), so none goes on training into the output directory."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .runs import LAUNCH, REPO_ROOT

pytestmark = pytest.mark.slow


def workers_of(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher's processes running ``tokenweave.train``."""
    return [child for child in launcher.children(recursive=True)
            if any("tokenweave.train" in part for part in child.cmdline())]


def test_killing_the_launcher_stops_its_workers(tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu_zero2.yaml"),
               "-m", "tokenweave.train", "--config", str(REPO_ROOT / "configs" / "sft_tiny.yaml"),
               "--max_steps", "100000", "--output_dir", str(output_dir), "--save_strategy", "steps",
               "--save_steps", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    workers = []
    try:
        process = psutil.Process(launcher.pid)
        deadline = time.monotonic() + 300
        while not (output_dir / "checkpoint-20").exists():  # both workers are training
            assert launcher.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "the run did not reach its first checkpoint in 300 s"
            time.sleep(1)
        workers = workers_of(process)
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)  # the launcher only, not its process group
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers still running 30 s after the launcher died: {[w.pid for w in alive]}"
        checkpoints = sorted(output_dir.glob("checkpoint-*"))
        time.sleep(5)
        assert sorted(output_dir.glob("checkpoint-*")) == checkpoints  # nothing more written
    finally:  # whatever happened, nothing of the run outlives the test (torch starts workers in sessions of their own)
        if launcher.poll() is None:
            workers = workers or workers_of(psutil.Process(launcher.pid))
            launcher.kill()
        for worker in workers:
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
