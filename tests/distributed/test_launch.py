"""``tokenweave train --accelerate_config cpu_zero2 --num_processes 2`` launches itself as ``trl`` does: the run is a
2-process DeepSpeed ZeRO-2 run (``run_info.json`` says so) that saved its model, card and run config."""

import sys

import pytest

from tokenweave.train import RUN_CONFIG_FILE

from ..conftest import CONFIGS
from .runs import deepspeed_run_info, run_subprocess

pytestmark = pytest.mark.slow


def test_train_launches_itself_under_deepspeed_with_two_processes(tmp_path):
    output_dir = tmp_path / "run"
    run_subprocess([sys.executable, "-m", "tokenweave.cli", "train", "--config", str(CONFIGS / "dpo_tiny.yaml"),
                    "--accelerate_config", "cpu_zero2", "--num_processes", "2", "--max_steps", "2",
                    "--output_dir", str(output_dir)], timeout=600)
    deepspeed_run_info(output_dir, zero_stage=2, lora=False, global_step=2)
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "README.md").is_file()
    assert "accelerate_config" not in (output_dir / RUN_CONFIG_FILE).read_text()  # a launch flag, not a run key
