"""Token-weighted SFT on ``noisy_arithmetic`` with SmolLM2-135M-Instruct: does each method find the planted noise,
and does it beat plain SFT and its own random control on held-out accuracy?

The task: the arithmetic task's SFT rows with one planted error in 30 % of the train solutions (a wrong calculation
step carried on to a wrong answer, or a junk span; ``tokenweave/data/noisy_arithmetic.py``), so every noisy token is
known. The runs are the configs ``configs/sft_<method>_smollm2.yaml`` (LoRA SFT; they share everything but their
method keys, which this script checks), at the ``--budget``'s steps, rows and batch:

* ``plain``: ``sft_noisy_smollm2.yaml``, every label token weight 1;
* ``oracle``: ``sft_weights_smollm2.yaml``, a ``token_weights`` column with 0 exactly at the planted tokens
  (``oracle_weights_column``): what a perfect noise filter would give;
* ``dft``, ``eaft``, ``asft`` (weights), ``profit``, ``rho1``, ``sstoken``, ``token_cleaning`` (selections): the
  ``token_signals`` of ``TokenSFTTrainer``. ``rho1`` and ``token_cleaning`` score against a reference: a LoRA SFT of
  the base model on the task's ``clean`` split (``sft_reference_smollm2.yaml``, same recipe, steps and rows as the
  policy runs, merged), trained once; ``token_cleaning`` trains on the output of ``tokenweave score-tokens`` (base vs
  that reference, top 60 % over the dataset); ``asft``'s KL anchor is to the base (the policy with its adapter off);
* each method's random controls: ``<method> shuffle`` (``signal_control: shuffle``: each sequence's own weights on a
  random permutation of its label tokens, seeded by the run's seed and the row) and, for a selection, ``<method>
  inverse`` (the same count per sequence from the bottom of its ranking).

Parts (``--part``, any of them, in this order):

* ``noise``: on the noisy training rows, the weights ``TokenSFTTrainer.signal_weights`` puts on every label token
  with the base SmolLM2 policy (a fresh LoRA adapter, so the base) and, where the method has one, the reference:
  for each method and control, the share of planted tokens dropped (weight 0) and of clean tokens, the mean weight
  on planted and on clean tokens, and the AUROC of the weight against "not planted" (P(weight of a clean token >
  weight of a planted token), ties ½). Next to them the exact values of chance: AUROC 0.5 for a random ranking, and
  the exact expectation of the AUROC and of the dropped planted share when each row's weights are permuted at
  random over its tokens (the shuffle control's expectation: for a selection, each row drops as many tokens, at
  random). A ``global_batch`` selection (Rho-1) is scored per batch of ``per_device_train_batch_size`` rows, as in
  training. Rows ``full tokens`` (all 1) and ``oracle`` frame the table.
* ``accuracy``: every arm of the budget, for each ``--seeds`` seed (the run's ``seed``: LoRA initialisation, data
  order and the shuffle's permutations; the same for every arm of a seed, so the arms are paired), then greedy
  accuracy on the same ``test_problems`` held-out problems of the clean test split (the arithmetic task's test
  questions; 40 new tokens). Paired bootstrap intervals (``tokenweave.stats.paired_bootstrap``: problems resampled, the
  seeds of a problem kept together) of method − plain SFT, method − its shuffle control, method − its inverse, and
  control − plain.

Budgets (``--budget``; ``--steps``, ``--rows``, ``--test_problems``, ``--batch_size``, ``--arms`` override one):

* ``cpu`` (default; what RESULTS.md reports). Measured first, one run at a time with 1 torch thread on the 2 CPU
  cores this machine shares with other engineers' jobs: a LoRA step of 8 rows (~110 tokens each, ~90 of them the
  prompt) takes 11 s (Rho-1's, with the reference's forward, 15 s), of 4 rows 6 s; a held-out problem 0.4-0.7 s.
  All 20 arms × 5 seeds at the configs' 24 steps of 8 and 200 problems would take about 20 hours, so, to fit the
  part in about 75 minutes, cut in this order: steps (24 × 8 rows → 6 × 4: 24 of the 256 rows seen, about 7 of them
  noisy), test problems (200 → 40), then arms: kept ``plain``, ``oracle``, ``rho1`` + shuffle + inverse,
  ``token_cleaning`` + shuffle + inverse, ``profit`` + shuffle, ``eaft`` + shuffle, ``dft`` (13 arms × 5 seeds = 65
  runs of about 70 s); not trained: ``asft`` (+ shuffle), ``sstoken`` (+ shuffle, inverse), ``profit inverse``,
  ``dft shuffle`` (their noise-table rows are still measured). The reference, trained once, keeps the configs' 24
  steps of 8 clean rows.
* ``gpu``: every arm, 2048 rows, 150 steps of 16, 500 test problems (``use_cpu: false``): the same command on one
  GPU.
* ``tiny``: 2 steps of 4, 32 rows, 8 problems, every arm: a check that the script runs.

Commands (from the repository root; ``OMP_NUM_THREADS=1`` keeps torch from spinning against the other jobs on
the 2 shared cores)::

    OMP_NUM_THREADS=1 python benchmarks/sft_tokens.py --part noise accuracy --seeds 0 1 2 3 4 --output sft_tokens.md
    python benchmarks/sft_tokens.py --budget tiny --seeds 0 --output /tmp/sft_tokens_tiny.md   # check
    python benchmarks/sft_tokens.py --budget gpu --output sft_tokens_gpu.md                   # one GPU

Everything goes under ``--work_dir`` (default ``outputs/sft_tokens``) in a directory named after the budget's
settings: the reference, the scored and oracle datasets, each run and each evaluation are written atomically with
the settings they were made from (``tokenweave.pipelines.steps``) and reused when the command is run again with the
same settings (a changed setting stops with a message naming it, never silently reuses). ``results.json`` there
holds every number of the report, which goes to ``--output`` (Markdown) and the console.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from tokenweave.config import parse_run_config
from tokenweave.data.loading import load_run_dataset
from tokenweave.data.noisy_arithmetic import oracle_weights_column, planted_label_masks
from tokenweave.pipelines.steps import Step, run_steps
from tokenweave.stats import paired_bootstrap

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"

METHODS = ("dft", "eaft", "asft", "profit", "rho1", "sstoken", "token_cleaning")
SELECTIONS = ("profit", "rho1", "sstoken", "token_cleaning")
NEEDS_REFERENCE = ("rho1", "token_cleaning")
METHOD_KEY_PREFIXES = ("token_signals", "signal_control", "reference_model_path", "weights_column", "output_dir",
                       "dft_", "eaft_", "asft_", "profit_", "rho1_", "sstoken_", "token_cleaning_")
"""The keys a method config may set beyond the shared block (the others must equal sft_noisy_smollm2.yaml's)."""
MAX_NEW_TOKENS = 40
MINIMAL_ARMS = ("plain", "oracle", "rho1", "rho1 shuffle", "rho1 inverse", "token_cleaning", "token_cleaning shuffle",
                "token_cleaning inverse", "profit", "profit shuffle", "eaft", "eaft shuffle", "dft")
"""The arms the cpu budget keeps (the brief's order of what to keep when arms must be cut)."""


def all_arms() -> tuple[str, ...]:
    arms = ["plain", "oracle"]
    for method in METHODS:
        arms += [method, f"{method} shuffle"] + ([f"{method} inverse"] if method in SELECTIONS else [])
    return tuple(arms)


@dataclass(frozen=True)
class Budget:
    steps: int
    rows: int
    test_problems: int
    batch_size: int
    arms: tuple[str, ...]
    reference_steps: int
    reference_batch_size: int
    cut: str = ""
    """What was cut from the configs' settings, and why (printed with the report)."""
    extra: tuple[str, ...] = ()
    """More config flags for every run (the GPU budget's ``--use_cpu false``)."""

    def tag(self) -> str:
        return (f"rows{self.rows}_steps{self.steps}_batch{self.batch_size}_reference{self.reference_steps}"
                f"x{self.reference_batch_size}")


BUDGETS = {
    "cpu": Budget(
        steps=6, rows=256, test_problems=40, batch_size=4, arms=MINIMAL_ARMS, reference_steps=24,
        reference_batch_size=8,
        cut="Cut to fit about 75 minutes on the 2 shared CPU cores (measured with 1 torch thread while other jobs "
            "ran: a LoRA step of 8 rows 11 s, Rho-1's 15 s; of 4 rows 6 s; a held-out problem 0.4-0.7 s; 20 arms x 5 "
            "seeds at the configs' 24 steps of 8 and 200 problems would take about 20 h): steps 24 x 8 rows -> 6 x 4 "
            "(24 of the 256 rows seen), test problems 200 -> 40, then arms: asft (+ shuffle), sstoken (+ shuffle, "
            "inverse), profit inverse and dft shuffle not trained (their noise-table rows are measured). The "
            "reference, trained once, keeps the configs' 24 steps of 8 clean rows."),
    "gpu": Budget(steps=150, rows=2048, test_problems=500, batch_size=16, arms=all_arms(), reference_steps=150,
                  reference_batch_size=16, extra=("--use_cpu", "false")),
    "tiny": Budget(steps=2, rows=32, test_problems=8, batch_size=4, arms=all_arms(), reference_steps=2,
                   reference_batch_size=4),
}


# -- configs --------------------------------------------------------------------------------------------------------

def config_file(method: str | None) -> Path:
    """The config of an arm's method (None: plain SFT; "weights": the oracle)."""
    return CONFIGS / f"sft_{method or 'noisy'}_smollm2.yaml"


def check_shared_configs() -> None:
    """Every method config (and the plain one) sets the same shared keys to the same values; only its method keys
    (:data:`METHOD_KEY_PREFIXES`) differ. The reference differs in its split only."""
    def shared(path: Path) -> dict:
        config = yaml.safe_load(path.read_text())
        return {key: value for key, value in config.items() if not key.startswith(METHOD_KEY_PREFIXES)}

    plain = shared(config_file(None))
    for method in (*METHODS, "weights"):
        other = shared(config_file(method))
        if other != plain:
            differing = sorted(key for key in set(plain) | set(other) if plain.get(key) != other.get(key))
            raise ValueError(f"{config_file(method).name} differs from sft_noisy_smollm2.yaml beyond its method keys: "
                             f"{differing}")
    reference = shared(CONFIGS / "sft_reference_smollm2.yaml")
    differing = sorted(key for key in set(plain) | set(reference) if plain.get(key) != reference.get(key))
    if differing != ["dataset_train_split"]:
        raise ValueError(f"sft_reference_smollm2.yaml differs from sft_noisy_smollm2.yaml in {differing}, expected "
                         "only dataset_train_split.")


def arm_method(arm: str) -> tuple[str | None, str]:
    """``(config method or None, control)`` of an arm name (``"rho1 shuffle"`` -> ``("rho1", "shuffle")``)."""
    name, _, control = arm.partition(" ")
    method = {"plain": None, "oracle": "weights"}.get(name, name)
    return method, control or "none"


def run_argv(method: str | None, control: str, budget: Budget, seed: int, prepared: dict) -> list[str]:
    """The ``tokenweave train`` arguments of one run (no ``--output_dir``)."""
    argv = ["--config", str(config_file(method).relative_to(REPO_ROOT)), "--max_steps", str(budget.steps),
            "--num_train_examples", str(budget.rows), "--per_device_train_batch_size", str(budget.batch_size),
            "--per_device_eval_batch_size", str(budget.batch_size), "--seed", str(seed), "--logging_steps", "1",
            *budget.extra]
    if method in NEEDS_REFERENCE:
        argv += ["--reference_model_path", str(prepared["reference"])]
    if method == "token_cleaning":
        argv += ["--dataset_name", str(prepared["token_cleaning_data"])]
    if method == "weights":
        argv += ["--dataset_name", str(prepared["oracle_data"])]
    if control != "none":
        argv += ["--signal_control", control]
    return argv


def parse(argv: list[str], output_dir: Path):
    return parse_run_config([*argv, "--output_dir", str(output_dir)])


# -- shared inputs: the reference, TokenCleaning's scores, the oracle weights ----------------------------------------

def prepare(budget: Budget, work: Path, need: set[str]) -> dict:
    """The reference (merged LoRA SFT on the clean split), the score-tokens dataset and the oracle dataset, each built
    once per budget (reused when their settings match)."""
    from tokenweave.pipelines.evidence.sft import train_merged
    from tokenweave.pipelines.token_scores import score_tokens, sft_tokenizer

    prepared = {}
    base_argv = ["--max_steps", str(budget.steps), "--num_train_examples", str(budget.rows),
                 "--per_device_train_batch_size", str(budget.batch_size), "--seed", "0", *budget.extra]
    if need & {"reference", "token_cleaning_data"}:
        reference_argv = ["--config", "configs/sft_reference_smollm2.yaml", "--max_steps", str(budget.reference_steps),
                          "--num_train_examples", str(budget.rows), "--per_device_train_batch_size",
                          str(budget.reference_batch_size), "--seed", "0", *budget.extra]

        def build_reference(directory: Path) -> None:
            started = time.perf_counter()
            train_merged(reference_argv, directory)
            (directory / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))

        prepared["reference"] = run_steps(work, [Step("reference", {"argv": reference_argv}, build_reference)],
                                          "sft_tokens")["reference"]
    if "token_cleaning_data" in need:
        argv = ["--config", str(config_file("token_cleaning").relative_to(REPO_ROOT)), *base_argv,
                "--reference_model_path", str(prepared["reference"])]
        summary = score_tokens(*parse(argv, work / "unused"), work / "token_cleaning_data")
        prepared["token_cleaning_data"] = Path(summary["output"])
        prepared["token_cleaning_summary"] = {key: value for key, value in summary.items() if key != "quantiles"}
    if "oracle_data" in need:
        argv = ["--config", str(config_file(None).relative_to(REPO_ROOT)), *base_argv]

        def build_oracle(directory: Path) -> None:
            run_args, training_args, model_args = parse(argv, work / "unused")
            dataset = noisy_rows(run_args)
            oracle_weights_column(dataset, sft_tokenizer(training_args, model_args)).save_to_disk(str(directory))

        prepared["oracle_data"] = run_steps(work, [Step("oracle_data", {"argv": argv}, build_oracle)],
                                            "sft_tokens")["oracle_data"]
    return prepared


def noisy_rows(run_args):
    """The noisy train rows a run of these configs loads."""
    return load_run_dataset(run_args.dataset_name, run_args.dataset_train_split, "sft",
                            num_examples=run_args.num_train_examples, difficulty=run_args.task_difficulty,
                            seed=run_args.task_seed, noise_share=run_args.task_noise_share,
                            noise_kinds=run_args.task_noise_kinds)


# -- part (a): the weights against the planted tokens ---------------------------------------------------------------

def planted_masks(budget: Budget, work: Path):
    """Per noisy train row: 1/0 per label token (planted or not), and its token ids (to check the trainer's rows)."""
    from tokenweave.pipelines.token_scores import sft_tokenizer

    run_args, training_args, model_args = parse(run_argv(None, "none", budget, 0, {}), work / "unused")
    masks, ids = planted_label_masks(noisy_rows(run_args), sft_tokenizer(training_args, model_args))
    return [np.array(mask, dtype=bool) for mask in masks], ids


def method_weights(method: str, controls: list[str], budget: Budget, prepared: dict, ids: list, work: Path) -> dict:
    """``{control: [weights of each row's label tokens]}`` from ``signal_weights`` of a trainer of ``method``'s
    config at the base policy (built with the shuffle control on, so that each row carries its identity; the control
    is then set for each pass), batches of ``batch_size`` rows in dataset order."""
    from tokenweave.pipelines.evidence.sft import label_token_weights
    from tokenweave.train import build_trainer

    trainer = build_trainer(*parse(run_argv(method, "shuffle", budget, 0, prepared), work / "noise_trainer"))
    results = label_token_weights(trainer, ids, budget.batch_size, controls)
    del trainer
    gc.collect()
    return results


def auroc(clean: np.ndarray, planted: np.ndarray) -> float:
    """P(a clean token's weight > a planted token's) + ½ P(equal), over all pairs."""
    ordered = np.sort(planted)
    below = np.searchsorted(ordered, clean, side="left")
    equal = np.searchsorted(ordered, clean, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(clean) * len(planted)))


def shuffled_expectations(weights: list[np.ndarray], masks: list[np.ndarray]) -> tuple[float, float]:
    """The exact expected AUROC and dropped planted share when each row's weights are permuted uniformly over its
    tokens (the shuffle control). AUROC: a pair in one row counts ½; a clean token of row r against a planted token
    of row s, the mean over the two rows' weights of [w_r > w_s] + ½[w_r = w_s]. Dropped share: each row drops
    its planted tokens in proportion to its zeros (hypergeometric mean)."""
    all_weights = np.concatenate(weights)
    row_of = np.repeat(np.arange(len(weights)), [len(w) for w in weights])
    clean_counts = np.array([(~m).sum() for m in masks], dtype=float)
    planted_counts = np.array([m.sum() for m in masks], dtype=float)
    total = 0.0
    for s in np.flatnonzero(planted_counts):
        ordered = np.sort(weights[s])
        below = np.searchsorted(ordered, all_weights, side="left")
        equal = np.searchsorted(ordered, all_weights, side="right") - below
        per_token = (below + 0.5 * equal) / len(ordered)  # P(w_a > W_s) + ½ P(=) for every token a
        per_row = np.bincount(row_of, weights=per_token, minlength=len(weights)) / np.maximum(
            [len(w) for w in weights], 1)
        per_row[s] = 0.5
        total += planted_counts[s] * float((clean_counts * per_row).sum())
    expected_auroc = total / (clean_counts.sum() * planted_counts.sum())
    zeros = np.array([(w == 0).sum() for w in weights], dtype=float)
    lengths = np.array([len(w) for w in weights], dtype=float)
    expected_dropped = float((planted_counts * zeros / np.maximum(lengths, 1)).sum() / planted_counts.sum())
    return expected_auroc, expected_dropped


def noise_row(name: str, weights: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    flat, planted = np.concatenate(weights), np.concatenate(masks)
    expected_auroc, expected_dropped = shuffled_expectations(weights, masks)
    return {"arm": name, "planted_dropped": float((flat[planted] == 0).mean()),
            "clean_dropped": float((flat[~planted] == 0).mean()), "random_planted_dropped": expected_dropped,
            "planted_mean": float(flat[planted].mean()), "clean_mean": float(flat[~planted].mean()),
            "auroc": auroc(flat[~planted], flat[planted]), "shuffle_expected_auroc": expected_auroc}


def noise_part(budget: Budget, work: Path, prepared: dict) -> dict:
    """The noise table's rows; each method's weights are a step of their own (``noise/<method>``: reused when the
    command is run again with the same settings, so an interrupted part resumes)."""
    masks, ids = planted_masks(budget, work)
    rows = [noise_row("full tokens", [np.ones(len(m)) for m in masks], masks)]
    seconds = 0.0
    for method in ("weights", *METHODS):
        controls = ["none", "shuffle"] + (["inverse"] if method in SELECTIONS else [])

        def build(directory: Path, method=method, controls=controls) -> None:
            started = time.perf_counter()
            weights = method_weights(method, controls, budget, prepared, ids, work)
            directory.mkdir(parents=True)
            np.savez(directory / "weights.npz", lengths=[len(row) for row in weights["none"]],
                     **{control: np.concatenate(weights[control]) for control in controls})
            (directory / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
            print(f"noise: {method} done in {time.perf_counter() - started:.0f} s", flush=True)

        record = {"argv": run_argv(method, "shuffle", budget, 0, prepared), "controls": controls}
        directory = run_steps(work / "noise", [Step(method, record, build)], "sft_tokens")[method]
        saved = np.load(directory / "weights.npz")
        method_seconds = json.loads((directory / "seconds.json").read_text())["seconds"]
        seconds += method_seconds
        for control in controls:
            weights = np.split(saved[control], np.cumsum(saved["lengths"])[:-1])
            name = ("oracle" if method == "weights" else method) + ("" if control == "none" else f" {control}")
            rows.append(noise_row(name, weights, masks) | {"seconds": method_seconds})
    planted = np.concatenate(masks)
    return {"rows": rows, "num_rows": len(masks), "noisy_rows": int(sum(m.any() for m in masks)),
            "label_tokens": len(planted), "planted_tokens": int(planted.sum()), "seconds": seconds}


def noise_report(noise: dict) -> str:
    lines = [(f"{noise['num_rows']} noisy_arithmetic train rows ({noise['noisy_rows']} with a planted error), "
              f"{noise['label_tokens']} label tokens, {noise['planted_tokens']} planted "
              f"({noise['planted_tokens'] / noise['label_tokens']:.1%}); weights of `signal_weights` at the base "
              f"policy; {noise['seconds'] / 60:.0f} min."), "",
             ("| weights | planted dropped (random: same count per row) | clean dropped | mean weight planted / clean "
              "| AUROC clean > planted (shuffle's exact expectation; random ranking 0.5) |"),
             "|---|---|---|---|---|"]
    for row in noise["rows"]:
        lines.append(f"| {row['arm']} | {row['planted_dropped']:.1%} ({row['random_planted_dropped']:.1%}) | "
                     f"{row['clean_dropped']:.1%} | {row['planted_mean']:.3f} / {row['clean_mean']:.3f} | "
                     f"{row['auroc']:.3f} ({row['shuffle_expected_auroc']:.3f}) |")
    return "\n".join(lines)


# -- part (b): held-out accuracy ------------------------------------------------------------------------------------

def evaluate(model: str, budget: Budget, device: torch.device) -> dict:
    """Greedy accuracy of ``model`` (a directory or a built-in name) on the first ``test_problems`` problems of the
    clean test split (the arithmetic task's test questions), as ``tokenweave eval`` computes it, on ``device``."""
    from tokenweave.inference.evaluate import evaluate_accuracy
    from tokenweave.inference.loading import load_model_and_tokenizer

    dataset = load_run_dataset("arithmetic", "test", "grpo", num_examples=budget.test_problems)
    loaded, tokenizer = load_model_and_tokenizer(model)
    result = evaluate_accuracy(loaded.to(device), tokenizer, dataset, batch_size=32, max_new_tokens=MAX_NEW_TOKENS,
                               desc=f"eval {Path(model).name}")
    del loaded
    return result


def evaluated(name: str, model: str, record: dict, budget: Budget, work: Path, device: torch.device) -> dict:
    """:func:`evaluate`'s result for ``model``, computed once for ``record`` (then reused), with its seconds."""
    def build(directory: Path) -> None:
        started = time.perf_counter()
        result = evaluate(model, budget, device)
        directory.mkdir(parents=True)
        (directory / "eval.json").write_text(json.dumps(result | {"seconds": time.perf_counter() - started}))
        gc.collect()

    step = f"{name}_n{budget.test_problems}"
    record = record | {"test_problems": budget.test_problems, "max_new_tokens": MAX_NEW_TOKENS}
    return json.loads((run_steps(work / "evals", [Step(step, record, build)], "sft_tokens")[step] / "eval.json")
                      .read_text())


def run_arm(arm: str, seed: int, budget: Budget, work: Path, prepared: dict, device: torch.device) -> dict:
    """Train one arm for one seed (reused when done with the same settings) and evaluate it (reused likewise)."""
    from tokenweave.train import train_from_args

    method, control = arm_method(arm)
    argv = run_argv(method, control, budget, seed, prepared)
    name = f"{arm.replace(' ', '_')}_seed{seed}"

    def build(directory: Path) -> None:
        started = time.perf_counter()
        info = train_from_args(*parse(argv, directory))
        (directory / "bench.json").write_text(json.dumps(
            {"train_seconds": time.perf_counter() - started,
             "train_runtime": info["train_metrics"].get("train_runtime")}))
        gc.collect()

    run_dir = run_steps(work / "runs", [Step(name, {"argv": argv}, build)], "sft_tokens")[name]
    result = evaluated(name, str(run_dir), {"argv": argv}, budget, work, device)
    timing = json.loads((run_dir / "bench.json").read_text())
    return {"arm": arm, "seed": seed, "correct": [bool(sample["correct"]) for sample in result["samples"]],
            "accuracy": result["accuracy"], "train_seconds": timing["train_seconds"], "eval_seconds": result["seconds"],
            "argv": argv}


def accuracy_part(budget: Budget, seeds: list[int], work: Path, prepared: dict, device: torch.device) -> dict:
    from tokenweave.models import SMOLLM2_135M

    started = time.perf_counter()
    context = {"base": evaluated("base", SMOLLM2_135M, {"model": SMOLLM2_135M}, budget, work, device)}
    if "reference" in prepared:
        context["reference"] = evaluated("reference", str(prepared["reference"]), {"model": "reference"}, budget,
                                         work, device)
    runs = []
    for seed in seeds:  # seed by seed: a partial run already has paired arms
        for arm in budget.arms:
            run_started = time.perf_counter()
            runs.append(run_arm(arm, seed, budget, work, prepared, device))
            print(f"accuracy: {arm} seed {seed}: {runs[-1]['accuracy']:.1%} "
                  f"({time.perf_counter() - run_started:.0f} s)", flush=True)
    return {"runs": runs, "context": {name: {"accuracy": result["accuracy"], "correct": result["num_correct"],
                                             "total": result["num_examples"]} for name, result in context.items()},
            "seconds": time.perf_counter() - started}


def comparisons(arms: tuple[str, ...]) -> list[tuple[str, str]]:
    """The differences the report gives: each method − plain, − its shuffle, − its inverse; each control − plain."""
    pairs = [("oracle", "plain")] if {"oracle", "plain"} <= set(arms) else []
    for method in METHODS:
        if method not in arms:
            continue
        for other in ("plain", f"{method} shuffle", f"{method} inverse"):
            if other in arms:
                pairs.append((method, other))
        for control in (f"{method} shuffle", f"{method} inverse"):
            if control in arms and "plain" in arms:
                pairs.append((control, "plain"))
    return pairs


def accuracy_report(accuracy: dict, budget: Budget, seeds: list[int]) -> str:
    runs = {(run["arm"], run["seed"]): run for run in accuracy["runs"]}
    arms = [arm for arm in budget.arms if all((arm, seed) in runs for seed in seeds)]
    total = budget.test_problems
    context = ", ".join(f"{name} {value['accuracy']:.1%} ({value['correct']}/{value['total']})"
                        for name, value in accuracy.get("context", {}).items())
    lines = [(f"Greedy accuracy on {total} held-out problems ({MAX_NEW_TOKENS} new tokens). Not trained here: "
              f"{context}."), "",
             f"| arm | mean | {' | '.join(f'seed {seed}' for seed in seeds)} | train s (median) |",
             "|---|---|" + "---|" * len(seeds) + "---|"]
    for arm in arms:
        accuracies = [runs[arm, seed]["accuracy"] for seed in seeds]
        seconds = float(np.median([runs[arm, seed]["train_seconds"] for seed in seeds]))
        lines.append(f"| {arm} | {np.mean(accuracies):.1%} | "
                     + " | ".join(f"{a:.1%}" for a in accuracies) + f" | {seconds:.0f} |")
    lines += ["", f"| difference | mean | 95% paired bootstrap interval ({total} problems × {len(seeds)} seeds) |",
              "|---|---|---|"]
    for first, second in comparisons(tuple(arms)):
        differences = [[float(a) - float(b) for a, b in zip(runs[first, seed]["correct"], runs[second, seed]["correct"],
                                                            strict=True)] for seed in seeds]
        mean, low, high = (round(value, 9) + 0.0 for value in paired_bootstrap(differences))
        mark = " *" if low > 0 or high < 0 else ""
        lines.append(f"| {first} − {second} | {mean:+.1%} | [{low:+.1%}, {high:+.1%}]{mark} |")
    lines += ["", "(*: the interval excludes 0.)"]
    return "\n".join(lines)


def save_results(path: Path, results: dict, part: str) -> None:
    """Write ``results`` (its settings and ``part``) into ``path``, keeping the other part's numbers that another run
    of the script (the other ``--part``, in its own process) wrote there."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved |= {key: value for key, value in results.items() if key not in ("noise", "accuracy")}
    saved[part] = results[part]
    saved.setdefault("commands", {})[part] = results["command"]
    path.write_text(json.dumps(saved, indent=1, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", choices=["noise", "accuracy"], default=["noise", "accuracy"])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, help="Optimizer steps of every run (the budget's by default).")
    parser.add_argument("--rows", type=int, help="Noisy train rows (and clean rows of the reference).")
    parser.add_argument("--test_problems", type=int, help="Held-out problems of the accuracy part.")
    parser.add_argument("--batch_size", type=int, help="Rows per optimizer step.")
    parser.add_argument("--arms", nargs="+", help=f"Arms of the accuracy part (all: {', '.join(all_arms())}; a "
                        "two-word arm quoted).")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's).")
    parser.add_argument("--work_dir", default="outputs/sft_tokens")
    parser.add_argument("--output", default=None, help="Markdown file for the report.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    overrides = {key: getattr(args, key) for key in ("steps", "rows", "test_problems", "batch_size")
                 if getattr(args, key) is not None}
    if args.arms:
        unknown = sorted(set(args.arms) - set(all_arms()))
        if unknown:
            parser.error(f"unknown arms {unknown}; choose from {list(all_arms())}")
        overrides["arms"] = tuple(args.arms)
    if overrides:
        budget = replace(budget, cut=budget.cut + f" Overridden on the command line: {sorted(overrides)}.",
                         **overrides)
    check_shared_configs()
    work = Path(args.work_dir).absolute() / budget.tag()
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if "--use_cpu" in budget.extra and torch.cuda.is_available() else "cpu")
    need = set()
    if "noise" in args.part:
        need |= {"reference", "token_cleaning_data", "oracle_data"}
    if "accuracy" in args.part:
        methods = {arm_method(arm)[0] for arm in budget.arms}
        need |= ({"reference"} if methods & set(NEEDS_REFERENCE) else set())
        need |= ({"token_cleaning_data"} if "token_cleaning" in methods else set())
        need |= ({"oracle_data"} if "weights" in methods else set())
    prepared = prepare(budget, work, need)
    results_path = work / "results.json"
    results = {"budget": asdict(budget), "budget_name": args.budget, "seeds": args.seeds,
               "command": "python " + shlex.join(sys.argv), "device": str(device), "threads": torch.get_num_threads(),
               "prepared": {key: str(value) if isinstance(value, Path) else value for key, value in prepared.items()}}
    reference_seconds = work / "reference" / "seconds.json"
    if reference_seconds.exists():
        results["reference_seconds"] = json.loads(reference_seconds.read_text())["seconds"]
    if "noise" in args.part:
        results["noise"] = noise_part(budget, work, prepared)
        save_results(results_path, results, "noise")
    if "accuracy" in args.part:
        results["accuracy"] = accuracy_part(budget, args.seeds, work, prepared, device)
        save_results(results_path, results, "accuracy")

    settings = (f"Budget `{args.budget}`: {budget.steps} steps of {budget.batch_size} rows, {budget.rows} noisy train "
                f"rows (the reference: as many clean rows, as many steps), {budget.test_problems} held-out problems, "
                f"seeds {args.seeds}, device {device}, {torch.get_num_threads()} torch thread(s). "
                + (budget.cut or ""))
    sections = [settings]
    if "token_cleaning_summary" in prepared:
        summary = prepared["token_cleaning_summary"]
        sections.append(f"score-tokens: {summary['tokens']} label tokens, kept {summary['kept']} "
                        f"({summary['kept_share']:.1%}).")
    if "noise" in results and "noise" in args.part:
        sections += ["### Noise: the weights against the planted tokens", noise_report(results["noise"])]
    if "accuracy" in args.part:
        cut_arms = [arm for arm in all_arms() if arm not in budget.arms]
        sections += ["### Held-out accuracy", accuracy_report(results["accuracy"], budget, args.seeds)]
        if cut_arms:
            sections.append(f"Arms not trained in this budget: {', '.join(cut_arms)}.")
        sections.append(f"Wall time of the accuracy part: {results['accuracy']['seconds'] / 60:.0f} min.")
    report = "\n\n".join(sections) + "\n"
    print(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
