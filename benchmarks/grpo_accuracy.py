"""DAPO vs HAPO on SmolLM2-135M-Instruct and the arithmetic task: reward curves and held-out accuracy.

Optionally warm-started (``--warm_start_steps N``): a LoRA SFT run of ``configs/sft_smollm2_lora.yaml`` for N steps,
merged into the base model, is the starting model of every GRPO run (the base model alone is too rarely rewarded
for a small budget to move it). Each (policy loss, seed) pair is then one LoRA run of
``configs/grpo_smollm2_lora.yaml`` from the starting model with the same budget (steps, prompts, generations,
completion length, updates per generation), then greedy accuracy of the adapter on the task's test split. Writes a
Markdown report (mean reward of each generation batch of every run, final accuracies) to ``--output``::

    python benchmarks/grpo_accuracy.py --warm_start_steps 12 --steps 16 --seeds 0 1 --output grpo_accuracy.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenweave.inference.evaluate import evaluate_model
from tokenweave.inference.loading import load_model_and_tokenizer
from tokenweave.models import SMOLLM2_135M
from tokenweave.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG = CONFIGS / "grpo_smollm2_lora.yaml"
WARM_START_CONFIG = CONFIGS / "sft_smollm2_lora.yaml"


def warm_start(args) -> str:
    """LoRA SFT for ``args.warm_start_steps`` steps, merged into SmolLM2: the directory of the starting model."""
    adapter_dir, merged_dir = Path(args.work_dir) / "sft_lora", Path(args.work_dir) / "sft_merged"
    train(["--config", str(WARM_START_CONFIG), "--max_steps", str(args.warm_start_steps),
           "--output_dir", str(adapter_dir)])
    model, tokenizer = load_model_and_tokenizer(str(adapter_dir))
    model.merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return str(merged_dir)


def run(policy_loss: str, seed: int, start_model: str, args) -> dict:
    output_dir = Path(args.work_dir) / f"{policy_loss}_seed{seed}"
    info = train(
        [
            "--config", str(CONFIG), "--model_name_or_path", start_model, "--policy_loss", policy_loss,
            "--seed", str(seed), "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--steps_per_generation", str(args.steps_per_generation), "--num_generations", str(args.num_generations),
            "--max_completion_length", str(args.max_completion_length), "--learning_rate", str(args.learning_rate),
            "--output_dir", str(output_dir),
        ]
    )  # fmt: skip
    rewards = [entry["reward"] for entry in info["log_history"] if "reward" in entry]
    result = evaluate_model(str(output_dir), num_examples=args.num_test, max_new_tokens=64)
    return {"policy_loss": policy_loss, "seed": seed, "rewards": rewards, "accuracy": result["accuracy"],
            "correct": result["num_correct"], "total": result["num_examples"]}


def report(results: list[dict], base: dict, start_name: str, args) -> str:
    lines = [
        f"Budget per run: {args.steps} steps x {args.batch_size} completions ({args.num_generations} per prompt), "
        f"{args.steps_per_generation} updates per generation, max {args.max_completion_length} new tokens, LoRA lr "
        f"{args.learning_rate}; accuracy: greedy, {args.num_test} held-out problems, 64 new tokens.",
        "",
        f"Starting model ({start_name}) accuracy: {base['accuracy']:.1%} ({base['num_correct']}/{base['num_examples']}).",
        "",
        "| policy loss | seed | mean reward of each generation batch | held-out accuracy |",
        "|---|---|---|---|",
    ]
    for r in results:
        curve = " ".join(f"{reward:.2f}" for reward in r["rewards"])
        lines.append(f"| {r['policy_loss']} | {r['seed']} | {curve} | {r['accuracy']:.1%} ({r['correct']}/{r['total']}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm_start_steps", type=int, default=0, help="LoRA SFT steps before GRPO (0: none).")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--steps_per_generation", type=int, default=1, help="Optimizer updates per generation.")
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
    start_model = warm_start(args) if args.warm_start_steps > 0 else SMOLLM2_135M
    start_name = f"SmolLM2 + {args.warm_start_steps} LoRA SFT steps" if args.warm_start_steps > 0 else "SmolLM2"
    base = evaluate_model(start_model, num_examples=args.num_test, max_new_tokens=64)
    results = [run(loss, seed, start_model, args) for seed in args.seeds for loss in args.losses]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.work_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.output).write_text(report(results, base, start_name, args))
    print(report(results, base, start_name, args))


if __name__ == "__main__":
    main()
