"""Rank-GRPO against GRPO on SmolLM2-135M-Instruct, the recommendation task: held-out Recall@k / NDCG@k of the base
model, its warm start, GRPO and Rank-GRPO at the same budget over several seeds, with a paired bootstrap interval.

The base model writes no parseable list (every reward 0, so GRPO would not move), so, as in the paper, both RL
methods start from a warm start: ``configs/recommend_sft_smollm2_lora.yaml`` (a short LoRA SFT on the task's reference
lists, other requests than the RL runs see), merged, trained once. Each seed then trains
``configs/recommend_grpo_smollm2_lora.yaml`` (one NDCG@5 reward per answer, sequence-level ratio) and
``configs/rank_grpo_smollm2_lora.yaml`` (per-rank rewards, advantages and ratios) from it with that ``seed``
(sampling, data order, LoRA initialisation), the same steps, batch, learning rate and clip. Evaluation is greedy on
the same held-out requests (the task's test split); base and warm start are evaluated once::

    python benchmarks/rank_grpo_accuracy.py --seeds 0 1 2 --num_test_examples 64 --output rank_grpo_accuracy.md

A finished run (its ``run_info.json``) and an evaluation (its JSON file, for as many requests) are reused.

The interval: per test request and seed, ``d = NDCG@5(Rank-GRPO) − NDCG@5(GRPO)`` (and the same for Recall@5);
:func:`tokenweave.stats.paired_bootstrap` resamples requests with the same draw for every seed, 10 000 times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenweave.inference.evaluate import evaluate_model
from tokenweave.inference.loading import save_merged_model
from tokenweave.rewards.ranking import ndcg_at_k, recall_at_k
from tokenweave.stats import paired_bootstrap
from tokenweave.train import RUN_INFO_FILE, train

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "GRPO": REPO_ROOT / "configs" / "recommend_grpo_smollm2_lora.yaml",
    "Rank-GRPO": REPO_ROOT / "configs" / "rank_grpo_smollm2_lora.yaml",
}
WARM_START_CONFIG = REPO_ROOT / "configs" / "recommend_sft_smollm2_lora.yaml"
MAX_NEW_TOKENS = 64
K = 5


def evaluate(model: str, adapter: str | None, output: Path, num_test_examples: int) -> dict:
    """Recall@k / NDCG@k of ``model`` (+ ``adapter``) on the test requests (reused from ``output``)."""
    if output.exists():
        result = json.loads(output.read_text())
        if result["num_examples"] == num_test_examples:
            return result
    return evaluate_model(model, adapter=adapter, task="recommendation", num_examples=num_test_examples,
                          max_new_tokens=MAX_NEW_TOKENS, output=str(output))


def per_request(result: dict, metric) -> list[float]:
    """``metric(hits, number relevant, K)`` of each evaluated request."""
    return [metric(sample["hits"], len(sample["relevant_items"]), K) for sample in result["samples"]]


def run(seeds: list[int], num_test_examples: int, work_dir: Path, max_steps: int | None) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    adapter, warm_start = work_dir / "warm_start_adapter", work_dir / "warm_start"
    if not (warm_start / "config.json").exists():
        train(["--config", str(WARM_START_CONFIG), "--output_dir", str(adapter)])
        save_merged_model(str(adapter), str(warm_start))
    results = {
        "base": evaluate("smollm2-135m", None, work_dir / "eval_base.json", num_test_examples),
        "warm start (SFT)": evaluate(str(warm_start), None, work_dir / "eval_warm_start.json", num_test_examples),
        "runs": {},
    }
    for seed in seeds:
        for name, config in CONFIGS.items():
            output_dir = work_dir / f"{name.lower()}_seed{seed}"
            if not (output_dir / RUN_INFO_FILE).exists():
                overrides = ["--max_steps", str(max_steps)] if max_steps else []
                train(["--config", str(config), "--model_name_or_path", str(warm_start), "--output_dir",
                       str(output_dir), "--seed", str(seed), *overrides])
            info = json.loads((output_dir / RUN_INFO_FILE).read_text())
            evaluation = evaluate(str(output_dir), None, work_dir / f"eval_{output_dir.name}.json", num_test_examples)
            results["runs"][(name, seed)] = {"info": info, "eval": evaluation}
    return results


def report(results: dict, seeds: list[int]) -> str:
    lines = [
        f"| model | Recall@1 | Recall@{K} | NDCG@{K} | well-formed lists | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("base", "warm start (SFT)"):
        row = results[name]
        lines.append(f"| {name} | {row['recall@1']:.3f} | {row[f'recall@{K}']:.3f} | {row[f'ndcg@{K}']:.3f} "
                     f"| {row['well_formed']:.3f} | - |")
    for name in CONFIGS:
        evals = [results["runs"][(name, seed)]["eval"] for seed in seeds]
        cells = []
        for key in ("recall@1", f"recall@{K}", f"ndcg@{K}", "well_formed"):
            values = [e[key] for e in evals]
            spread = " / ".join(f"{value:.3f}" for value in values)
            cells.append(f"{sum(values) / len(values):.3f} ({spread})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(map(str, seeds))} |")
    lines.append("")
    for label, metric in ((f"NDCG@{K}", ndcg_at_k), (f"Recall@{K}", recall_at_k)):
        differences = [
            [a - b for a, b in zip(per_request(results["runs"][("Rank-GRPO", seed)]["eval"], metric),
                                   per_request(results["runs"][("GRPO", seed)]["eval"], metric), strict=True)]
            for seed in seeds
        ]
        mean, low, high = paired_bootstrap(differences)
        lines.append(f"- {label}, Rank-GRPO − GRPO: {mean:+.3f} [{low:+.3f}, {high:+.3f}] (95% paired bootstrap over "
                     f"{len(differences[0])} requests × {len(seeds)} seeds)")
    runtimes = [results["runs"][(name, seed)]["info"]["train_metrics"].get("train_runtime")
                for name in CONFIGS for seed in seeds]
    if all(isinstance(value, (int, float)) for value in runtimes):
        lines.append(f"- training time per run: {min(runtimes):.0f}-{max(runtimes):.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_test_examples", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=None, help="override both configs' max_steps")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/rank_grpo_accuracy"))
    parser.add_argument("--output", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    table = report(run(args.seeds, args.num_test_examples, args.work_dir, args.max_steps), args.seeds)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
