"""Critical tokens on SmolLM2-135M-Instruct over several seeds: localization, the rollout test, and held-out accuracy
of base / warm start / DPO / cDPO / cDPO with shuffled weights, with a paired bootstrap interval of cDPO − DPO.

Each seed is one run of the benchmark's pipeline (``--config``: ``configs/critical_smollm2_full.yaml``, the
quickstart's with the full warm start, twice the questions and 8 DPO steps; run as ``tokenweave quickstart --seed N``
runs its own: sampling, the positive/negative models and the shuffle seeded with N; the warm start and the DPO runs
keep their config's seed). The warm start does not depend on the seed: it is trained once, in the first seed's
work dir, and copied into the others (same record, so their pipelines skip it). Evaluation is greedy on the same
held-out problems; base and warm start are evaluated once::

    python benchmarks/cdpo_accuracy.py --seeds 0 1 2 --num_test_examples 200 --output cdpo_accuracy.md

A seed's finished steps are reused when its work directory exists and was made from the same configs (otherwise
the pipeline stops and says what changed); evaluations are reused when their JSON file exists.

The interval: per test problem and seed, ``d = correct(cDPO) − correct(DPO)``; the statistic is the mean of ``d``
over problems and seeds; the bootstrap resamples problems (the same draw for every seed, so each problem's seeds
stay paired) 10 000 times, and the interval is the 2.5 and 97.5 percentiles of the resampled means.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenweave.inference.evaluate import evaluate_model
from tokenweave.pipelines.critical import REPORT_FILE, STATISTICS_FILE, run_critical_pipeline
from tokenweave.pipelines.quickstart import MAX_NEW_TOKENS, MODELS, REPO_ROOT, quickstart_config
from tokenweave.stats import difference_row

SHARED = ("base", "warm_start")  # evaluated once: they do not depend on the seed
PER_SEED = ("dpo", "cdpo", "cdpo_shuffled")


def evaluate(model_dir: str, output: Path, num_test_examples: int, difficulty: str) -> dict:
    """Greedy accuracy of ``model_dir`` (reused from ``output`` when it was written for as many problems)."""
    if output.exists():
        result = json.loads(output.read_text())
        if result["num_examples"] == num_test_examples:
            return result
    return evaluate_model(
        model_dir, difficulty=difficulty, num_examples=num_test_examples, max_new_tokens=MAX_NEW_TOKENS,
        output=str(output),
    )


def run(seeds: list[int], num_test_examples: int, work_dir: Path, config_file: Path) -> dict:
    """Every seed's pipeline and evaluations; returns the per-seed reports and the per-problem verdicts."""
    results = {"seeds": seeds, "num_test_examples": num_test_examples, "per_seed": {}, "verdicts": {}}
    first_warm_start = None
    for seed in seeds:
        config = quickstart_config(str(work_dir / f"seed{seed}"), seed, config_file)
        warm_start = Path(config.work_dir) / "warm_start"
        if first_warm_start is not None and not warm_start.exists():
            shutil.copytree(first_warm_start, warm_start)
        steps = run_critical_pipeline(config)
        first_warm_start = first_warm_start or steps["warm_start"]
        names = PER_SEED + (SHARED if seed == seeds[0] else ())
        for name in names:
            model = config.model if name == "base" else str(steps[name])
            result = evaluate(model, work_dir / f"eval_{name}_seed{seed}.json", num_test_examples, config.task_difficulty)
            key = name if name in SHARED else f"{name}/seed{seed}"
            results["verdicts"][key] = [sample["correct"] for sample in result["samples"]]
        results["per_seed"][seed] = {
            "statistics": json.loads((steps["pairs"] / STATISTICS_FILE).read_text()),
            "localization": json.loads((steps["localization"] / REPORT_FILE).read_text()),
            "rollout": {
                key: value
                for key, value in json.loads((steps["rollout"] / REPORT_FILE).read_text()).items()
                if key != "trajectories"
            },
        }
    return results


def _accuracy(verdicts: list[bool]) -> float:
    return sum(verdicts) / len(verdicts)


def report(results: dict) -> str:
    """Markdown: the evidence per seed, the accuracy table, and the bootstrap intervals."""
    seeds, verdicts, total = results["seeds"], results["verdicts"], results["num_test_examples"]
    per_seed = {int(seed): report_ for seed, report_ in results["per_seed"].items()}  # JSON keys are strings
    lines = [
        "| seed | correct samples | questions with both | own chosen | hit@1 (random) | hit@3 (random) | MRR (random) "
        "| readable | rollout: critical | rollout: random |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        report_ = per_seed[seed]
        samples, pairs = report_["statistics"]["samples"], report_["statistics"]["pairs"]
        local, rollout = report_["localization"], report_["rollout"]
        scores, chance = local["scores"], local["random"]
        lines.append(
            f"| {seed} | {samples['correct_share']:.0%} | {samples['with_both_share']:.0%} | "
            f"{pairs['own_chosen_share']:.0%} | {scores['hit@1']:.2f} ({chance['hit@1']:.2f}) | "
            f"{scores['hit@3']:.2f} ({chance['hit@3']:.2f}) | {scores['mrr']:.2f} ({chance['mrr']:.2f}) | "
            f"{local['num_readable']}/{local['num_trajectories']} | {rollout['critical_correct_share']:.1%} | "
            f"{rollout['random_correct_share']:.1%} |"
        )
    lines += ["", f"| model | {' | '.join(f'seed {seed}' for seed in seeds)} | mean |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for label, name in MODELS:
        name = name or "base"
        if name in SHARED:
            cells = [f"{_accuracy(verdicts[name]):.1%} ({sum(verdicts[name])}/{total})"] * len(seeds)
            mean = _accuracy(verdicts[name])
        else:
            per_seed = [verdicts[f"{name}/seed{seed}"] for seed in seeds]
            cells = [f"{_accuracy(row):.1%} ({sum(row)}/{total})" for row in per_seed]
            mean = sum(map(_accuracy, per_seed)) / len(seeds)
        lines.append(f"| {label} | {' | '.join(cells)} | {mean:.1%} |")
    lines += ["", "| difference | mean | 95% paired bootstrap interval |", "|---|---|---|"]
    for first, second in (("cdpo", "dpo"), ("cdpo", "cdpo_shuffled"), ("cdpo_shuffled", "dpo")):
        lines.append(difference_row(first, second, *([verdicts[f"{name}/seed{seed}"] for seed in seeds]
                                                     for name in (first, second))))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "critical_smollm2_full.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_test_examples", type=int, default=200)
    parser.add_argument("--work_dir", default="outputs/cdpo_accuracy")
    parser.add_argument("--output", default=None, help="Markdown file to write the tables to.")
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    results = run(args.seeds, args.num_test_examples, work_dir, Path(args.config))
    (work_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report(results)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
