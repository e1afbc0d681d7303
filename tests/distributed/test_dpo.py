"""TokenDPOTrainer over several processes: cDPO, TDPO1, TDPO2, TGDPO (online reward model), T-REG (reward columns) and
AlignDistil (two frozen teachers) each train under ``accelerate launch`` with 2 CPU
processes and DeepSpeed ZeRO-2 / ZeRO-3, with and without LoRA; and ZeRO-3 logs the losses ZeRO-2 logs.

The 12 runs of a ZeRO stage (6 losses × LoRA / no LoRA) share one launch (``tests/distributed/runs.py``).

TDPO with LoRA under ZeRO-3 is the case where the frozen LM head is gathered once per step and applied as
``F.linear`` (``tokenweave.models.lm_head_functions``): a module call recomputed in the backward finds it released.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from tokenweave.data.arithmetic import load_arithmetic
from tokenweave.models import build_tiny_llama
from tokenweave.train import RUN_INFO_FILE

from ..conftest import CONFIGS, with_columns
from .runs import assert_trained, deepspeed_run_info, run_name, stage_launcher

pytestmark = pytest.mark.slow

LOSSES = ["cdpo", "tdpo1", "tdpo2", "tgdpo", "treg", "aligndistil"]
CONFIG_FILES = {"cdpo": "cdpo_tiny.yaml", "tdpo1": "tdpo_tiny.yaml", "tdpo2": "tdpo_tiny.yaml",
                "tgdpo": "tgdpo_tiny.yaml", "treg": "treg_tiny.yaml", "aligndistil": "aligndistil_tiny.yaml"}
# lora_dropout 0: the ZeRO-2 and ZeRO-3 runs of a loss compute the same thing, so their logged losses can be compared.
LORA_ARGS = ["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
             "--lora_target_modules", "q_proj", "v_proj"]
# critical-token scores of the cDPO dataset: chosen weights stay 1, rejected weights are 1 - 0.3 = 0.7 (EOS: 1)
CHOSEN_SCORE, REJECTED_SCORE = 0.9, 0.3
# T-REG's token rewards of the columns dataset, per token (in its range (-0.5, 0.5))
CHOSEN_REWARD, REJECTED_REWARD = 0.25, -0.25
MAX_STEPS = 2


def run_argv(loss_type: str, lora: bool, output_dir: Path, datasets: dict[str, str]) -> list[str]:
    """The command line of ``python -m tokenweave.train`` for one run: the method's tiny config, 2 steps (cDPO and
    T-REG on their column datasets)."""
    argv = ["--config", str(CONFIGS / CONFIG_FILES[loss_type]), "--output_dir", str(output_dir),
            "--loss_type", loss_type, "--max_steps", str(MAX_STEPS)]
    if loss_type in datasets:
        argv += ["--dataset_name", datasets[loss_type]]
    return argv + (LORA_ARGS if lora else [])


@pytest.fixture(scope="module")
def cdpo_dataset(tmp_path_factory) -> str:
    """The arithmetic preference pairs with critical-token score columns (one score per completion token), on disk."""
    tokenizer = build_tiny_llama()[1]
    dataset = with_columns(
        load_arithmetic("train", "preference", num_examples=32),
        tokenizer,
        lambda n, index: [CHOSEN_SCORE] * n,
        lambda n, index: [REJECTED_SCORE] * n,
        names=("chosen_scores", "rejected_scores"),
    )
    path = tmp_path_factory.mktemp("cdpo-pairs")
    dataset.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def treg_dataset(tmp_path_factory) -> str:
    """The arithmetic preference pairs with T-REG token-reward columns (one reward per completion token), on disk."""
    dataset = with_columns(
        load_arithmetic("train", "preference", num_examples=32),
        build_tiny_llama()[1],
        lambda n, index: [CHOSEN_REWARD] * n,
        lambda n, index: [REJECTED_REWARD] * n,
        names=("chosen_token_rewards", "rejected_token_rewards"),
    )
    path = tmp_path_factory.mktemp("treg-pairs")
    dataset.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, cdpo_dataset, treg_dataset):
    """``stage_runs(zero_stage)``: the directory holding the 12 runs of that stage, launched once (on first use)."""
    datasets = {"cdpo": cdpo_dataset, "treg": treg_dataset}

    def stage_spec(zero_stage: int, root: Path) -> list[list[str]]:
        return [
            run_argv(loss, lora, root / run_name(loss, lora), datasets) for loss in LOSSES for lora in (False, True)
        ]

    return stage_launcher(tmp_path_factory, "dpo", stage_spec)


def train_logs(info: dict) -> list[dict]:
    return [entry for entry in info["log_history"] if "loss" in entry]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_token_dpo_trains_under_deepspeed(zero_stage, loss_type, lora, stage_runs, initial_weights):
    output_dir = stage_runs(zero_stage) / run_name(loss_type, lora)
    info = deepspeed_run_info(output_dir, zero_stage, lora, global_step=MAX_STEPS)
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert args.loss_type == [loss_type] and args.token_loss_type == loss_type

    # finite losses, and at every step a metric only this token-level loss logs
    logs = train_logs(info)
    assert len(logs) == MAX_STEPS
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in logs)
    if loss_type == "cdpo":  # mean token weights over both processes' completion tokens
        for entry in logs:
            assert entry["weights/chosen"] == pytest.approx(1.0)
            assert 1 - REJECTED_SCORE < entry["weights/rejected"] < 1  # 0.7 per token, 1 for EOS
    elif loss_type == "treg":  # the columns' rewards, over both processes' completion tokens
        for entry in logs:
            assert entry["token_rewards/chosen_mean"] == pytest.approx(CHOSEN_REWARD)
            assert entry["token_rewards/rejected_mean"] == pytest.approx(REJECTED_REWARD)
    elif loss_type == "tgdpo":  # the online reward model (the second tiny model) against the reference
        assert all(entry["token_rewards/chosen_abs_mean"] > 1e-3 for entry in logs)
    elif loss_type == "aligndistil":  # the two teachers (the two tiny models) differ: 0 < TVD < 2, the scale in range
        for entry in logs:
            assert 0 < entry["aligndistil/tvd_mean"] < 2
            assert 0.005 <= entry["aligndistil/scale_mean"] <= entry["aligndistil/scale_max"] <= 100
    else:
        assert all("kl/chosen" in entry and "kl/rejected" in entry for entry in logs)
        assert logs[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-6)  # the policy is its reference at step 1
        assert logs[-1]["kl/chosen"] > 1e-6 and logs[-1]["kl/rejected"] > 1e-6  # and has moved away at step 2

    assert_trained(output_dir, lora, initial_weights, num_lora_b=2 * 2)  # 2 layers x (q_proj, v_proj)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_type", LOSSES)
def test_zero3_logs_what_zero2_logs(loss_type, lora, stage_runs):
    """Same data, seed and steps: ZeRO-3 (sharded parameters; with TDPO + LoRA, the frozen head gathered once per step)
    logs the losses, rewards and KLs of ZeRO-2, up to float reduction order."""
    logs = {
        stage: train_logs(json.loads((stage_runs(stage) / run_name(loss_type, lora) / RUN_INFO_FILE).read_text()))
        for stage in (2, 3)
    }
    keys = ["loss", "rewards/margins", "logps/chosen"] + (["kl/chosen", "kl/rejected"] if "tdpo" in loss_type else [])
    keys += ["token_rewards/chosen_mean", "token_rewards/rejected_mean"] if loss_type in ("tgdpo", "treg") else []
    keys += ["aligndistil/scale_mean", "aligndistil/tvd_mean"] if loss_type == "aligndistil" else []
    for zero2, zero3 in zip(logs[2], logs[3], strict=True):
        for key in keys:
            assert zero3[key] == pytest.approx(zero2[key], rel=1e-3, abs=1e-5), (key, zero2["step"])
