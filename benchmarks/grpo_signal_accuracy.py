"""A GRPO token signal on SmolLM2-135M-Instruct and the arithmetic task: held-out accuracy of GRPO, GRPO with the
signal's random control and GRPO with the signal at the same budget over several seeds, with paired bootstrap
intervals of the differences. Signals (``--signal``): attention-derived credit (``attention_credit``, the coupled
preplan-and-anchor rule) and RLSD's self-distilled credit (``rlsd``).

The base model is almost never rewarded on this task (a small GRPO budget cannot move it), so every run starts from
a warm start: ``--warm_start_steps`` LoRA SFT steps of ``configs/sft_smollm2_lora.yaml``, merged, trained once.
From it, each seed trains three LoRA runs with that ``seed`` (sampling, data order, LoRA initialisation) and the
settings of the signal's config (``configs/attention_credit_smollm2_lora.yaml``: one generation batch spans 4
optimizer steps; ``configs/rlsd_smollm2_lora.yaml``: the released recipe, one update per generation):

- ``GRPO``: the config without the signal's fields (its loss, one advantage per completion);
- the random control: ``signal_control: shuffle``, each completion's values (attention credit's γ, RLSD's factors) put
  on random tokens of it (the same values: the control that isolates the signal; for attention credit the paper's
  "random 40 %");
- the signal: the config as it is.

Evaluation is greedy on the same held-out problems (the task's test split); the warm start is evaluated once::

    python benchmarks/grpo_signal_accuracy.py --seeds 0 1 2 --num_test_examples 100 --output attention.md
    python benchmarks/grpo_signal_accuracy.py --signal rlsd --seeds 0 1 2 3 4 --num_test_examples 100 --output rlsd.md

A finished run (its ``run_info.json``) and an evaluation (its JSON file, for as many problems) are reused.
Intervals: :func:`tokenweave.stats.paired_bootstrap` of ``correct(A) − correct(B)`` per problem and seed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tokenweave.inference.evaluate import evaluate_model
from tokenweave.inference.loading import save_merged_model
from tokenweave.stats import paired_bootstrap
from tokenweave.train import RUN_INFO_FILE, train

REPO_ROOT = Path(__file__).resolve().parents[1]
WARM_START_CONFIG = REPO_ROOT / "configs" / "sft_smollm2_lora.yaml"
MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Signal:
    """A GRPO token signal as the benchmark runs it: its config, the labels of its two arms (the runs' directories
    are named after them) and the metrics its table shows (label → logged name)."""

    config: Path
    label: str
    control: str
    metrics: dict[str, str]

    @property
    def methods(self) -> dict[str, list[str] | None]:
        """Each arm's overrides of the signal's config (None: the GRPO baseline config)."""
        return {"GRPO": None, self.control: ["--signal_control", "shuffle"], self.label: []}

    @property
    def comparisons(self) -> tuple[tuple[str, str], ...]:
        return ((self.label, "GRPO"), (self.label, self.control), (self.control, "GRPO"))


SIGNALS = {
    "attention_credit": Signal(REPO_ROOT / "configs" / "attention_credit_smollm2_lora.yaml", "coupled credit",
                               "random credit", {"credited share": "attention_credit/credited_frac",
                                                 "mean γ": "attention_credit/gamma_mean"}),
    "rlsd": Signal(REPO_ROOT / "configs" / "rlsd_smollm2_lora.yaml", "rlsd", "random rlsd",
                   {"mean factor": "rlsd/factor_mean", "mean δ": "rlsd/delta_mean"}),
}


def grpo_config(work_dir: Path, name: str) -> Path:
    """The signal's config without its fields (``token_signals`` and those named after it): the GRPO baseline with
    every other setting the same."""
    config = yaml.safe_load(SIGNALS[name].config.read_text())
    baseline = {key: value for key, value in config.items()
                if key != "token_signals" and not key.startswith(name)}
    path = work_dir / f"grpo_{name}.yaml"
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
    signal = SIGNALS[args.signal]
    baseline = grpo_config(work_dir, args.signal)
    for seed in args.seeds:
        for name, overrides in signal.methods.items():
            output_dir = work_dir / f"{name.replace(' ', '_').lower()}_seed{seed}"
            if not (output_dir / RUN_INFO_FILE).exists():
                config = baseline if overrides is None else signal.config
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


def report(results: dict, seeds: list[int], signal: Signal) -> str:
    warm = results["warm start"]
    lines = [
        f"Warm start accuracy: {warm['accuracy']:.1%} ({warm['num_correct']}/{warm['num_examples']}).",
        "",
        "| method | held-out accuracy, mean | per seed | mean reward (first → last generation batch) | "
        + " | ".join(signal.metrics) + " |",
        "|---|---|---|---|" + "---|" * len(signal.metrics),
    ]
    for name in signal.methods:
        runs = [results["runs"][(name, seed)] for seed in seeds]
        accuracies = [run["eval"]["accuracy"] for run in runs]
        per_seed = " / ".join(f"{a:.1%}" for a in accuracies)
        rewards = [_history(run["info"], "reward") for run in runs]
        reward_cell = " / ".join(f"{r[0]:.2f} → {r[-1]:.2f}" for r in rewards if r)
        cells = []
        for key in signal.metrics.values():
            history = [_history(run["info"], key) for run in runs]
            cells.append(f"{sum(map(sum, history)) / sum(map(len, history)):.3f}" if all(history) else "-")
        lines.append(f"| {name} | {sum(accuracies) / len(accuracies):.1%} | {per_seed} | {reward_cell} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| difference | mean | 95% paired bootstrap interval |", "|---|---|---|"]
    num_problems = warm["num_examples"]
    for a, b in signal.comparisons:
        differences = [
            [x - y for x, y in zip(_verdicts(results["runs"][(a, seed)]["eval"]),
                                   _verdicts(results["runs"][(b, seed)]["eval"]), strict=True)]
            for seed in seeds
        ]
        mean, low, high = (round(value, 9) + 0.0 for value in paired_bootstrap(differences))  # no "-0.0%"
        lines.append(f"| {a} − {b} | {mean:+.1%} | [{low:+.1%}, {high:+.1%}] ({num_problems} problems × "
                     f"{len(seeds)} seeds) |")
    runtimes = [results["runs"][(name, seed)]["info"]["train_metrics"].get("train_runtime")
                for name in signal.methods for seed in seeds]
    if all(isinstance(value, (int, float)) for value in runtimes):
        lines.append("")
        lines.append(f"Training time per run: {min(runtimes):.0f}-{max(runtimes):.0f} s.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--signal", choices=list(SIGNALS), default="attention_credit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_test_examples", type=int, default=100)
    parser.add_argument("--warm_start_steps", type=int, default=12, help="LoRA SFT steps of the warm start.")
    parser.add_argument("--max_steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="default: outputs/<signal>_accuracy (attention credit's: outputs/attention_credit_accuracy)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args()
    args.work_dir = args.work_dir or Path(f"outputs/{args.signal}_accuracy")
    table = report(run(args), args.seeds, SIGNALS[args.signal])
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
