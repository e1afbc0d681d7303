"""DAPO vs HAPO on SmolLM2-135M-Instruct and the arithmetic task: reward curves and held-out accuracy.

Each (policy loss, seed) pair is one LoRA run of ``configs/grpo_smollm2_lora.yaml`` with the same budget
(steps, prompts, generations, completion length), then greedy accuracy of the adapter on the task's test split.
Writes a Markdown report (per-step mean reward of every run, final accuracies) to ``--output``::

    python benchmarks/grpo_accuracy.py --steps 8 --seeds 0 1 --output benchmarks/grpo_accuracy.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenweave.evaluate import evaluate_model
from tokenweave.train import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "grpo_smollm2_lora.yaml"


def run(policy_loss: str, seed: int, args) -> dict:
    output_dir = Path(args.work_dir) / f"{policy_loss}_seed{seed}"
    info = train(
        [
            "--config", str(CONFIG), "--policy_loss", policy_loss, "--seed", str(seed),
            "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--num_generations", str(args.num_generations), "--max_completion_length", str(args.max_completion_length),
            "--learning_rate", str(args.learning_rate), "--output_dir", str(output_dir),
        ]
    )
    rewards = [entry["reward"] for entry in info["log_history"] if "reward" in entry]
    result = evaluate_model(str(output_dir), num_examples=args.num_test, max_new_tokens=64)
    return {"policy_loss": policy_loss, "seed": seed, "rewards": rewards, "accuracy": result["accuracy"],
            "correct": result["num_correct"], "total": result["num_examples"]}


def report(results: list[dict], base: dict, args) -> str:
    lines = [
        f"Budget per run: {args.steps} steps x {args.batch_size} completions ({args.num_generations} per prompt), "
        f"max {args.max_completion_length} new tokens, LoRA lr {args.learning_rate}; accuracy: greedy, "
        f"{args.num_test} held-out problems, 64 new tokens.",
        "",
        f"Base model accuracy: {base['accuracy']:.1%} ({base['num_correct']}/{base['num_examples']}).",
        "",
        "| policy loss | seed | mean reward per step | held-out accuracy |",
        "|---|---|---|---|",
    ]
    for r in results:
        curve = " ".join(f"{reward:.2f}" for reward in r["rewards"])
        lines.append(f"| {r['policy_loss']} | {r['seed']} | {curve} | {r['accuracy']:.1%} ({r['correct']}/{r['total']}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--losses", nargs="+", default=["dapo", "hapo"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=48)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--num_test", type=int, default=50)
    parser.add_argument("--work_dir", default="outputs/grpo_accuracy")
    parser.add_argument("--output", default="benchmarks/grpo_accuracy.md")
    args = parser.parse_args()
    base = evaluate_model("smollm2-135m", num_examples=args.num_test, max_new_tokens=64)
    results = [run(loss, seed, args) for seed in args.seeds for loss in args.losses]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.work_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.output).write_text(report(results, base, args))
    print(report(results, base, args))


if __name__ == "__main__":
    main()
