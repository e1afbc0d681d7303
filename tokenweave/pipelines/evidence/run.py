"""Run ``tokenweave evidence``'s parts over the seeds (the package docstring) and write its table."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ...inference.loading import load_model_and_tokenizer, save_merged_model
from ...train import train
from ..critical import run_critical_pipeline, training_runs, warm_start_step
from ..quickstart import REPO_ROOT, quickstart_config
from ..steps import Step, made_from, run_steps
from ..token_rewards import pairs_rewards_step
from . import BUDGETS, PARTS, Budget
from .critical import critical_evidence
from .learning import learning_evidence, learning_verdicts
from .perturbation import perturbation_evidence
from .preference import METHODS, token_reward_evidence
from .ranks import rank_evidence
from .sft import reference_step, sft_noise_evidence, sft_settings
from .table import Measurement, evidence_json, evidence_markdown, load_measurements

LOG_PREFIX = "evidence"
logger = logging.getLogger(__name__)
CRITICAL_CONFIG = REPO_ROOT / "configs" / "critical_smollm2_full.yaml"
RANK_WARM_START_CONFIG = REPO_ROOT / "configs" / "recommend_sft_smollm2_lora.yaml"
MEASUREMENTS_FILE = "measurements.json"


def _measurements_step(name: str, settings: dict, measure, inputs: tuple[str, ...] = ()) -> Step:
    """A step whose output is the measurements ``measure()`` returns, as JSON."""

    def build(directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / MEASUREMENTS_FILE).write_text(evidence_json(measure()))

    return Step(name, settings, build, inputs)


def _read(directory: Path) -> list[Measurement]:
    return load_measurements((directory / MEASUREMENTS_FILE).read_text())


def _loaded(model: str):
    loaded, tokenizer = load_model_and_tokenizer(model)
    tokenizer.padding_side = "left"
    return loaded.eval(), tokenizer


def _critical_configs(work_dir: Path, seeds: Sequence[int], budget: Budget,
                      config_file: Path) -> tuple[dict, str | None]:
    """Each seed's critical-token pipeline config (the file's with the budget's counts, its localization and rollout
    steps, no training after them), and the file's ``cdpo_config`` (the run the preference and learning parts
    train)."""
    configs, cdpo_config = {}, None
    for seed in seeds:
        config = quickstart_config(str(work_dir / f"seed{seed}"), seed, config_file)
        cdpo_config = config.cdpo_config
        configs[seed] = replace(config, compare_dpo=False, compare_shuffled=False, cdpo_config=None,
                                num_examples=budget.critical_questions, measure_localization=True,
                                rollout_trajectories=budget.rollout_trajectories,
                                rollout_samples=budget.rollout_samples)
    return configs, cdpo_config


def _token_rewards(config, cdpo_config: str, steps: dict[str, Path]) -> dict[str, Path]:
    """TGDPO's and T-REG's rewarded pairs of one seed (:mod:`.preference`): the DPO reward model trained on the
    pairs from the warm start, then each method's token rewards, as steps under the seed's ``preference/``."""
    runs = training_runs(replace(config, cdpo_config=cdpo_config, compare_dpo=True))
    warm, pairs = str(steps["policy"] or config.model), steps["pairs"]
    root = Path(config.work_dir).parent / "preference"
    upstream = {"model": policy_record(steps["policy"], config.model), "pairs": made_from(pairs)}
    dpo = run_steps(root, [Step("dpo", {"run": runs["dpo"].record, **upstream},
                                lambda directory: runs["dpo"].train(warm, pairs, directory))], LOG_PREFIX)["dpo"]
    plain = {"token_signals": None, "signal_control": "none"}
    done = run_steps(root, [
        pairs_rewards_step("tgdpo", runs["cdpo"].variant(loss_type="tgdpo", **plain), warm, pairs, dpo,
                           upstream | {"reward_model": made_from(dpo)}),
        pairs_rewards_step("treg", runs["cdpo"].variant(loss_type="treg", **plain), warm, pairs, None, upstream),
    ], LOG_PREFIX)
    return {name: done[f"{name}_rewards"] for name in METHODS}


def policy_record(policy: Path | None, model: str) -> dict | str:
    """What the arithmetic rows' model is: the warm start's record (:func:`made_from`), or the base model's name."""
    return made_from(policy) if policy is not None else model


def _rank_warm_start(directory: Path) -> None:
    train(["--config", str(RANK_WARM_START_CONFIG), "--output_dir", str(directory / "adapter")])
    save_merged_model(str(directory / "adapter"), str(directory))


def run_evidence(
    work_dir: str | Path, seeds: Sequence[int], budget: str = "cpu", parts: Sequence[str] = PARTS,
    critical_config: str | Path = CRITICAL_CONFIG,
) -> list[Measurement]:
    """Every measurement of ``parts`` over ``seeds`` at ``budget`` (module docstring), each step reused when done."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or budget not in BUDGETS:
        raise ValueError(f"tokenweave evidence: unknown part(s) {unknown} (known: {list(PARTS)}) or budget "
                         f"{budget!r} (known: {list(BUDGETS)}).")
    counts, work_dir = BUDGETS[budget], Path(work_dir)
    configs, cdpo_config = _critical_configs(work_dir, seeds, counts, Path(critical_config))
    measurements, first = [], configs[seeds[0]]
    if cdpo_config is None and {"preference", "learning"} & set(parts):
        raise ValueError(f"{critical_config} has no cdpo_config: the preference and learning parts train its run.")
    if len(seeds) < 5:
        logger.warning(f"[{LOG_PREFIX}] {len(seeds)} seed(s): the evidence standard is at least 5 paired seeds.")
    # the arithmetic rows' model: the warm start (trained once, in the work dir; copied into each seed's pipeline,
    # which then reuses it), or the base model of a pipeline config without one
    arithmetic = {"critical", "preference", "perturbation", "learning"} & set(parts)
    warm_start = (run_steps(work_dir, [warm_start_step(first)], LOG_PREFIX)["warm_start"]
                  if arithmetic and first.warm_start_config is not None else None)
    if {"critical", "preference", "learning"} & set(parts):
        steps_by_seed = {}
        for seed, config in configs.items():
            seed_warm_start = Path(config.work_dir) / "warm_start"
            if warm_start is not None and not seed_warm_start.exists():
                shutil.copytree(warm_start, seed_warm_start)
            steps_by_seed[seed] = run_critical_pipeline(config) | {"policy": seed_warm_start if warm_start else None}
        if "critical" in parts:
            measurements += critical_evidence(steps_by_seed)
        if "preference" in parts:
            measurements += token_reward_evidence({seed: _token_rewards(configs[seed], cdpo_config, steps)
                                                   for seed, steps in steps_by_seed.items()})
    if "perturbation" in parts:
        model, tokenizer = _loaded(str(warm_start or first.model))
        settings = {"questions": counts.perturbation_questions, "top_k": counts.top_k,
                    "max_new_tokens": counts.max_new_tokens, "difficulty": first.task_difficulty,
                    "model": policy_record(warm_start, first.model), "controls": ["random", "position-matched"]}
        steps = [_measurements_step(
            f"perturbation_seed{seed}", {**settings, "seed": seed},
            lambda seed=seed: perturbation_evidence(
                model, tokenizer, seeds=[seed], num_questions=counts.perturbation_questions,
                difficulty=first.task_difficulty, top_k=counts.top_k, max_new_tokens=counts.max_new_tokens),
        ) for seed in seeds]
        measurements += _merged([_read(path) for path in run_steps(work_dir, steps, LOG_PREFIX).values()])
    if "ranks" in parts:
        rank_model = run_steps(work_dir, [Step("recommendation_warm_start", {"config": str(RANK_WARM_START_CONFIG)},
                                               _rank_warm_start)], LOG_PREFIX)["recommendation_warm_start"]
        model, tokenizer = _loaded(str(rank_model))
        steps = [_measurements_step(
            f"ranks_seed{seed}", {"requests": counts.rank_requests, "samples": counts.rank_samples, "seed": seed,
                                  "model": made_from(rank_model)},
            lambda seed=seed: [rank_evidence(model, tokenizer, seeds=[seed], num_requests=counts.rank_requests,
                                             num_samples_per_prompt=counts.rank_samples)],
        ) for seed in seeds]
        measurements += _merged([_read(path) for path in run_steps(work_dir, steps, LOG_PREFIX).values()])
    if "sft" in parts:
        reference = run_steps(work_dir, [reference_step(counts)], LOG_PREFIX)["sft_reference"]
        steps = [_measurements_step(
            f"sft_seed{seed}", sft_settings(counts, seed, reference),
            lambda seed=seed: sft_noise_evidence(counts, seed, reference, work_dir / f"sft_token_cleaning_seed{seed}"),
        ) for seed in seeds]
        measurements += _merged([_read(path) for path in run_steps(work_dir, steps, LOG_PREFIX).values()])
    if "learning" in parts:  # last: the longest part
        verdicts = {seed: learning_verdicts(configs[seed], cdpo_config, seed_steps, counts.learning_steps,
                                            counts.learning_test_problems, counts.prefix_rollouts)
                    for seed, seed_steps in steps_by_seed.items()}
        measurements += learning_evidence(verdicts, counts.learning_steps)
    return measurements


def _merged(per_seed: list[list[Measurement]]) -> list[Measurement]:
    """The rows of several seeds' steps, each row's seeds together (the rows in the first step's order)."""
    merged = per_seed[0]
    for rows in per_seed[1:]:
        for row, other in zip(merged, rows, strict=True):
            row.pairs.update(other.pairs)
    return merged


def write_evidence(measurements: list[Measurement], output_dir: str | Path) -> dict[str, Path]:
    """``evidence.md`` and ``evidence.json`` in ``output_dir``; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": output_dir / "evidence.md", "json": output_dir / "evidence.json"}
    paths["markdown"].write_text(evidence_markdown(measurements) + "\n")
    paths["json"].write_text(evidence_json(measurements))
    return paths

