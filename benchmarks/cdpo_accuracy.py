"""Base vs SFT vs DPO vs cDPO on SmolLM2-135M-Instruct and the arithmetic task, over several seeds.

Each seed is one run of the quickstart (:func:`tokenweave.pipelines.quickstart.run_quickstart`): the critical-token
pipeline of ``configs/critical_smollm2.yaml`` seeded with it (sampling and the positive/negative models; cDPO, and
plain DPO on the same pairs with the same config and budget), then greedy accuracy of the base model, the positive model (the SFT
baseline), DPO and cDPO on the same held-out test problems. Prints and writes a Markdown table::

    python benchmarks/cdpo_accuracy.py --seeds 0 1 2 --num_test_examples 100 --output benchmarks/cdpo_accuracy.md

A seed's finished pipeline steps are reused when its work directory exists (``--work_dir``) and was made from the
same configs; otherwise the pipeline stops and says what changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenweave.pipelines.quickstart import MODELS, run_quickstart


def report(results: dict[int, list[dict]]) -> str:
    """A Markdown table: one row per model, one column per seed, and the mean accuracy."""
    seeds = sorted(results)
    total = results[seeds[0]][0]["total"]
    lines = [
        f"| model | {' | '.join(f'seed {seed}' for seed in seeds)} | mean |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for index, (label, _) in enumerate(MODELS):
        accuracies = [results[seed][index]["accuracy"] for seed in seeds]
        cells = [f"{accuracy:.1%} ({results[seed][index]['correct']}/{total})"
                 for seed, accuracy in zip(seeds, accuracies, strict=True)]
        lines.append(f"| {label} | {' | '.join(cells)} | {sum(accuracies) / len(accuracies):.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num_test_examples", type=int, default=100)
    parser.add_argument("--work_dir", default="outputs/cdpo_accuracy")
    parser.add_argument("--output", default=None, help="Markdown file to write the table to.")
    args = parser.parse_args()
    results = {
        seed: run_quickstart(str(Path(args.work_dir) / f"seed{seed}"), seed=seed,
                             num_test_examples=args.num_test_examples)
        for seed in args.seeds
    }
    table = report(results)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
