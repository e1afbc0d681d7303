"""Attention-derived credit on SmolLM2-135M-Instruct and the arithmetic task: held-out accuracy of GRPO, GRPO with
random credit and GRPO with the coupled preplan-and-anchor credit at the same budget over several seeds, with
paired bootstrap intervals of the differences.

The base model is almost never rewarded on this task (a small GRPO budget cannot move it), so every run starts from
a warm start: ``--warm_start_steps`` LoRA SFT steps of ``configs/sft_smollm2_lora.yaml``, merged, trained once.
From it, each seed trains three LoRA runs with that ``seed`` (sampling, data order, LoRA initialisation) and the
settings of ``configs/attention_credit_smollm2_lora.yaml`` (one generation batch spans 4 optimizer steps):

- ``GRPO``: the config without its attention-credit fields (TRL's DAPO loss, one advantage per completion);
- ``random credit``: ``signal_control: shuffle``, each completion's γ put on random tokens of it (the same
  share credited, the same values: the control that isolates the signal, the paper's "random 40 %");
- ``coupled credit``: the config as it is.

Evaluation is greedy on the same held-out problems (the task's test split); the warm start is evaluated once::

    python benchmarks/attention_credit_accuracy.py --seeds 0 1 2 --num_test_examples 100 --output attention.md

A finished run (its ``run_info.json``) and an evaluation (its JSON file, for as many problems) are reused.
Intervals: :func:`intervals.paired_bootstrap` of ``correct(A) − correct(B)`` per problem and seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from intervals import paired_bootstrap

from tokenweave.inference.evaluate import evaluate_model
from tokenweave.inference.loading import save_merged_model
from tokenweave.train import RUN_INFO_FILE, train

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "attention_credit_smollm2_lora.yaml"
WARM_START_CONFIG = REPO_ROOT / "configs" / "sft_smollm2_lora.yaml"
METHODS = {"GRPO": None, "random credit": ["--signal_control", "shuffle"], "coupled credit": []}
COMPARISONS = (("coupled credit", "GRPO"), ("coupled credit", "random credit"), ("random credit", "GRPO"))
MAX_NEW_TOKENS = 64


def grpo_config(work_dir: Path) -> Path:
    """``CONFIG`` without the attention-credit fields: the GRPO baseline with every other setting the same."""
    config = yaml.safe_load(CONFIG.read_text())
    baseline = {key: value for key, value in config.items()
                if key != "token_signals" and not key.startswith("attention_credit")}
    path = work_dir / "grpo.yaml"
    path.write_text(yaml.safe_dump(baseline, sort_keys=False))
    return path


def evaluate(model: str, output: Path, num_test_examples: int) -> dict:
    """Greedy accuracy of ``model`` on the test problems (reused from ``output``)."""
    if output.exists():
        result = json.loads(output.read_text())
        if result["num_examples"] == num_test_examples:
            return result
    return evaluate_model(model, num_examples=num_test_examples, max_new_tokens=MAX_NEW_TOKENS, output=str(output))


def run(args) -> dict:
    work_dir = args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    adapter, warm_start = work_dir / "warm_start_adapter", work_dir / "warm_start"
    if not (warm_start / "config.json").exists():
        train(["--config", str(WARM_START_CONFIG), "--max_steps", str(args.warm_start_steps),
               "--output_dir", str(adapter)])
        save_merged_model(str(adapter), str(warm_start))
    results = {"warm start": evaluate(str(warm_start), work_dir / "eval_warm_start.json", args.num_test_examples),
               "runs": {}}
    baseline = grpo_config(work_dir)
    for seed in args.seeds:
        for name, overrides in METHODS.items():
            output_dir = work_dir / f"{name.replace(' ', '_').lower()}_seed{seed}"
            if not (output_dir / RUN_INFO_FILE).exists():
                config = baseline if overrides is None else CONFIG
                steps = ["--max_steps", str(args.max_steps)] if args.max_steps else []
                train(["--config", str(config), "--model_name_or_path", str(warm_start), "--output_dir",
                       str(output_dir), "--seed", str(seed), *(overrides or []), *steps])
            info = json.loads((output_dir / RUN_INFO_FILE).read_text())
            evaluation = evaluate(str(output_dir), work_dir / f"eval_{output_dir.name}.json", args.num_test_examples)
            results["runs"][(name, seed)] = {"info": info, "eval": evaluation}
    return results


def _verdicts(result: dict) -> list[float]:
    return [float(sample["correct"]) for sample in result["samples"]]


def _history(info: dict, key: str) -> list[float]:
    return [entry[key] for entry in info["log_history"] if key in entry]


def report(results: dict, seeds: list[int]) -> str:
    warm = results["warm start"]
    lines = [
        f"Warm start accuracy: {warm['accuracy']:.1%} ({warm['num_correct']}/{warm['num_examples']}).",
        "",
        "| method | held-out accuracy, mean | per seed | mean reward (first → last generation batch) "
        "| credited share | mean γ |",
        "|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        runs = [results["runs"][(name, seed)] for seed in seeds]
        accuracies = [run["eval"]["accuracy"] for run in runs]
        per_seed = " / ".join(f"{a:.1%}" for a in accuracies)
        rewards = [_history(run["info"], "reward") for run in runs]
        reward_cell = " / ".join(f"{r[0]:.2f} → {r[-1]:.2f}" for r in rewards if r)
        credit = [_history(run["info"], "attention_credit/credited_frac") for run in runs]
        gamma = [_history(run["info"], "attention_credit/gamma_mean") for run in runs]
        credit_cell = f"{sum(map(sum, credit)) / sum(map(len, credit)):.3f}" if all(credit) else "-"
        gamma_cell = f"{sum(map(sum, gamma)) / sum(map(len, gamma)):.3f}" if all(gamma) else "-"
        lines.append(f"| {name} | {sum(accuracies) / len(accuracies):.1%} | {per_seed} | {reward_cell} "
                     f"| {credit_cell} | {gamma_cell} |")
    lines += ["", "| difference | mean | 95% paired bootstrap interval |", "|---|---|---|"]
    num_problems = warm["num_examples"]
    for a, b in COMPARISONS:
        differences = [
            [x - y for x, y in zip(_verdicts(results["runs"][(a, seed)]["eval"]),
                                   _verdicts(results["runs"][(b, seed)]["eval"]), strict=True)]
            for seed in seeds
        ]
        mean, low, high = (round(value, 9) + 0.0 for value in paired_bootstrap(differences))  # no "-0.0%"
        lines.append(f"| {a} − {b} | {mean:+.1%} | [{low:+.1%}, {high:+.1%}] ({num_problems} problems × "
                     f"{len(seeds)} seeds) |")
    runtimes = [results["runs"][(name, seed)]["info"]["train_metrics"].get("train_runtime")
                for name in METHODS for seed in seeds]
    if all(isinstance(value, (int, float)) for value in runtimes):
        lines.append("")
        lines.append(f"Training time per run: {min(runtimes):.0f}-{max(runtimes):.0f} s.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_test_examples", type=int, default=100)
    parser.add_argument("--warm_start_steps", type=int, default=12, help="LoRA SFT steps of the warm start.")
    parser.add_argument("--max_steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/attention_credit_accuracy"))
    parser.add_argument("--output", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args()
    table = report(run(args), args.seeds)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
