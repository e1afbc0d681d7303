"""Token-level preference methods on SmolLM2-135M-Instruct over paired seeds: held-out accuracy of DPO, cDPO, TGDPO,
T-REG, AlignDistil and each weighting method's shuffled control, with paired bootstrap intervals.

::

    python benchmarks/preference_tokens.py --seeds 0 1 2 3 4 --num_test_examples 200 --output preference_tokens.md
    python benchmarks/preference_tokens.py --seeds 0 --num_test_examples 8 --config configs/critical_smollm2.yaml \
        --work_dir outputs/preference_tokens_check          # a quick check of the plumbing

Each seed is one run of the critical-token pipeline (``--config``, as ``benchmarks/cdpo_accuracy.py`` runs it: the
warm start, the seed's own sampled pairs with critical-token scores, then DPO, cDPO and cDPO with shuffled weights from
the warm start, each ``critical_cdpo_smollm2_full.yaml``'s run), then, on the same pairs, from the same warm start and
with the same run config (only the loss and its inputs differ):

- **TGDPO**: the token rewards r̂_t = log π_DPO − log π_warm of the seed's own DPO model (the "reward model": a DPO
  model trained on these pairs, as the paper's), written by ``tokenweave token-rewards``; ``loss_type: tgdpo``, and
  the same with ``signal_control: shuffle`` (each completion's rewards on random tokens of it);
- **T-REG**: the warm start's self-contrastive token rewards under the two revision prompts (``tokenweave
  token-rewards``); ``loss_type: treg``, and shuffled;
- **AlignDistil**: the teachers are the seed's DPO model and a reverse-DPO model (the same DPO run on the pairs with
  chosen and rejected swapped), both merged into the warm start; ``loss_type: aligndistil`` (no per-token weight to
  shuffle: compared with DPO and cDPO only).

Every model is evaluated greedily on the same held-out problems (as ``cdpo_accuracy.py``). The interval of a
difference A − B: per test problem and seed ``d = correct(A) − correct(B)``; the statistic is the mean of ``d`` over
problems and seeds; the bootstrap resamples problems (the same draw for every seed, so each problem's seeds stay
paired), 10 000 times, 2.5 and 97.5 percentiles. Finished steps are reused when the work directory holds them for the
same settings (:mod:`tokenweave.pipelines.steps`); evaluations are reused when their JSON file exists.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cdpo_accuracy import evaluate

from tokenweave.inference.loading import save_merged_model
from tokenweave.pipelines.critical import run_critical_pipeline, training_runs
from tokenweave.pipelines.quickstart import REPO_ROOT, quickstart_config
from tokenweave.pipelines.steps import Step, run_steps
from tokenweave.pipelines.token_rewards import pairs_rewards_step
from tokenweave.stats import difference_row

PIPELINE_ARMS = ("dpo", "cdpo", "cdpo_shuffled")
ARMS = (*PIPELINE_ARMS, "tgdpo", "tgdpo_shuffled", "treg", "treg_shuffled", "aligndistil")
SHARED = ("warm_start",)  # evaluated once: it does not depend on the seed
LABELS = {"warm_start": "warm start (SFT)", "dpo": "DPO", "cdpo": "cDPO", "cdpo_shuffled": "cDPO, shuffled weights",
          "tgdpo": "TGDPO", "tgdpo_shuffled": "TGDPO, shuffled rewards", "treg": "T-REG",
          "treg_shuffled": "T-REG, shuffled rewards", "aligndistil": "AlignDistil"}
# (A, B) of each reported difference A − B
COMPARISONS = (("cdpo", "dpo"), ("cdpo", "cdpo_shuffled"), ("tgdpo", "dpo"), ("tgdpo", "cdpo"),
               ("tgdpo", "tgdpo_shuffled"), ("treg", "dpo"), ("treg", "cdpo"), ("treg", "treg_shuffled"),
               ("aligndistil", "dpo"), ("aligndistil", "cdpo"))


def swapped_pairs(pairs: Path, directory: Path) -> None:
    """The pairs with chosen and rejected swapped (the reverse-DPO model's data), saved to ``directory``."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(pairs))
    dataset = dataset.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    dataset.select_columns(["prompt", "chosen", "rejected"]).save_to_disk(str(directory))


def seed_arms(seed: int, work_dir: Path, config_file: Path, first_warm_start: Path | None) -> dict[str, Path]:
    """Every arm's trained model of one seed (module docstring), each step reused when done."""
    config = quickstart_config(str(work_dir / f"seed{seed}"), seed, config_file)
    warm_start = Path(config.work_dir) / "warm_start"
    if first_warm_start is not None and not warm_start.exists():  # the warm start does not depend on the seed
        shutil.copytree(first_warm_start, warm_start)
    steps = run_critical_pipeline(config)
    runs = training_runs(config)
    warm, pairs = str(steps["warm_start"]), steps["pairs"]
    root = Path(config.work_dir) / "preference_tokens"
    plain = {"token_signals": None, "signal_control": "none"}
    variants = {
        "tgdpo": runs["cdpo"].variant(loss_type="tgdpo", **plain),
        "treg": runs["cdpo"].variant(loss_type="treg", **plain),
    }
    variants |= {f"{name}_shuffled": run.variant(signal_control="shuffle", signal_control_seed=seed)
                 for name, run in list(variants.items())}

    def train_step(name: str, run, dataset: Path) -> Step:
        return Step(name, {"run": run.record, "model": warm, "dataset": str(dataset)},
                    lambda directory: run.train(warm, dataset, directory))

    steps_list = [pairs_rewards_step("tgdpo", variants["tgdpo"], warm, pairs, steps["dpo"]),
                  pairs_rewards_step("treg", variants["treg"], warm, pairs, None),
                  Step("swapped_pairs", {"pairs": str(pairs)}, lambda directory: swapped_pairs(pairs, directory))]
    done = run_steps(root, steps_list, "preference_tokens")
    training = [train_step(name, variants[name], done[f"{name.removesuffix('_shuffled')}_rewards"])
                for name in ("tgdpo", "tgdpo_shuffled", "treg", "treg_shuffled")]
    training.append(train_step("reverse_dpo", runs["dpo"], done["swapped_pairs"]))
    done |= run_steps(root, training, "preference_tokens")
    teachers = run_steps(root, [
        Step("dpo_merged", {"adapter": str(steps["dpo"])}, lambda d: save_merged_model(str(steps["dpo"]), str(d))),
        Step("reverse_dpo_merged", {"adapter": str(done["reverse_dpo"])},
             lambda d: save_merged_model(str(done["reverse_dpo"]), str(d))),
    ], "preference_tokens")
    distil = runs["cdpo"].variant(loss_type="aligndistil", aligndistil_teacher_model_path=str(teachers["dpo_merged"]),
                                  aligndistil_reverse_model_path=str(teachers["reverse_dpo_merged"]), **plain)
    done |= run_steps(root, [train_step("aligndistil", distil, pairs)], "preference_tokens")
    return {"warm_start": steps["warm_start"], **{name: steps[name] for name in PIPELINE_ARMS},
            **{name: done[name] for name in ARMS if name not in PIPELINE_ARMS}}


def run(seeds: list[int], num_test_examples: int, work_dir: Path, config_file: Path) -> dict:
    """Every seed's arms and their evaluations; returns the per-problem verdicts."""
    results = {"seeds": seeds, "num_test_examples": num_test_examples, "verdicts": {}}
    first_warm_start = None
    for seed in seeds:
        arms = seed_arms(seed, work_dir, config_file, first_warm_start)
        first_warm_start = first_warm_start or arms["warm_start"]
        difficulty = quickstart_config(str(work_dir / f"seed{seed}"), seed, config_file).task_difficulty
        for name in ARMS + (SHARED if seed == seeds[0] else ()):
            result = evaluate(str(arms[name]), work_dir / f"eval_{name}_seed{seed}.json", num_test_examples,
                              difficulty)
            key = name if name in SHARED else f"{name}/seed{seed}"
            results["verdicts"][key] = [sample["correct"] for sample in result["samples"]]
    return results


def report(results: dict) -> str:
    """Markdown: accuracy per arm and seed, and each comparison's mean difference with its interval."""
    seeds, verdicts, total = results["seeds"], results["verdicts"], results["num_test_examples"]
    lines = [f"| model | {' | '.join(f'seed {seed}' for seed in seeds)} | mean |", "|---|" + "---|" * (len(seeds) + 1)]
    for name in SHARED + ARMS:
        rows = [verdicts[name]] * len(seeds) if name in SHARED else [verdicts[f"{name}/seed{seed}"] for seed in seeds]
        cells = [f"{sum(row) / total:.1%} ({sum(row)}/{total})" for row in rows]
        lines.append(f"| {LABELS[name]} | {' | '.join(cells)} | {sum(sum(row) / total for row in rows) / len(rows):.1%} |")
    lines += ["", "| difference | mean | 95% paired bootstrap interval |", "|---|---|---|"]
    for first, second in COMPARISONS:
        lines.append(difference_row(first, second, *([verdicts[f"{name}/seed{seed}"] for seed in seeds]
                                                     for name in (first, second))))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "critical_smollm2_full.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--num_test_examples", type=int, default=200)
    parser.add_argument("--work_dir", default="outputs/preference_tokens")
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
