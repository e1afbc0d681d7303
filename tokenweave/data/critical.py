"""The critical-token pipeline of cDPO ("Critical Tokens Matter", Lin et al., ICML 2025, arXiv 2411.19943).

``tokenweave critical --config configs/critical_tiny.yaml [--key value ...]`` runs, into one work dir:

=========  ================  ==================================================================================
step       output            what
=========  ================  ==================================================================================
sample     ``samples/``      (a) K trajectories per question from the base model, (b) each labelled
                             ``correct`` by the answer reward (:func:`~tokenweave.data.preferences.sample_trajectories`)
sft_data   ``sft_data/``     ``positive/``: correct trajectories, ``positive_per_question`` per question with
                             the most frequent correct answer (with ``reference_fallback``, plus every question's
                             reference solution); ``negative/``: the incorrect ones whose answers cover
                             ``negative_top_p`` of a question's incorrect answers (prompt/completion)
positive   ``positive/``     (c) LoRA SFT of the base model on ``sft_data/positive`` (``tokenweave.train``;
                             its run config is kept as ``sft_config.yaml``)
negative   ``negative/``     (c) the same on ``sft_data/negative``
pairs      ``pairs/``        (d, e) preference pairs (:func:`~tokenweave.data.preferences.build_preference_pairs`)
                             with ``chosen_scores``/``rejected_scores`` (one critical-token score per completion
                             token, :mod:`tokenweave.tokens.critical`) and ``chosen_tokens``/``rejected_tokens``
cdpo       ``cdpo/``         (f) only with ``cdpo_config``: ``tokenweave train`` of that config on ``pairs/``
dpo        ``dpo/``          only with ``compare_dpo``: the same run with ``loss_type: sigmoid`` (plain DPO on the
                             same pairs and budget: the baseline of cDPO)
=========  ================  ==================================================================================

Scoring and pairing are one step because the completion tokens of a pair depend on both of its responses
(DPOTrainer starts the completion after the shortest common prefix of prompt and prompt+chosen /
prompt+rejected), so only the pair fixes which tokens get scores.

Every step is resumable: it is skipped when its output directory exists (with its marker file), and it is
written to ``.<name>.partial`` first, then renamed, so an interrupted step leaves no output and reruns.
Outputs are not invalidated when the config changes: delete a step's directory (and the ones after it) to
recompute it. The resolved config is written to ``pipeline_config.yaml``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from datasets import Dataset, load_from_disk
from trl import ModelConfig, TrlParser

from ..config import RunArguments, parse_run_config
from ..inference.scoring import load_contrastive_models, score_dataset
from ..trainers import TokenSFTConfig
from ..train import RUN_INFO_FILE, train
from .preferences import build_preference_pairs, sample_trajectories, select_by_answer_frequency

CONFIG_RECORD = "pipeline_config.yaml"
SFT_CONFIG_FILE = "sft_config.yaml"
DATASET_MARKER = "dataset_info.json"
PLAIN_DPO_ARGS = ["--loss_type", "sigmoid"]  # compare_dpo: the cDPO run with TRL's plain DPO loss
# SFT run-config keys the pipeline sets itself, from its own fields or for each run.
_MANAGED_SFT_KEYS = {
    "method": None,
    "model_name_or_path": "model",
    "dataset_name": None,
    "output_dir": None,
    "use_peft": None,
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "lora_target_modules",
    "max_steps": "sft_max_steps",
    "learning_rate": "sft_learning_rate",
    "per_device_train_batch_size": "sft_batch_size",
    "warmup_steps": "sft_warmup_steps",
    "max_length": "sft_max_length",
    "seed": "seed",
}


@dataclass
class CriticalPipelineConfig:
    """Options of the critical-token pipeline (one YAML file; ``--key value`` overrides it).

    Defaults for the positive/negative models are cDPO's released ones (methods.md section 2, steps 1-2):
    one correct trajectory per question and the incorrect ones covering half of the incorrect answers; LoRA r=8,
    α=16, dropout 0.1 on gate/up/down_proj, lr 3e-4, cosine schedule, warmup 100, batch 6, one epoch, loss on
    completions only (no validation hold-out here).
    """

    model: str = field(
        default="tiny-llama",
        metadata={"help": "Base model: a built-in name (tiny-llama, smollm2-135m), a local directory or a hub id."},
    )
    work_dir: str = field(
        default="outputs/critical_tokens", metadata={"help": "Directory that receives every step's output."}
    )
    # (a, b) sampling and labelling
    task: str = field(
        default="arithmetic", metadata={"help": "Built-in task or dataset with prompt/answer columns to sample on."}
    )
    num_examples: int | None = field(default=64, metadata={"help": "Questions to sample (None: the whole split)."})
    task_difficulty: str = field(default="easy", metadata={"help": "Built-in arithmetic difficulty."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the built-in task's problem generator."})
    num_samples_per_prompt: int = field(default=8, metadata={"help": "Trajectories sampled per question (K)."})
    temperature: float = field(
        default=0.7,
        metadata={"help": "Sampling temperature; cDPO picks it so each question gets about 10 wrong answers in 64."},
    )
    max_new_tokens: int = field(default=96, metadata={"help": "Maximum tokens per sampled trajectory."})
    sample_batch_size: int = field(default=32, metadata={"help": "Sequences generated per batch."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of the SFT runs."})
    reference_fallback: bool = field(
        default=False,
        metadata={
            "help": "For models that are rarely correct: a question with no correct sample gets its reference "
            "solution as chosen response, and the positive model trains on correct samples plus every question's "
            "reference solution. Needs a task with a 'solution' column."
        },
    )
    positive_per_question: int | None = field(
        default=1,
        metadata={
            "help": "Correct trajectories per question in the positive SFT set, those with the most frequent correct "
            "answer first (cDPO: 1; None: every correct trajectory)."
        },
    )
    negative_top_p: float = field(
        default=0.5,
        metadata={
            "help": "Share of a question's incorrect trajectories covered by the negative SFT set, most frequent "
            "incorrect answers first, every trajectory of a kept answer included (cDPO: 0.5; 1.0: all)."
        },
    )
    # (c) positive and negative LoRA models
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the positive/negative models."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha of the positive/negative models."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout of the positive/negative models."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules that get LoRA adapters in the positive/negative models."},
    )
    sft_max_steps: int = field(
        default=-1, metadata={"help": "Optimiser steps of each positive/negative SFT run (-1: one epoch)."}
    )
    sft_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the positive/negative SFT."})
    sft_batch_size: int = field(default=6, metadata={"help": "Per-device batch size of the positive/negative SFT."})
    sft_warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps of the positive/negative SFT."})
    sft_max_length: int = field(default=1024, metadata={"help": "Maximum tokens per SFT example (truncated)."})
    sft_args: dict = field(
        default_factory=dict,
        metadata={
            "help": "Any further key of an SFT run config (TokenSFTConfig or ModelConfig: use_cpu, bf16, "
            "logging_steps, ...) for both SFT runs; keys set by the fields above are refused."
        },
    )
    # (d, e) scores
    score_b: float = field(
        default=1.0, metadata={"help": "b in s_t = softmax((1+b)·z_pos − b·z_neg)[y_t] (released code: 1)."}
    )
    score_batch_size: int = field(default=8, metadata={"help": "Sequences per scoring forward."})
    score_chunk_size: int = field(
        default=256, metadata={"help": "Positions per chunk of [chunk, vocab] logits when scoring."}
    )
    # (f) cDPO
    cdpo_config: str | None = field(
        default=None,
        metadata={
            "help": "A `tokenweave train` config (method: dpo, loss_type: cdpo) run on the scored pairs, with "
            "model_name_or_path, dataset_name and output_dir set by the pipeline. None: stop after the pairs."
        },
    )
    compare_dpo: bool = field(
        default=False,
        metadata={
            "help": "With cdpo_config: also train plain DPO, the same run with loss_type sigmoid (same pairs, model "
            "and budget), into dpo/, as the baseline of cDPO."
        },
    )

    def __post_init__(self):
        if self.compare_dpo and self.cdpo_config is None:
            raise ValueError("compare_dpo trains the cdpo_config run with loss_type sigmoid: set cdpo_config.")
        if self.positive_per_question is not None and self.positive_per_question < 1:
            raise ValueError(f"positive_per_question must be at least 1 (or None), got {self.positive_per_question}")
        if not 0.0 < self.negative_top_p <= 1.0:
            raise ValueError(f"negative_top_p must be in (0, 1], got {self.negative_top_p}")
        if self.num_samples_per_prompt < 2:
            raise ValueError("num_samples_per_prompt must be at least 2 to find correct and incorrect trajectories.")
        sft_keys = {action.dest for action in TrlParser((RunArguments, TokenSFTConfig, ModelConfig))._actions}
        unknown = sorted(set(self.sft_args) - sft_keys)
        if unknown:
            raise ValueError(f"sft_args has key(s) {unknown} that are not fields of an SFT run config.")
        managed = sorted(set(self.sft_args) & set(_MANAGED_SFT_KEYS))
        if managed:
            hints = [
                f"{key} (set it with the pipeline field {_MANAGED_SFT_KEYS[key]!r})" if _MANAGED_SFT_KEYS[key] else key
                for key in managed
            ]
            raise ValueError(f"sft_args must not set {', '.join(hints)}: the pipeline sets these keys itself.")
        if self.cdpo_config is not None and not Path(self.cdpo_config).is_file():
            raise FileNotFoundError(f"cdpo_config {self.cdpo_config!r} does not exist.")


def parse_pipeline_config(argv: list[str] | None = None) -> CriticalPipelineConfig:
    """Parse ``--config file.yaml [--key value ...]`` into a :class:`CriticalPipelineConfig`.

    A YAML key or flag that is not a field is a ``ValueError`` naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        config_path = argv[argv.index("--config") + 1]
        with open(config_path) as handle:
            config = yaml.safe_load(handle) or {}
        if not isinstance(config, dict):
            raise ValueError(f"Config file {config_path!r} must contain a YAML mapping.")
        unknown = sorted(set(config) - {item.name for item in fields(CriticalPipelineConfig)})
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} in {config_path!r}: not fields of CriticalPipelineConfig "
                "(see tokenweave/data/critical.py)."
            )
    (pipeline_config,) = TrlParser((CriticalPipelineConfig,)).parse_args_and_config(argv)
    return pipeline_config


def run_critical_pipeline(config: CriticalPipelineConfig) -> dict[str, Path]:
    """Run every step not done yet (module docstring); returns each step's output directory.

    The cDPO (and DPO) run configs are parsed first, so a bad one fails before hours of sampling and training.
    """
    work_dir = Path(config.work_dir)
    if config.cdpo_config is not None:
        parse_run_config(_cdpo_argv(config, work_dir / "pairs", work_dir / "cdpo"))
    if config.compare_dpo:
        parse_run_config(_cdpo_argv(config, work_dir / "pairs", work_dir / "dpo") + PLAIN_DPO_ARGS)
    work_dir.mkdir(parents=True, exist_ok=True)
    _record_config(config, work_dir / CONFIG_RECORD)
    outputs = {
        "sample": work_dir / "samples",
        "sft_data": work_dir / "sft_data",
        "positive": work_dir / "positive",
        "negative": work_dir / "negative",
        "pairs": work_dir / "pairs",
    }
    _run_step(outputs["sample"], DATASET_MARKER, lambda staging: _sample(config, staging))
    _run_step(outputs["sft_data"], f"negative/{DATASET_MARKER}", lambda staging: _sft_data(config, outputs, staging))
    for side in ("positive", "negative"):
        data = outputs["sft_data"] / side
        _run_step(outputs[side], RUN_INFO_FILE, lambda staging, data=data: _train_lora(config, data, staging))
    _run_step(outputs["pairs"], DATASET_MARKER, lambda staging: _pairs(config, outputs, staging))
    if config.cdpo_config is not None:
        outputs["cdpo"] = work_dir / "cdpo"
        _run_step(outputs["cdpo"], RUN_INFO_FILE, lambda staging: train(_cdpo_argv(config, outputs["pairs"], staging)))
    if config.compare_dpo:
        outputs["dpo"] = work_dir / "dpo"
        _run_step(
            outputs["dpo"],
            RUN_INFO_FILE,
            lambda staging: train(_cdpo_argv(config, outputs["pairs"], staging) + PLAIN_DPO_ARGS),
        )
    return outputs


def _run_step(target: Path, marker: str, build: Callable[[Path], None]) -> None:
    """Run ``build(staging)`` and rename ``staging`` to ``target``, unless ``target`` is already done."""
    if (target / marker).exists():
        print(f"[critical] {target.name}: done already ({target}), skipped")
        return
    if target.exists():
        raise FileExistsError(f"{target} exists but has no {marker}: it is not this step's output; delete it.")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"[critical] {target.name}: running")
    build(staging)
    os.replace(staging, target)


def _record_config(config: CriticalPipelineConfig, path: Path) -> None:
    """Write the config to ``path``; warn about the fields that differ from a previous run's."""
    current = asdict(config)
    if path.exists():
        previous = yaml.safe_load(path.read_text()) or {}
        changed = sorted(key for key in current if previous.get(key) != current[key])
        if changed:
            print(
                f"[critical] warning: {changed} changed since the last run in {path.parent}; finished steps are "
                "reused as they are (delete a step's directory to recompute it)."
            )
    path.write_text(yaml.safe_dump(current, sort_keys=False))


def _sample(config: CriticalPipelineConfig, staging: Path) -> None:
    samples = sample_trajectories(
        config.model,
        task=config.task,
        split="train",
        num_examples=config.num_examples,
        difficulty=config.task_difficulty,
        task_seed=config.task_seed,
        num_samples_per_prompt=config.num_samples_per_prompt,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.sample_batch_size,
        seed=config.seed,
    )
    print(f"[critical] sampled {len(samples)} trajectories, {sum(samples['correct'])} correct")
    samples.save_to_disk(str(staging))


def _sft_data(config: CriticalPipelineConfig, outputs: dict[str, Path], staging: Path) -> None:
    """The positive and negative SFT sets (prompt/completion) from the labelled samples."""
    samples = load_from_disk(str(outputs["sample"]))
    by_question: dict[int, list[dict]] = defaultdict(list)
    for row in samples:
        by_question[row["question_id"]].append(row)
    positive, negative = [], []
    for rows in by_question.values():
        correct = [row for row in rows if row["correct"]]
        incorrect = [row for row in rows if not row["correct"]]
        positive += select_by_answer_frequency(correct, max_rows=config.positive_per_question)
        negative += select_by_answer_frequency(incorrect, top_p=config.negative_top_p)
    positive = [{"prompt": row["prompt"], "completion": row["completion"]} for row in positive]
    negative = [{"prompt": row["prompt"], "completion": row["completion"]} for row in negative]
    if config.reference_fallback:
        if "solution" not in samples.column_names:
            raise ValueError(f"reference_fallback needs a task with a 'solution' column; {config.task!r} has none.")
        questions = {row["question_id"]: row for row in samples.select_columns(["question_id", "prompt", "solution"])}
        positive += [
            {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": row["solution"]}]}
            for row in questions.values()
        ]
    for side, rows in (("positive", positive), ("negative", negative)):
        if not rows:
            correctness = "correct" if side == "positive" else "incorrect"
            raise ValueError(
                f"No {correctness} trajectory in {outputs['sample']} to train the {side} model on: change "
                "temperature, num_samples_per_prompt or task_difficulty"
                + (", or set reference_fallback: true." if side == "positive" else ".")
            )
        Dataset.from_list(rows).save_to_disk(str(staging / side))
    print(f"[critical] SFT sets: {len(positive)} positive, {len(negative)} negative examples")


def _train_lora(config: CriticalPipelineConfig, data: Path, staging: Path) -> None:
    """LoRA SFT of the base model on ``data`` with ``tokenweave.train``; the adapter lands in ``staging``."""
    run_config = {
        "method": "sft",
        "model_name_or_path": config.model,
        "dataset_name": str(data),
        "output_dir": str(staging),
        "use_peft": True,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_target_modules": config.lora_target_modules,
        "max_steps": config.sft_max_steps,
        "num_train_epochs": 1,
        "learning_rate": config.sft_learning_rate,
        "lr_scheduler_type": "cosine",
        "per_device_train_batch_size": config.sft_batch_size,
        "warmup_steps": config.sft_warmup_steps,
        "max_length": config.sft_max_length,
        "save_strategy": "no",
        "report_to": "none",
        "seed": config.seed,
        **config.sft_args,
    }
    staging.mkdir(parents=True)
    config_path = staging / SFT_CONFIG_FILE
    config_path.write_text(yaml.safe_dump(run_config, sort_keys=False))
    train(["--config", str(config_path)])


def _pairs(config: CriticalPipelineConfig, outputs: dict[str, Path], staging: Path) -> None:
    """Preference pairs from the samples, every completion token scored by the positive/negative models."""
    pairs = build_preference_pairs(load_from_disk(str(outputs["sample"])), reference_fallback=config.reference_fallback)
    if len(pairs) == 0:
        raise ValueError(
            f"No preference pair in {outputs['sample']}: no question has both a correct (or, with "
            "reference_fallback, a reference) and an incorrect trajectory."
        )
    positive, negative, tokenizer = load_contrastive_models(str(outputs["positive"]), str(outputs["negative"]))
    scored = score_dataset(
        pairs,
        positive,
        negative,
        tokenizer,
        b=config.score_b,
        batch_size=config.score_batch_size,
        chunk_size=config.score_chunk_size,
    )
    scored.save_to_disk(str(staging))
    print(f"[critical] scored {len(scored)} preference pairs")


def _cdpo_argv(config: CriticalPipelineConfig, pairs: Path, output_dir: Path) -> list[str]:
    """``tokenweave train`` arguments of step (f): the user's cDPO config on the base model and the pairs."""
    return [
        "--config", config.cdpo_config,
        "--model_name_or_path", config.model,
        "--dataset_name", str(pairs),
        "--output_dir", str(output_dir),
    ]  # fmt: skip
