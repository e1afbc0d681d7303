"""TokenGRPOTrainer over several processes: every registered policy loss trains under ``accelerate launch`` with 2 CPU
processes and DeepSpeed ZeRO-2 / ZeRO-3, with and without LoRA; and 2 processes × batch 4 give the update of one
process with batch 8 (and of batch 4 with 2 accumulation steps).

The runs of a ZeRO stage (every loss and each token signal no loss implies, × LoRA / no LoRA) share one launch
(``tests/distributed/runs.py``); as many separate launches would take several times longer on 2 shared cores.
"""

import json
import math

import pytest
import torch
from trl.trainer.utils import split_tensor_dict

from tokenweave.losses.policy import POLICY_LOSS_DEFAULTS, POLICY_LOSSES
from tokenweave.train import RUN_INFO_FILE

from ..conftest import CONFIGS, PYTHON, REPO_ROOT
from .runs import assert_trained, deepspeed_run_info, run_name, run_subprocess, stage_launcher
from ..grpo_harness import (
    assert_same_update,
    loss_and_grads,
    make_batch,
    make_trainer,
    ATTENTION_CREDIT,
    attention_credit_advantages,
    process_slice,
    rank_advantages,
    rlsd_generation_columns,
    rlsd_trainer,
    with_generation_signals,
)
from .grpo_invariance_probe import ATTENTION_ADVANTAGES, HAPO_OFF, RANK_ADVANTAGES, RLSD_UPDATE

pytestmark = pytest.mark.slow

PROBE = REPO_ROOT / "tests" / "distributed" / "grpo_invariance_probe.py"
LOSSES = sorted(POLICY_LOSSES)  # grpo, dapo, cispo, gspo, hapo, and any loss registered later
LORA_ARGS = ["--use_peft", "true", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj"]
# A metric of this loss (hapo's is its own; the others' are TRL's clip metrics, which the registry losses log too); a
# loss not listed is recognised by the policy_loss recorded in its saved config only.
LOSS_METRICS = {
    "grpo": "clip_ratio/high_max",
    "dapo": "clip_ratio/high_max",
    "gspo": "clip_ratio/high_max",
    "cispo": "cispo_clip_ratio",
    "hapo": "hapo/redistributed_frac",
    "rank_grpo": "clip_ratio/high_max",
}
# A metric of the token signal a loss turns on, logged at each generation (steps_per_generation 2: every other step).
GENERATION_METRICS = {"hapo": "hapo/sampling_temperature", "rank_grpo": "rank/ndcg@5"}


def test_the_issue_losses_are_registered():
    assert {"grpo", "dapo", "cispo", "gspo", "hapo"} <= set(LOSSES)


# ---------------------------------------------------------------------------------------------------------------
# (1) Each registered loss trains under accelerate launch, 2 CPU processes, ZeRO-2 and ZeRO-3, with and without LoRA.
# ---------------------------------------------------------------------------------------------------------------
def run_argv(policy_loss: str, lora: bool, output_dir) -> list[str]:
    config = CONFIGS / f"{policy_loss}_tiny.yaml"
    if not config.exists():  # grpo: the TRL loss_type config, switched to the registry's loss
        config = CONFIGS / "grpo_tiny.yaml"
    # --policy_loss: grpo_tiny.yaml runs TRL's loss_type; steps_per_generation 2: the second update is off-policy
    argv = ["--config", str(config), "--output_dir", str(output_dir), "--policy_loss", policy_loss,
            "--max_steps", "2", "--steps_per_generation", "2"]
    return argv + (LORA_ARGS if lora else [])


# Token signals that no loss implies, each trained from its tiny config (dapo) as the losses above. rlsd's tiny config
# re-syncs its frozen teacher (the history model; with LoRA a full copy that takes W + ΔW) every 2 steps: after the
# second step here, a collective under ZeRO-3.
SIGNAL_RUNS = {"attention_credit": "attention_credit/credited_frac", "rlsd": "rlsd/factor_mean"}


def signal_run_argv(signal: str, lora: bool, output_dir) -> list[str]:
    argv = ["--config", str(CONFIGS / f"{signal}_tiny.yaml"), "--output_dir", str(output_dir), "--max_steps", "2",
            "--steps_per_generation", "2"]
    return argv + (LORA_ARGS if lora else [])


# HAPO's entropy statistics come from TRL's old-log-prob forward in the runs above (steps_per_generation 2 > GA 1);
# under ZeRO-3 two more runs take the other two paths: the loss's own forward (on-policy, one micro-batch per
# generation) and one extra forward at generation (on-policy, two accumulated micro-batches per generation).
HAPO_STATISTICS_RUNS = {
    "hapo-on-policy": ["--steps_per_generation", "1"],
    "hapo-accumulated": ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                         "--steps_per_generation", "2", "--max_steps", "2"],
}


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """``stage_runs(zero_stage)``: the directory holding that stage's runs (2 per loss; ZeRO-3: and the HAPO
    statistics runs), launched once on first use."""

    def stage_spec(zero_stage: int, root) -> list[list[str]]:
        spec = [run_argv(loss, lora, root / run_name(loss, lora)) for loss in LOSSES for lora in (False, True)]
        spec += [signal_run_argv(name, lora, root / run_name(name, lora)) for name in SIGNAL_RUNS for lora in (False, True)]
        if zero_stage == 3:  # later flags override earlier ones
            spec += [run_argv("hapo", False, root / name) + extra for name, extra in HAPO_STATISTICS_RUNS.items()]
        return spec

    return stage_launcher(tmp_path_factory, "grpo", stage_spec)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("policy_loss", LOSSES)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_policy_loss_trains_under_deepspeed(zero_stage, policy_loss, lora, stage_runs, initial_weights):
    output_dir = stage_runs(zero_stage) / run_name(policy_loss, lora)
    info = deepspeed_run_info(output_dir, zero_stage, lora, global_step=2)

    # the loss that ran: recorded in the saved config, and a metric only that loss logs, at every step
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert args.policy_loss == policy_loss and args.loss_type == POLICY_LOSS_DEFAULTS[policy_loss].trl_loss_type
    assert args.loss_agg_mode == POLICY_LOSS_DEFAULTS[policy_loss].loss_agg_mode
    assert args.importance_sampling_level == ("sequence" if policy_loss == "gspo" else "token")
    logs = [entry for entry in info["log_history"] if "loss" in entry]
    assert len(logs) == 2
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in logs)
    metric = LOSS_METRICS.get(policy_loss, "entropy/q80")  # entropy/q80: TokenGRPOTrainer's metric
    assert all(metric in entry and "entropy/q80" in entry for entry in logs)
    assert all(("entropy_signal/mean" in entry) == (policy_loss == "hapo") for entry in logs)  # only hapo's signal
    if policy_loss in GENERATION_METRICS:
        assert any(GENERATION_METRICS[policy_loss] in entry for entry in logs)
    if policy_loss == "hapo":  # every part on, adaptive-temperature sampling included
        assert args.hapo_adaptive_temperature and args.hapo_token_advantage and args.hapo_adaptive_clip

    assert_trained(output_dir, lora, initial_weights, num_lora_b=2 * 2)  # 2 layers x (q_proj, v_proj)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("signal", sorted(SIGNAL_RUNS))
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_token_signal_trains_under_deepspeed(zero_stage, signal, lora, stage_runs, initial_weights):
    output_dir = stage_runs(zero_stage) / run_name(signal, lora)
    info = deepspeed_run_info(output_dir, zero_stage, lora, global_step=2)
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert signal in args.token_signals
    logs = [entry for entry in info["log_history"] if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in logs)
    assert any(SIGNAL_RUNS[signal] in entry for entry in logs)  # at the generation step
    if signal == "rlsd":  # the frozen teacher, synced after step 2; λ of the recipe's schedule at steps 1 and 2
        assert args.history_sync_steps == 2 and args.rlsd_teacher == "frozen"
        assert [entry["rlsd/lambda"] for entry in logs] == pytest.approx([0.5 * 59 / 60, 0.5 * 58 / 60])
    assert_trained(output_dir, lora, initial_weights, num_lora_b=2 * 2)


@pytest.mark.parametrize("name", sorted(HAPO_STATISTICS_RUNS))
def test_hapo_entropy_statistics_reach_the_sampler_under_zero3(name, stage_runs):
    info = json.loads((stage_runs(3) / name / RUN_INFO_FILE).read_text())
    assert info["zero_stage"] == 3 and info["global_step"] == 2
    temperatures = [entry["hapo/sampling_temperature"] for entry in info["log_history"]
                    if "hapo/sampling_temperature" in entry]
    assert len(temperatures) == 2 and temperatures[0] == pytest.approx(1.0)  # T_base: no statistics yet
    assert temperatures[1] != pytest.approx(1.0, abs=1e-4)  # the first generation's statistics, gathered


# ---------------------------------------------------------------------------------------------------------------
# (2) Process invariance: (batch 8, GA 1) = (batch 4, GA 2) = 2 processes × batch 4, loss and gradients within 1e-5.
# The 2-process side runs grpo_invariance_probe.py under torchrun (gloo): each rank takes its half of the same 8
# completions, and gradients are averaged over ranks as DDP does. For hapo, ĥ comes with the batch (statistics of
# the whole generation batch, gathered over processes), as _generate_and_score_completions adds it.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_results(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("invariance") / "two_processes.pt"
    run_subprocess(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
         "--model_dir", model_dir, "--output", str(output)],
        timeout=600,
    )
    return torch.load(output, weights_only=False)


@pytest.mark.parametrize("policy_loss", LOSSES)
def test_process_and_accumulation_invariance(policy_loss, model_dir, two_process_results, tmp_path):
    one_step = make_trainer(model_dir, tmp_path, policy_loss=policy_loss, **HAPO_OFF)  # batch 8, GA 1
    accumulated = make_trainer(
        model_dir, tmp_path, policy_loss=policy_loss, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        **HAPO_OFF,
    )
    batch = with_generation_signals(one_step, make_batch(one_step))
    expected = loss_and_grads(one_step, [batch])
    assert max(grad.abs().max() for grad in expected[1]) > 0

    assert_same_update(loss_and_grads(accumulated, split_tensor_dict(batch, 2)), expected)  # batch 4, GA 2
    two = two_process_results[policy_loss]  # 2 processes x batch 4, gradients averaged over processes
    assert_same_update((two["loss"], two["grads"]), expected)

    # The batch tells a wrong normaliser apart: the processes' halves differ in tokens, and a per-process token mean
    # would miss the reference by far more than the tolerance.
    local_losses = two["local_losses"]
    assert abs(local_losses[0] - local_losses[1]) > 1e-3
    tokens = [int(process_slice(batch, rank)["completion_mask"].sum()) for rank in (0, 1)]
    assert tokens[0] != tokens[1]
    if POLICY_LOSS_DEFAULTS[policy_loss].loss_agg_mode == "token-mean":
        half = sum(tokens) / 2
        per_process_mean = sum(loss * half / count for loss, count in zip(local_losses, tokens, strict=True)) / 2
        assert abs(per_process_mean - expected[0]) > 1e-3


def test_rank_advantages_of_a_group_split_over_processes(model_dir, two_process_results, tmp_path):
    """One group of 8 over 2 processes × 4 gives each process the rows of one process holding all 8."""
    whole = make_trainer(model_dir, tmp_path, policy_loss="rank_grpo", num_generations=8, rank_list_length=3,
                         rank_catalog="recommendation")
    expected = rank_advantages(whole)
    assert expected.abs().sum() > 0
    for rank, local in enumerate(two_process_results[RANK_ADVANTAGES]):
        rows = expected[4 * rank : 4 * rank + 4]
        torch.testing.assert_close(local, rows[:, : local.size(1)], atol=1e-6, rtol=0)
        assert rows[:, local.size(1):].abs().sum() == 0  # past the process's own longest completion: padding


def test_attention_credit_is_process_invariant(model_dir, two_process_results, tmp_path):
    """Attention credit on 2 processes × 4 rows gives each row the advantages of one process holding all 8 (the
    head groups come from both processes' rows); and under gradient accumulation the loss sees the same batch."""
    whole = make_trainer(model_dir, tmp_path, policy_loss="dapo", **ATTENTION_CREDIT)
    batch = make_batch(whole)
    expected = attention_credit_advantages(whole, batch)
    gamma = expected / batch["advantages"].unsqueeze(1)
    assert (gamma[batch["completion_mask"].bool()] != 1).any()  # some token credited
    for rank, local in enumerate(two_process_results[ATTENTION_ADVANTAGES]):
        rows = expected[4 * rank : 4 * rank + 4]
        torch.testing.assert_close(local, rows[:, : local.size(1)], atol=1e-6, rtol=0)
    # the credited advantages through the loss: batch 8 / GA 1 = batch 4 / GA 2
    accumulated = make_trainer(model_dir, tmp_path, policy_loss="dapo", per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, **ATTENTION_CREDIT)
    credited = batch | {"advantages": expected}
    assert_same_update(loss_and_grads(accumulated, split_tensor_dict(credited, 2)), loss_and_grads(whole, [credited]))


def test_rlsd_is_process_invariant(model_dir, two_process_results, tmp_path):
    """RLSD on 2 processes × 4 rows, each adding its own rows' teacher log-probs after generation, gives the loss and
    the averaged gradients of one process holding all 8 (the factor is each token's own)."""
    whole = rlsd_trainer(model_dir, tmp_path)
    batch = make_batch(whole)
    expected = loss_and_grads(whole, [batch | rlsd_generation_columns(whole, batch)])
    assert max(grad.abs().max() for grad in expected[1]) > 0
    two = two_process_results[RLSD_UPDATE]
    assert_same_update((two["loss"], two["grads"]), expected)
    assert abs(two["local_losses"][0] - two["local_losses"][1]) > 1e-3  # the halves differ
