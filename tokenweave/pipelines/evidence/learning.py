"""Learning where placement can matter: cDPO on pairs that share a prefix against pairs of independent samples, and
cDPO against DPO and against its shuffled control, at several step budgets (issue 25's learning part).

Per seed, from that seed's critical-token pipeline (its warm start, or its base model without one; its scored pairs
and positive/negative models; ``steps``: their directories by step name, the model under ``policy``), as
resumable steps under ``seed<N>/learning/``:

1. ``prefix_pairs``: each rejected trajectory against a correct continuation of itself from just before its
   lowest-scored token (:func:`tokenweave.pipelines.prefix_pairs.prefix_pairs`), scored by the positive and negative
   models as the pipeline scores its pairs; ``independent_pairs``: the pipeline's pairs those were made from, in the
   same order (the same rejected trajectories: the two kinds of pairs differ only in their chosen responses);
2. for each kind of pairs, each budget of optimizer steps and each arm (``dpo``, ``cdpo``, ``cdpo_shuffled``: the
   critical config's cDPO run, with ``loss_type: sigmoid``, as it is, and with ``signal_control: shuffle``), one run
   from the warm start with ``max_steps`` = the budget;
3. greedy accuracy of every run on the same held-out problems (the arithmetic test split, the first
   ``test_problems``).

Rows (units: the held-out problems, shared by the seeds, so the interval is the paired bootstrap over problems): for
each kind of pairs and budget, cDPO against its shuffled control and against DPO; for each budget, cDPO on
prefix-sharing pairs against cDPO on independent pairs of the same questions.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from datasets import load_from_disk

from ...inference.evaluate import evaluate_model
from ...inference.loading import load_model_and_tokenizer
from ...inference.scoring import score_with_models
from ..critical import training_runs
from ..prefix_pairs import prefix_pairs
from ..quickstart import MAX_NEW_TOKENS
from ..steps import Step, made_from, run_steps
from .table import Measurement

LOG_PREFIX = "evidence"
ARMS = ("dpo", "cdpo", "cdpo_shuffled")
KINDS = ("prefix", "independent")
EVAL_FILE = "eval.json"


def _prefix_pairs(config, steps: dict[str, Path], settings: dict, directory: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(steps["policy"] or config.model))
    tokenizer.padding_side = "left"
    pairs = prefix_pairs(load_from_disk(str(steps["pairs"])), model.eval(), tokenizer, **settings)
    if len(pairs) == 0:
        raise ValueError(f"No prefix-sharing pair from {steps['pairs']}: no rollout from a rejected trajectory's "
                         "lowest-scored token ended correct (more rollouts: a larger budget).")
    del model
    score_with_models(pairs, str(steps["positive"]), str(steps["negative"]), b=config.score_b,
                      batch_size=config.score_batch_size, chunk_size=config.score_chunk_size,
                      dtype=config.inference_dtype).save_to_disk(str(directory))


def _independent_pairs(pairs: Path, prefix: Path, directory: Path) -> None:
    """The pairs the prefix-sharing pairs were made from, in their order: the same rejected trajectories."""
    load_from_disk(str(pairs)).select(load_from_disk(str(prefix))["pair_row"]).save_to_disk(str(directory))


def _evaluation(model: Path, test_problems: int, difficulty: str) -> Step:
    def build(directory: Path) -> None:
        directory.mkdir(parents=True)
        evaluate_model(str(model), difficulty=difficulty, num_examples=test_problems, max_new_tokens=MAX_NEW_TOKENS,
                       output=str(directory / EVAL_FILE))

    return Step(f"eval_{model.name}", {"model": made_from(model), "test_problems": test_problems,
                                       "max_new_tokens": MAX_NEW_TOKENS, "difficulty": difficulty}, build)


def learning_verdicts(config, cdpo_config: str, steps: dict[str, Path], budgets: tuple[int, ...], test_problems: int,
                      rollouts: int) -> dict[tuple[str, int, str], list[bool]]:
    """Every run of one seed (module docstring) and its per-problem verdicts, by ``(kind, budget, arm)``."""
    runs = training_runs(replace(config, cdpo_config=cdpo_config, compare_dpo=True, compare_shuffled=True))
    root = Path(config.work_dir).parent / "learning"
    warm = str(steps["policy"] or config.model)  # the warm start, or the base model
    settings = {"num_rollouts": rollouts, "temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                "seed": config.seed}
    upstream = {name: made_from(steps[name]) for name in ("pairs", "positive", "negative")}
    upstream["policy"] = made_from(steps["policy"]) if steps["policy"] is not None else config.model
    pairs = run_steps(root, [
        Step("prefix_pairs", {**settings, **upstream},
             lambda directory: _prefix_pairs(config, steps, settings, directory)),
        Step("independent_pairs", {}, lambda directory: _independent_pairs(steps["pairs"], root / "prefix_pairs",
                                                                            directory), inputs=("prefix_pairs",)),
    ], LOG_PREFIX)
    trainings = []
    for kind in KINDS:
        for budget in budgets:
            for arm in ARMS:
                run, dataset = runs[arm].variant(max_steps=budget), pairs[f"{kind}_pairs"]
                record = {"run": run.record, "model": upstream["policy"], "dataset": made_from(dataset)}
                trainings.append(Step(f"{arm}_{kind}_{budget}", record,
                                      lambda directory, run=run, dataset=dataset: run.train(warm, dataset, directory)))
    trained = run_steps(root, trainings, LOG_PREFIX)
    evaluated = run_steps(root, [_evaluation(path, test_problems, config.task_difficulty) for path in trained.values()],
                          LOG_PREFIX)
    verdicts = {}
    for name, path in trained.items():
        arm, kind, budget = name.rsplit("_", 2)
        samples = json.loads((evaluated[f"eval_{name}"] / EVAL_FILE).read_text())["samples"]
        verdicts[kind, int(budget), arm] = [sample["correct"] for sample in samples]
    return verdicts


def learning_evidence(verdicts_by_seed: dict[int, dict[tuple[str, int, str], list[bool]]],
                      budgets: tuple[int, ...]) -> list[Measurement]:
    """The rows of the module docstring from each seed's verdicts (:func:`learning_verdicts`)."""
    rows = []

    def row(signal: str, control: str, first: tuple, second: tuple) -> None:
        measurement = Measurement(signal, "held-out accuracy (greedy)", control, "test problems", shared_units=True)
        for seed, verdicts in sorted(verdicts_by_seed.items()):
            for a, b in zip(verdicts[first], verdicts[second], strict=True):
                measurement.add(seed, float(a), float(b))
        rows.append(measurement)

    for kind in KINDS:
        for budget in budgets:
            label = f"cDPO ({kind} pairs, {budget} steps)"
            row(label, "shuffled cDPO, the same pairs and steps", (kind, budget, "cdpo"), (kind, budget, "cdpo_shuffled"))
            row(label, "DPO, the same pairs and steps", (kind, budget, "cdpo"), (kind, budget, "dpo"))
    for budget in budgets:
        row(f"cDPO (prefix pairs, {budget} steps)", "cDPO on independent pairs of the same questions",
            ("prefix", budget, "cdpo"), ("independent", budget, "cdpo"))
    return rows
