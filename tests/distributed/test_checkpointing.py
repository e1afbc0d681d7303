"""Activation checkpointing with LoRA under DeepSpeed ZeRO-3, 2 CPU processes, for SFT, DPO (cDPO, TDPO2) and GRPO
(HAPO): each run trains its adapter with checkpointing on and reentrant, as PEFT under ZeRO-3 needs
(``tokenweave.trainers.checkpointing``: TRL 1.16 forces ``use_reentrant=True`` in a field transformers 5 no longer
reads). The 4 runs share one launch (``tests/distributed/runs.py``)."""

from pathlib import Path

import pytest

from ..conftest import CONFIGS
from .runs import assert_trained, deepspeed_run_info, launch_runs

pytestmark = pytest.mark.slow

RUNS = {"sft": "sft_tiny.yaml", "cdpo": "cdpo_tiny.yaml", "tdpo2": "tdpo_tiny.yaml", "hapo": "hapo_tiny.yaml"}
LORA_CHECKPOINTING = ["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
                      "--lora_target_modules", "q_proj", "v_proj", "--activation_checkpointing", "true"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, scored_pairs) -> Path:
    root = tmp_path_factory.mktemp("checkpointing-zero3")
    spec = []
    for name, config in RUNS.items():
        dataset = ["--dataset_name", scored_pairs] if name == "cdpo" else []
        spec.append(["--config", str(CONFIGS / config), "--output_dir", str(root / name), "--max_steps", "2",
                     *dataset, *LORA_CHECKPOINTING])
    launch_runs("cpu_zero3.yaml", spec, root)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_lora_under_zero3_trains_with_reentrant_checkpointing(name, launched, initial_weights):
    output_dir = launched / name
    info = deepspeed_run_info(output_dir, zero_stage=3, lora=True, global_step=2)
    assert info["activation_checkpointing"] is True
    assert info["activation_checkpointing_kwargs"] == {"use_reentrant": True}
    assert_trained(output_dir, True, initial_weights, num_lora_b=2 * 2)  # 2 layers x (q_proj, v_proj)
