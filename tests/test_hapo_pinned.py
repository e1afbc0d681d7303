"""HAPO with every part on gives the numbers the code gave before HAPO moved out of the shared GRPO trainer.

The literal numbers below were computed by the code at c87512a (HAPO wired into ``TokenGRPOTrainer``), on the tiny
model, CPU, float32. Every part is on: adaptive-temperature sampling (the second generation samples with the first
one's statistics), token-level group advantages, advantage redistribution, adaptive clip bounds, dual clip 10, and
ĥ under the generation batch's statistics; the batch is off-policy, so the ratio terms act:

- ``test_generation_and_loss_are_pinned``: two generations with ``num_iterations`` 2 (TRL's old-log-prob forward
  gives the entropies), then the loss and gradients of the second generation batch with its old log-probs moved by
  N(0, 0.3²) (and far at one token, so the dual clip acts); also the same batch in 2 micro-batches under
  ``hapo_entropy_stats: micro_batch``.
- ``test_training_run_is_pinned``: 4 updates of ``Trainer.train`` (2 generations, 2 updates each: the second
  update of a batch is off-policy).

A refactor that keeps the math keeps these numbers, up to float32 summation order, which differs between CPUs: on
an AMD EPYC machine (2026-12-02) the one-batch numbers differ from these by up to 2e-5 relative (an entropy sum of
mixed signs) and the 4-update run's by up to 5e-4 (the drift of 4 optimizer steps). The tolerances, 1e-4 and 1e-3
relative, hold on both; a change of the math (a clip bound, a normaliser, a sign) moves them by far more. Sampling
is deterministic on CPU given the seed (the completion lengths are compared exactly).
"""

import pytest
import torch
from trl.trainer.utils import split_tensor_dict

from .grpo_harness import loss_and_grads, make_trainer, train_dataset

REL_BATCH, REL_RUN = 1e-4, 1e-3  # module docstring
PINNED_METRICS = (
    "entropy", "entropy/q20", "entropy/q50", "entropy/q80", "hapo/redistributed_frac", "entropy_signal/mean",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/dual_mean",
    "clip_ratio/low_mean_high_entropy", "clip_ratio/high_mean_high_entropy", "clip_ratio/low_mean_low_entropy",
    "clip_ratio/high_mean_low_entropy",
)


def approx(expected, rel=REL_BATCH):
    return pytest.approx(expected, rel=rel, abs=1e-9)


def generation_batches(trainer):
    """Two generation batches of 2 prompts × 4, sampled with a fixed seed."""
    dataset = train_dataset()
    rows = [dataset[0]] * 4 + [dataset[1]] * 4
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(rows), trainer._generate_and_score_completions(rows)


def off_policy(batch):
    """``batch`` with its old log-probs moved by N(0, 0.3²) (seeded), so the ratios leave the clip ranges, and by −3
    more at the third token (ratio ≈ 20 > c = 10 there, so the dual clip acts where A < 0)."""
    noise = torch.randn(batch["old_per_token_logps"].shape, generator=torch.Generator().manual_seed(1))
    noise[:, 2] -= 10.0
    return batch | {"old_per_token_logps": batch["old_per_token_logps"] + 0.3 * noise}


def summary(loss, grads):
    flat = torch.cat([grad.flatten() for grad in grads])
    return [loss, flat.norm().item(), flat.abs().sum().item(), flat[:3].tolist(), flat[-3:].tolist()]


# The second generation batch: completion lengths, each row's advantage A_i, ĥ summed, the sampling temperatures
PINNED_GENERATION = {
    "lengths": [8, 8, 8, 8, 5, 8, 8, 8],
    "advantages": [-0.9955701231956482, -0.9955701231956482, 0.862827479839325, 1.1283129453659058,
                   1.810696005821228, -0.8148131370544434, -0.8148131370544434, 0.49794140458106995],
    "entropy_signal_sum": -13.18617057800293,
    "entropy_signal_abs_sum": 20.554889678955078,
    "sampling_temperature": [1.0, 0.9903461933135986],
    "first_entropy_signal_sum": -12.916729927062988,
}
# loss, gradient norm, Σ|gradient|, the first and the last 3 gradient entries
PINNED_LOSS = [
    0.6456891298294067, 1.6613763570785522, 172.03903198242188,
    [0.013716649264097214, 0.00306942337192595, -0.013825741596519947],
    [0.005681047216057777, -0.004038277082145214, -0.0005370757426135242],
]
PINNED_LOSS_METRICS = {
    "entropy": 4.58114767074585,
    "entropy/q20": 4.579280853271484,
    "entropy/q50": 4.580223083496094,
    "entropy/q80": 4.583413600921631,
    "hapo/redistributed_frac": 0.37704917788505554,
    "entropy_signal/mean": -0.21616673469543457,
    "clip_ratio/low_mean": 0.09836065769195557,
    "clip_ratio/high_mean": 0.13114753365516663,
    "clip_ratio/region_mean": 0.2295081913471222,
    "clip_ratio/dual_mean": 0.06557376682758331,
    "clip_ratio/low_mean_high_entropy": 0.0833333358168602,
    "clip_ratio/high_mean_high_entropy": 0.1666666716337204,
    "clip_ratio/low_mean_low_entropy": 0.10204081982374191,
    "clip_ratio/high_mean_low_entropy": 0.12244898080825806,
}
PINNED_MICRO_BATCH = [
    0.6342981159687042, 1.7299696207046509, 178.20452880859375,
    [0.013440475799143314, 0.0030862402636557817, -0.01353088952600956],
    [0.005586507264524698, -0.00420690793544054, -0.00046781671699136496],
]
# Per logged step (4 updates); then the trained parameters' norm and Σ|θ|
PINNED_RUN = {
    "logs": [
        {"loss": -0.36070430278778076, "grad_norm": 2.526951551437378, "hapo/sampling_temperature": 1.0,
         "clip_ratio/region_mean": 0.0, "hapo/redistributed_frac": 0.78125,
         "entropy_signal/mean": -0.2367871254682541, "entropy": 4.582065105438232},
        {"loss": 0.5224134922027588, "grad_norm": 1.5617780685424805, "clip_ratio/region_mean": 0.15625,
         "hapo/redistributed_frac": 0.25, "entropy_signal/mean": -0.22017809748649597,
         "entropy": 4.554080009460449},
        {"loss": 0.2031763643026352, "grad_norm": 0.6677110195159912, "hapo/sampling_temperature": 0.9500001072883606,
         "clip_ratio/region_mean": 0.0, "hapo/redistributed_frac": 0.800000011920929,
         "entropy_signal/mean": -0.27053654193878174, "entropy": 4.526193618774414},
        {"loss": -0.2624211013317108, "grad_norm": 1.188056230545044, "clip_ratio/region_mean": 0.03125,
         "hapo/redistributed_frac": 0.53125, "entropy_signal/mean": -0.45649439096450806,
         "entropy": 4.528012752532959},
    ],
    "param_norm": 21.054340362548828,
    "param_abs_sum": 3036.3076171875,
}


def test_generation_and_loss_are_pinned(model_dir, tmp_path):
    trainer = make_trainer(
        model_dir, tmp_path, policy_loss="hapo", dual_clip_c=10.0, num_iterations=2, max_completion_length=8
    )
    assert trainer.args.hapo_adaptive_temperature and trainer.args.hapo_token_advantage
    assert trainer.args.hapo_adaptive_advantage and trainer.args.hapo_adaptive_clip
    first, second = generation_batches(trainer)
    mask = second["completion_mask"]
    generation = {
        "lengths": mask.sum(-1).tolist(),
        "advantages": second["advantages"][:, 0].tolist(),
        "entropy_signal_sum": second["entropy_signal"].sum().item(),
        "entropy_signal_abs_sum": second["entropy_signal"].abs().sum().item(),
        "sampling_temperature": trainer._metrics["train"]["hapo/sampling_temperature"],
        "first_entropy_signal_sum": first["entropy_signal"].sum().item(),
    }
    batch = off_policy(second)
    trainer._metrics["train"].clear()
    result = summary(*loss_and_grads(trainer, [batch]))
    metrics = {name: trainer._metrics["train"][name][-1] for name in PINNED_METRICS}

    # the released code's ĥ: the current policy's entropies under each micro-batch's statistics (2 micro-batches)
    micro = make_trainer(
        model_dir, tmp_path, policy_loss="hapo", dual_clip_c=10.0, num_iterations=2, max_completion_length=8,
        hapo_entropy_stats="micro_batch", per_device_train_batch_size=4, gradient_accumulation_steps=2,
    )
    micro_batch = {key: value for key, value in batch.items() if key != "entropy_signal"}
    micro_result = summary(*loss_and_grads(micro, split_tensor_dict(micro_batch, 2)))
    assert generation["lengths"] == PINNED_GENERATION["lengths"]
    for key, value in PINNED_GENERATION.items():
        assert generation[key] == approx(value), key
    assert result[:3] == approx(PINNED_LOSS[:3])
    assert result[3] == approx(PINNED_LOSS[3]) and result[4] == approx(PINNED_LOSS[4])
    assert metrics == approx(PINNED_LOSS_METRICS)
    assert micro_result[:3] == approx(PINNED_MICRO_BATCH[:3])
    assert micro_result[3] == approx(PINNED_MICRO_BATCH[3]) and micro_result[4] == approx(PINNED_MICRO_BATCH[4])


RUN_KEYS = ("loss", "grad_norm", "hapo/sampling_temperature", "clip_ratio/region_mean", "hapo/redistributed_frac",
            "entropy_signal/mean", "entropy")


def test_training_run_is_pinned(model_dir, tmp_path):
    trainer = make_trainer(
        model_dir, tmp_path, policy_loss="hapo", dual_clip_c=10.0, per_device_train_batch_size=4,
        steps_per_generation=2, max_steps=4, learning_rate=2e-2, max_completion_length=8,
    )
    torch.manual_seed(0)
    trainer.train()
    logs = [{key: entry[key] for key in RUN_KEYS if key in entry} for entry in trainer.state.log_history
            if "loss" in entry]
    params = torch.cat([param.detach().flatten() for param in trainer.model.parameters()])
    run = {"logs": logs, "param_norm": params.norm().item(), "param_abs_sum": params.abs().sum().item()}
    assert len(logs) == len(PINNED_RUN["logs"])
    for entry, expected in zip(logs, PINNED_RUN["logs"], strict=True):
        assert entry == approx(expected, REL_RUN)
    assert run["param_norm"] == approx(PINNED_RUN["param_norm"], REL_RUN)
    assert run["param_abs_sum"] == approx(PINNED_RUN["param_abs_sum"], REL_RUN)
