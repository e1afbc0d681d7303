"""``tokenweave train --accelerate_config cpu_zero2 --num_processes 2`` launches itself as ``trl`` does: the run is a
2-process DeepSpeed ZeRO-2 run (``run_info.json`` says so) that saved its model, card and run config; and
``tokenweave critical`` with the same flags launches its training steps so."""

import json
import sys

import pytest
import yaml

from tokenweave.train import RUN_CONFIG_FILE, RUN_INFO_FILE

from ..conftest import CONFIGS
from ..test_pipeline_critical import tiny_sft_config, write_yaml
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


def test_cpu_ddp_launches_two_data_parallel_processes(tmp_path):
    """``cpu_ddp`` starts 2 processes (accelerate's MULTI_CPU with use_cpu would start one: see the config)."""
    output_dir = tmp_path / "run"
    run_subprocess([sys.executable, "-m", "tokenweave.cli", "train", "--config", str(CONFIGS / "sft_tiny.yaml"),
                    "--accelerate_config", "cpu_ddp", "--max_steps", "2", "--output_dir", str(output_dir)],
                   timeout=600)
    info = json.loads((output_dir / RUN_INFO_FILE).read_text())
    assert (info["num_processes"], info["model_wrapper"], info["global_step"]) == (2, "DistributedDataParallel", 2)


def test_the_critical_pipeline_launches_its_training_steps(tmp_path):
    """``tokenweave critical --accelerate_config cpu_zero2 --num_processes 2``: sampling, scoring (each split over
    the 2 processes: tests/distributed/test_pipeline_processes.py), the positive / negative SFT runs and cDPO each
    a 2-process ZeRO-2 run."""
    config = yaml.safe_load((CONFIGS / "critical_tiny.yaml").read_text()) | dict(
        work_dir=str(tmp_path / "work"), num_examples=4, num_samples_per_prompt=4, max_new_tokens=12,
        sft_config=str(tiny_sft_config(tmp_path, max_steps=1, per_device_train_batch_size=2)),
        cdpo_config=str(write_yaml(tmp_path / "cdpo.yaml", yaml.safe_load((CONFIGS / "cdpo_tiny.yaml").read_text())
                                   | {"max_steps": 1, "per_device_train_batch_size": 1})),
        measure_localization=False, rollout_trajectories=0,
    )
    output = run_subprocess([sys.executable, "-m", "tokenweave.cli", "critical", "--config",
                             str(write_yaml(tmp_path / "critical.yaml", config)), "--accelerate_config", "cpu_zero2",
                             "--num_processes", "2"], timeout=900)
    assert "[sample] process 1 of 2 done" in output and "[score] process 1 of 2 done" in output
    for step in ("positive", "negative", "cdpo"):
        info = deepspeed_run_info(tmp_path / "work" / step, zero_stage=2, lora=step != "cdpo", global_step=1)
        assert info["method"] == ("dpo" if step == "cdpo" else "sft")
