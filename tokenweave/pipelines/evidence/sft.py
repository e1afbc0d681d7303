"""The SFT family's token signals against the planted noise of ``noisy_arithmetic``: are a row's lowest-weighted
label tokens its planted ones?

``noisy_arithmetic`` plants one error (a wrong calculation step carried on, or a junk span) in 30 % of its train
solutions and knows every planted token (:func:`tokenweave.data.noisy_arithmetic.planted_label_masks`). The selections
(Rho-1, TokenCleaning, ProFit) drop the tokens they rank low, and the weights (DFT, EAFT) shrink them: a noise filter
ranks the planted tokens lowest. For each seed, on the first ``Budget.sft_rows`` train rows of the task drawn with
``task_seed = seed``, each signal's weights are those :meth:`tokenweave.trainers.sft.TokenSFTTrainer.signal_weights`
puts on the label tokens at the start of a run (:func:`label_token_weights`): the policy is the base model itself
(``use_peft: false``, untrained), batches of the config's ``per_device_train_batch_size`` rows in dataset order (the
scope of Rho-1's ``global_batch`` selection, as one step). On each row with at least one planted label token (the
unit; ``m`` planted of its ``n`` label tokens), the measurement is the R-precision (:func:`r_precision`)::

    |planted ∩ the m lowest-weighted label tokens| / m

next to its exact expectation for a random ranking of the same tokens, ``m / n``. Equal weights (a selection's
kept tokens and its dropped ones) are ordered by a uniformly random permutation of the row's tokens drawn with
:func:`tokenweave.tokens.controls.row_generator` ``(seed, row)`` (``row``: the row's index in the seed's task), the
same for every signal of the row. At an untrained policy, Rho-1's excess loss and TokenCleaning's score are the same
number, ``log π_ref − log π_base``: their rows differ only where the step's 60 % (Rho-1's ``global_batch``) and the
rows' 60 % (TokenCleaning's ``global``) drop different tokens.

The configs: ``configs/sft_<method>_<Budget.sft_configs>.yaml`` (the tiny models, or SmolLM2), with ``--task_seed``,
``--num_train_examples`` and ``Budget.sft_flags``. Rho-1's and TokenCleaning's reference is the one
``benchmarks/sft_tokens.py`` trains (:data:`REFERENCE_RUNS`: a LoRA SFT of the base model on the task's ``clean``
split, merged; :func:`train_merged`), trained once and shared by the seeds. TokenCleaning's weights are its labels
(top 60 % of the rows' label tokens by ``L_base − L_ref``) as ``tokenweave score-tokens`` computes them
(:func:`tokenweave.pipelines.token_scores.score_tokens`, its own resumable output per seed).

Cost (``cpu`` budget, 96 rows a seed, about 29 noisy): every signal but Rho-1 reads the noisy rows only (its
weights on a row do not depend on the others), Rho-1 and score-tokens read all of them with two models each; measured
with one torch thread on two shared CPU cores, about 18 s plus 2 s a row, so 3.5 min a seed, after the reference's
7 min (``benchmarks/sft_tokens.py``'s measurement).

Not scored: ASFT (at an untrained policy its weights are DFT's: its KL anchor is a loss term, not a weight) and
ssToken (its history model is the initial weights, so at the start only its attention term ranks, and that needs
about twice a forward's time: ``benchmarks/sft_tokens.py``'s noise table has both).
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...config import parse_run_config
from ...data.loading import load_run_dataset
from ...data.noisy_arithmetic import planted_label_masks
from ...inference.loading import save_merged_model
from ...tokens.controls import row_generator
from ...train import build_trainer, run_dataset_kwargs, train_from_args
from ...trainers.collators import ROW_KEY
from ..quickstart import REPO_ROOT
from ..steps import Step, made_from
from ..token_scores import score_tokens, sft_tokenizer
from . import Budget
from .table import Measurement

SIGNALS = {"rho1": "Rho-1", "token_cleaning": "TokenCleaning", "profit": "ProFit", "dft": "DFT", "eaft": "EAFT"}
"""The signals scored (config name: label), in the table's order."""
NEEDS_REFERENCE = ("rho1", "token_cleaning")
WHOLE_BATCHES = ("rho1",)
"""Signals whose weights on a row depend on its batch (Rho-1's ``global_batch`` ranks a step's tokens together):
they read every row; the others read the scored rows only."""
REFERENCE_RUNS = {
    "smollm2": ("--config", "configs/sft_reference_smollm2.yaml"),
    "tiny": ("--config", "configs/sft_tiny.yaml", "--dataset_name", "noisy_arithmetic", "--dataset_train_split",
             "clean", "--use_peft", "true"),
}
"""The reference's run by ``Budget.sft_configs``: SmolLM2's is ``benchmarks/sft_tokens.py``'s (24 LoRA steps of 8 of
the 256 clean rows); the tiny one a LoRA SFT of the tiny model on the clean split, a few steps."""


def _absolute(argv: Sequence[str]) -> list[str]:
    """``argv`` with its ``--config`` (relative to the repository root, as the steps record it) made absolute."""
    argv = list(argv)
    position = argv.index("--config") + 1
    argv[position] = str(REPO_ROOT / argv[position])
    return argv


def _parsed(argv: Sequence[str], output_dir: Path):
    """The run config of ``argv`` (:func:`_absolute`) with ``output_dir``."""
    return parse_run_config([*_absolute(argv), "--output_dir", str(output_dir)])


def train_merged(argv: Sequence[str], directory: Path) -> None:
    """Train the run of ``argv`` (a LoRA run) into ``directory/adapter`` and merge it into ``directory``: a plain
    model directory, as ``reference_model_path`` names one."""
    train_from_args(*parse_run_config([*argv, "--output_dir", str(directory / "adapter")]))
    save_merged_model(str(directory / "adapter"), str(directory))


def reference_step(counts: Budget) -> Step:
    """The step ``sft_reference``: Rho-1's and TokenCleaning's reference (:data:`REFERENCE_RUNS`), shared by the
    seeds."""
    argv = [*REFERENCE_RUNS[counts.sft_configs], *counts.sft_flags]
    return Step("sft_reference", {"argv": argv}, lambda directory: train_merged(_absolute(argv), directory))


def method_argv(method: str, counts: Budget, seed: int) -> list[str]:
    """The trainer arguments of ``method`` for ``seed`` (no ``--output_dir``): its config, the seed's task, the base
    model without adapter, and the shuffle control on, so that each row carries its identity
    (:func:`label_token_weights`)."""
    return ["--config", f"configs/sft_{method}_{counts.sft_configs}.yaml", "--task_seed", str(seed),
            "--num_train_examples", str(counts.sft_rows), "--use_peft", "false", "--signal_control", "shuffle",
            *counts.sft_flags]


def sft_settings(counts: Budget, seed: int, reference: Path) -> dict:
    """What one seed's rows are made from: every method's arguments and the reference's record."""
    return {"seed": seed, "argv": {method: method_argv(method, counts, seed) for method in SIGNALS},
            "reference": made_from(reference)}


def label_token_weights(trainer, token_ids: Sequence[Sequence[int]], batch_size: int,
                        controls: Sequence[str] = ("none",), rows: Sequence[int] | None = None) -> dict[str, list]:
    """``{control: [weights of each row's label tokens, or None for a row not read]}``: what
    :meth:`~tokenweave.trainers.sft.TokenSFTTrainer.signal_weights` puts on the label tokens of the trainer's train
    rows ``rows`` (default: all), read in batches of ``batch_size`` rows in dataset order, once per control (each pass
    sets ``signal_control``). The trainer must be built with ``signal_control: shuffle``, so that each row carries its
    identity; ``token_ids[i]`` is row i's tokens as the task tokenises them, checked against the trainer's."""
    names = ", ".join(trainer.args.token_signals or [])
    dataset = trainer._remove_unused_columns(trainer.train_dataset, description="signal weights")
    if len(dataset) != len(token_ids):
        raise RuntimeError(f"{names}: the trainer has {len(dataset)} rows, the task {len(token_ids)}.")
    if ROW_KEY not in dataset.column_names:
        raise ValueError(f"{names}: label_token_weights needs a trainer built with signal_control: shuffle (its rows "
                         "carry their identity then); set it when building the trainer.")
    indices = list(range(len(dataset)) if rows is None else rows)
    results = {control: [None] * len(token_ids) for control in controls}
    trainer.model.eval()
    for begin in range(0, len(indices), batch_size):
        examples = [dataset[index] for index in indices[begin: begin + batch_size]]
        batch = trainer.data_collator(examples)
        labelled = batch["labels"][:, 1:] != -100
        for control in controls:
            trainer.args.signal_control = control
            weights = trainer.signal_weights(batch).float().cpu()
            for position, index in enumerate(batch[ROW_KEY].tolist()):
                if list(examples[position]["input_ids"]) != list(token_ids[index]):
                    raise RuntimeError(f"{names}: row {index}'s tokens differ from the task's tokenisation.")
                results[control][index] = weights[position][labelled[position]].numpy()
    return results


def r_precision(weights: Sequence[float], planted: Sequence[bool], seed: int, *keys: int) -> tuple[float, float]:
    """``(R-precision, m / n)`` of one row's ``n`` label tokens, ``m`` of them ``planted`` (``m ≥ 1``): the share of
    planted tokens among the ``m`` tokens of lowest weight, and its exact expectation for a uniformly random ranking
    (``m · m/n`` planted expected among ``m``). Equal weights are ordered by a uniformly random permutation of the
    tokens, ``torch.randperm(n)`` drawn with :func:`row_generator` ``(seed, *keys)``: among equal weights, the token
    whose entry in the permutation is lower ranks lower."""
    weights, planted = np.asarray(weights, dtype=np.float64), np.asarray(planted, dtype=bool)
    if weights.shape != planted.shape or not planted.any():
        raise ValueError(f"r_precision needs one planted flag per weight and one planted token at least: got "
                         f"{len(weights)} weights, {len(planted)} flags, {int(planted.sum())} planted.")
    count = int(planted.sum())
    tiebreak = torch.randperm(len(weights), generator=row_generator(seed, *keys)).numpy()
    lowest = np.lexsort((tiebreak, weights))[:count]
    return float(planted[lowest].sum() / count), count / len(weights)


def sft_noise_evidence(counts: Budget, seed: int, reference: Path, token_cleaning_data: Path) -> list[Measurement]:
    """One row per signal of :data:`SIGNALS` for ``seed`` (module docstring); TokenCleaning's scored dataset goes to
    (or is reused from) ``token_cleaning_data``."""
    argvs = {method: method_argv(method, counts, seed)
             + (["--reference_model_path", str(reference)] if method in NEEDS_REFERENCE else [])
             for method in SIGNALS}
    with tempfile.TemporaryDirectory() as scratch:
        run_args, training_args, model_args = _parsed(argvs["dft"], Path(scratch))
        dataset = load_run_dataset(run_args.dataset_name, run_args.dataset_train_split,
                                   num_examples=run_args.num_train_examples, **run_dataset_kwargs(run_args))
        masks, ids = planted_label_masks(dataset, sft_tokenizer(training_args, model_args))
        scored_rows = [row for row, mask in enumerate(masks) if any(mask)]
        scored = score_tokens(*_parsed(argvs["token_cleaning"], Path(scratch)), token_cleaning_data)["output"]
        argvs["token_cleaning"] += ["--dataset_name", scored]
        measurements = []
        for method, label in SIGNALS.items():
            trainer = build_trainer(*_parsed(argvs[method], Path(scratch) / method))
            weights = label_token_weights(trainer, ids, trainer.args.per_device_train_batch_size,
                                          rows=None if method in WHOLE_BATCHES else scored_rows)["none"]
            del trainer
            gc.collect()
            measurement = Measurement(
                f"{label} token weights (lowest)",
                "planted tokens among the row's m lowest-weighted label tokens (R-precision; m: its planted tokens)",
                "a random ranking of the same tokens (exact, m / n)", "noisy rows")
            for row in scored_rows:
                if len(weights[row]) != len(masks[row]):
                    raise RuntimeError(f"{method}: row {row} has {len(weights[row])} weighted label tokens and "
                                       f"{len(masks[row])} in the task (truncated by max_length?).")
                measurement.add(seed, *r_precision(weights[row], masks[row], seed, row))
            measurements.append(measurement)
    return measurements
