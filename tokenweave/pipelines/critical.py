"""The critical-token pipeline of cDPO ("Critical Tokens Matter", Lin et al., ICML 2025, arXiv 2411.19943).

``tokenweave critical --config configs/critical_tiny.yaml [--key value ...]`` runs, into one work dir:

=============  ===================  ====================================================================================
step           output               what
=============  ===================  ====================================================================================
warm_start     ``warm_start/``      only with ``warm_start_config``: that SFT run of the base model on the task's worked
                                    solutions (a LoRA adapter is merged: a plain model directory). Every later step
                                    starts from it instead of the base model (the *policy*), as in cDPO, whose policy
                                    already solves a fair share of the problems
samples        ``samples/``         (a) K trajectories per question from the policy, (b) each labelled ``correct`` by
                                    the answer reward (:func:`~tokenweave.inference.sampling.sample_trajectories`)
sft_data       ``sft_data/``        ``positive/``: correct trajectories, ``positive_per_question`` per question with the
                                    most frequent correct answer (with ``reference_fallback``, plus every question's
                                    reference solution); ``negative/``: the incorrect ones whose answers cover
                                    ``negative_top_p`` of a question's incorrect answers (prompt/completion;
                                    :func:`~tokenweave.data.preferences.build_sft_sets`)
positive       ``positive/``        (c) the ``sft_config`` run (LoRA SFT) of the policy on ``sft_data/positive``
negative       ``negative/``        (c) the same run on ``sft_data/negative``
pairs          ``pairs/``           (d, e) preference pairs
                                    (:func:`~tokenweave.data.preferences.build_preference_pairs`) with
                                    ``chosen_scores``/``rejected_scores`` (one critical-token score per completion
                                    token, :func:`~tokenweave.inference.scoring.score_dataset`) and
                                    ``chosen_tokens``/``rejected_tokens``; ``statistics.json``: how the samples split
                                    per question and how many chosen responses are the model's own
localization   ``localization/``    with ``measure_localization``: ``report.json``, hit@k / MRR of the lowest scores
                                    against the first error of each rejected trajectory, and of a random ranking
                                    (:mod:`tokenweave.pipelines.localization`)
rollout        ``rollout/``         with ``rollout_trajectories > 0``: ``report.json``, cDPO's rollout test of the
                                    lowest-scored token against a random one (:mod:`tokenweave.pipelines.localization`)
cdpo           ``cdpo/``            (f) only with ``cdpo_config``: that run of the policy on ``pairs/``
dpo            ``dpo/``             only with ``compare_dpo``: the same run with ``loss_type: sigmoid`` (plain DPO on
                                    the same pairs and budget: the baseline of cDPO)
cdpo_shuffled  ``cdpo_shuffled/``   only with ``compare_shuffled``: the cDPO run with ``signal_control: shuffle`` (each
                                    completion's weights on random tokens: the random-signal control)
=============  ===================  ====================================================================================

Sampling and scoring are split over the processes of the launch flags (``--accelerate_config``, ``--num_processes``:
:mod:`tokenweave.pipelines.workers`), and give the same dataset whatever their number; the training steps run under
the same flags. ``sampler: vllm`` samples with vLLM's offline engine instead, in a process of its own.

Scoring and pairing are one step because the completion tokens of a pair depend on both of its responses
(DPOTrainer starts the completion after the shortest common prefix of prompt and prompt+chosen /
prompt+rejected), so only the pair fixes which tokens get scores.

The training runs are run configs (``sft_config``, ``cdpo_config``: YAML files of ``tokenweave train``), parsed
before any step runs and trained with :func:`tokenweave.train.train_from_args`; the pipeline replaces their
``model_name_or_path`` (with the policy), ``dataset_name`` and ``output_dir``, and the positive/negative SFT runs'
``seed`` (with ``seed``); the warm start keeps its own dataset and seed (it does not depend on ``seed``, so one warm
start serves every seed). Every step is resumable and records the config it was made from
(:mod:`tokenweave.pipelines.steps`): rerunning skips finished steps, and a finished step whose config changed stops
the pipeline with what changed.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from datasets import Dataset, load_from_disk
from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

from ..checks import ConfigError, check_options
from ..config import RunArguments, config_keys, load_run_config
from ..data.preferences import build_preference_pairs, build_sft_sets, pair_statistics, sample_statistics
from ..inference.loading import load_model_and_tokenizer, save_merged_model
from ..inference.sampling import SAMPLERS, sample_trajectories
from ..inference.scoring import score_with_models
from ..inference.vllm_sampling import vllm_is_installed
from ..launch import launch_settings_from_config, run_launched
from ..preflight import config_file_of, read_config_file
from ..train import train_from_args
from .localization import format_localization, format_rollout, localization_report, rollout_report
from .steps import Step, run_steps
from .workers import run_launched_work

logger = logging.getLogger(__name__)  # progress (INFO); the tokenweave command shows it

LOG_PREFIX = "critical"
STATISTICS_FILE = "statistics.json"  # in pairs/: sample_statistics and pair_statistics
REPORT_FILE = "report.json"  # in localization/ and rollout/
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")
# Run-config keys the pipeline sets itself (the SFT runs' seed too: ``seed``); left out of a step's record.
_PIPELINE_RUN_KEYS = ("model_name_or_path", "dataset_name", "output_dir")


@dataclass
class CriticalPipelineConfig:
    """Options of the critical-token pipeline (one YAML file; ``--key value`` overrides it).

    The positive/negative models are the runs of ``sft_config``. cDPO's released ones (methods.md section 2, steps
    1-2) are one correct trajectory per question and the incorrect ones covering half of the incorrect answers (the
    defaults here), trained with LoRA r=8, α=16, dropout 0.1 on gate/up/down_proj, lr 3e-4, cosine schedule, warmup
    100, batch 6, one epoch, loss on completions only (no validation hold-out here).
    """

    model: str = field(
        default="tiny-llama",
        metadata={"help": "Base model: a built-in name (tiny-llama, smollm2-135m), a local directory or a hub id."},
    )
    work_dir: str = field(
        default="outputs/critical_tokens", metadata={"help": "Directory that receives every step's output."}
    )
    warm_start_config: str | None = field(
        default=None,
        metadata={
            "help": "A `tokenweave train` config (method: sft) run first, on its own dataset (the task's worked "
            "solutions), from `model`; model_name_or_path and output_dir are set by the pipeline. Sampling, the "
            "positive/negative models and the cDPO/DPO policies then start from it. None: from `model` itself."
        },
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
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of the SFT runs (replaces their `seed`)."})
    sampler: str = field(
        default="transformers",
        metadata={
            "help": "What samples the trajectories: transformers' generate (split over the processes of the launch "
            "flags) or vllm (vLLM's offline engine, in one process of its own, on vllm_tensor_parallel_size GPUs; "
            "needs `pip install vllm`). Same output format.",
            "choices": list(SAMPLERS),
        },
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "With sampler vllm: GPUs of its engine."})
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "With sampler vllm: share of each GPU's memory its engine may take."}
    )
    inference_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the models that sample and score.", "choices": list(INFERENCE_DTYPES)},
    )
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
    # (c) positive and negative models
    sft_config: str | None = field(
        default=None,
        metadata={
            "help": "A `tokenweave train` config (method: sft, usually LoRA) run twice, on the positive and on the "
            "negative SFT set, with model_name_or_path, dataset_name, output_dir and seed set by the pipeline. "
            "Required."
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
    # the evidence that the scores find critical tokens
    measure_localization: bool = field(
        default=True,
        metadata={
            "help": "Measure hit@k / MRR of the lowest scores against each rejected trajectory's first error (the "
            "built-in arithmetic task's format; pairs need a 'solution' column), and of a random ranking."
        },
    )
    rollout_trajectories: int = field(
        default=0,
        metadata={
            "help": "cDPO's rollout test on this many rejected trajectories (the first pairs): resample from just "
            "before the lowest-scored token with that token forbidden, and from a random token of the same "
            "trajectory; 0: off."
        },
    )
    rollout_samples: int = field(default=8, metadata={"help": "Continuations per tested position."})
    rollout_temperature: float | None = field(
        default=None, metadata={"help": "Temperature of the rollouts (None: `temperature`)."}
    )
    rollout_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Maximum new tokens per rollout (None: `max_new_tokens`)."}
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
    compare_shuffled: bool = field(
        default=False,
        metadata={
            "help": "With cdpo_config: also train cDPO with signal_control 'shuffle' (each completion's own "
            "weights on random tokens, seeded by `seed`), into cdpo_shuffled/: the random-signal control."
        },
    )

    def __post_init__(self):
        check_options(self)  # types, choices and ranges
        for option in ("compare_dpo", "compare_shuffled"):
            if getattr(self, option) and self.cdpo_config is None:
                raise ValueError(f"{option} trains a variant of the cdpo_config run: set cdpo_config.")
        if self.sft_config is None:
            raise ValueError(
                "sft_config is required: the run config (method: sft) of the positive and negative models, e.g. "
                "configs/critical_sft_tiny.yaml."
            )
        for name in ("warm_start_config", "sft_config", "cdpo_config"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path!r} does not exist.")
        if self.sampler == "vllm" and not vllm_is_installed():  # before the warm start trains
            raise ConfigError("sampler: vllm needs vLLM, which is not installed: pip install vllm (on a GPU machine), "
                              "or sampler: transformers.")


def parse_pipeline_config(argv: list[str] | None = None) -> CriticalPipelineConfig:
    """Parse ``--config file.yaml [--key value ...]`` (``tokenweave critical``) into a :class:`CriticalPipelineConfig`.

    A YAML key or flag that is not a field is a ``ValueError`` naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _, config = launch_settings_from_config(config_file_of(argv), config_keys(CriticalPipelineConfig))
    _check_keys(config)  # the launcher's keys (accelerate_config, num_processes: tokenweave.launch) left out
    pipeline_config, _, remaining = TrlParser((CriticalPipelineConfig,), prog="tokenweave critical").parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True)
    if remaining:
        raise ValueError(f"Unknown command-line argument(s) {remaining} for tokenweave critical: not fields of "
                         "CriticalPipelineConfig (see tokenweave/pipelines/critical.py).")
    return pipeline_config


def load_pipeline_config(path: str | Path, **overrides) -> CriticalPipelineConfig:
    """The pipeline config in the YAML file ``path`` with the field values ``overrides`` on top."""
    values = {**read_config_file(path), **overrides}
    _check_keys(values)
    return CriticalPipelineConfig(**values)


def _check_keys(values: dict) -> None:
    unknown = sorted(set(values) - config_keys(CriticalPipelineConfig))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the pipeline config: not fields of CriticalPipelineConfig "
            "(see tokenweave/pipelines/critical.py)."
        )


@dataclass(frozen=True)
class TrainingRun:
    """One training run of the pipeline: its three config dataclasses and the run config it records.

    Its model, dataset and output directory are set per step with ``dataclasses.replace``, which reruns the
    dataclasses' ``__post_init__``: for SFT and DPO configs that equals parsing the same keys on the command line (a
    test checks it); TRL's ``GRPOConfig`` refuses it (its ``__post_init__`` derives ``generation_batch_size``).
    """

    run_args: RunArguments
    training_args: TrainingArguments
    model_args: ModelConfig
    record: dict

    def train(self, model: str, dataset: Path | None, output_dir: Path, launch: dict | None = None) -> None:
        """Train this run from ``model`` on ``dataset`` (None: the run config's own) into ``output_dir``
        (:func:`tokenweave.train.train_from_args`). With ``launch`` (launch flags, :mod:`tokenweave.launch`), it is
        ``tokenweave train --config <launch_config, as YAML> <launch flags>`` in a process of its own, which runs it
        under ``accelerate launch``."""
        if launch:
            with tempfile.TemporaryDirectory() as directory:
                config = Path(directory) / "run.yaml"
                config.write_text(yaml.safe_dump(self.launch_config(model, dataset, output_dir), sort_keys=False))
                run_launched("tokenweave.cli", ["train", "--config", str(config)], launch)
            return
        run_args = self.run_args if dataset is None else replace(self.run_args, dataset_name=str(dataset))
        train_from_args(
            run_args,
            replace(self.training_args, output_dir=str(output_dir)),
            replace(self.model_args, model_name_or_path=model),
        )

    def launch_config(self, model: str, dataset: Path | None, output_dir: Path) -> dict:
        """The run config of :meth:`train` as a ``tokenweave train`` YAML: the record with the model, the dataset
        and the output directory (it parses to the dataclasses :meth:`train` trains in process)."""
        placed = {"model_name_or_path": model, "output_dir": str(output_dir)}
        return {**self.record, **placed, **({} if dataset is None else {"dataset_name": str(dataset)})}

    def variant(self, **training_overrides) -> TrainingRun:
        """This run with ``training_overrides`` on its TRL config (recorded too): a compared variant."""
        return TrainingRun(
            self.run_args,
            replace(self.training_args, **training_overrides),
            self.model_args,
            {**self.record, **training_overrides},
        )


def training_runs(config: CriticalPipelineConfig) -> dict[str, TrainingRun]:
    """The pipeline's training runs (``sft``; ``warm_start``, ``cdpo``, ``dpo``, ``cdpo_shuffled`` when configured)
    from their run configs.

    Each run config is parsed and checked here, so a bad one fails before any step runs.
    """
    runs = {"sft": _training_run(config.sft_config, "sft", seed=config.seed)}
    if config.warm_start_config is not None:
        runs["warm_start"] = _training_run(config.warm_start_config, "sft", own_dataset=True)
    if config.cdpo_config is not None:
        runs["cdpo"] = _training_run(config.cdpo_config, "dpo")
    if config.compare_dpo:  # plain DPO: TRL's loss, no token signal
        runs["dpo"] = runs["cdpo"].variant(loss_type="sigmoid", token_signals=None, signal_control="none")
    if config.compare_shuffled:
        runs["cdpo_shuffled"] = runs["cdpo"].variant(signal_control="shuffle", signal_control_seed=config.seed)
    return runs


def _training_run(path: str, method: str, seed: int | None = None, own_dataset: bool = False) -> TrainingRun:
    """The run config at ``path`` (with ``seed``), checked to be a ``method`` run; its record leaves out what the
    pipeline sets (the model, output directory and, unless ``own_dataset``, the dataset)."""
    run_args, training_args, model_args = load_run_config(path)
    if run_args.method != method:
        raise ValueError(f"{path} is a {run_args.method!r} run; the pipeline needs a {method!r} run config there.")
    pipeline_keys = [key for key in _PIPELINE_RUN_KEYS if not (own_dataset and key == "dataset_name")]
    record = {key: value for key, value in read_config_file(path).items() if key not in pipeline_keys}
    if seed is not None:
        training_args = replace(training_args, seed=seed)
        record["seed"] = seed
    return TrainingRun(run_args, training_args, model_args, record)


def warm_start_step(config: CriticalPipelineConfig, launch: dict | None = None) -> Step:
    """The step that trains ``warm_start_config`` from the base model and merges it (its record names the base model
    and the run, not the seed: one warm start serves every seed)."""
    run = training_runs(config)["warm_start"]
    return Step("warm_start", {"model": config.model, "run": run.record},
                lambda staging: _warm_start(run, config.model, staging, launch))


def run_critical_pipeline(config: CriticalPipelineConfig, launch: dict | None = None) -> dict[str, Path]:
    """Run every step not done yet (module docstring); returns each step's output directory. ``launch``: launch
    flags (``--accelerate_config``, ``--num_processes``, ...) the training steps run under (:meth:`TrainingRun.train`),
    and sampling (with ``sampler: transformers``) and scoring too, each process its share
    (:mod:`tokenweave.pipelines.workers`: the same samples and scores whatever the number of processes). The rollout
    test runs in this process. The flags are not in the steps' records: a step made on 2 processes is reused by a
    rerun on 1."""
    work_dir = Path(config.work_dir)
    runs = training_runs(config)
    samples, sft_data, pairs = work_dir / "samples", work_dir / "sft_data", work_dir / "pairs"
    # The model every later step starts from, and the step that makes it (the record names the base model).
    policy = str(work_dir / "warm_start") if "warm_start" in runs else config.model
    warm = ("warm_start",) if "warm_start" in runs else ()
    sampling = _sampling_arguments(config)
    steps = [warm_start_step(config, launch)] if warm else []
    steps += [
        Step("samples", sampling, lambda staging: _sample({**sampling, "model": policy}, staging, launch),
             inputs=warm),
        Step(
            "sft_data",
            {
                "positive_per_question": config.positive_per_question,
                "negative_top_p": config.negative_top_p,
                "reference_fallback": config.reference_fallback,
            },
            lambda staging: _sft_data(config, samples, staging),
            inputs=("samples",),
        ),
        *(_training_step(side, runs["sft"], policy, sft_data / side, "sft_data", launch)
          for side in ("positive", "negative")),
        Step(
            "pairs",
            {
                "reference_fallback": config.reference_fallback,
                "score_b": config.score_b,
                "score_batch_size": config.score_batch_size,
                "score_chunk_size": config.score_chunk_size,
                "inference_dtype": config.inference_dtype,
            },
            lambda staging: _pairs(config, work_dir, staging, launch),
            inputs=("samples", "positive", "negative"),
        ),
    ]
    if config.measure_localization:
        steps.append(Step("localization", {}, lambda staging: _localization(pairs, staging), inputs=("pairs",)))
    if config.rollout_trajectories > 0:
        rollout = _rollout_arguments(config)
        steps.append(
            Step("rollout", rollout, lambda staging: _rollout(policy, pairs, rollout, staging), inputs=("pairs",))
        )
    steps += [
        _training_step(name, runs[name], policy, pairs, "pairs", launch)
        for name in ("cdpo", "dpo", "cdpo_shuffled")
        if name in runs
    ]
    return run_steps(work_dir, steps, LOG_PREFIX)


def _training_step(name: str, run: TrainingRun, model: str, dataset: Path, input_step: str, launch: dict | None) -> Step:
    """The step ``name`` that trains ``run`` from ``model`` on ``dataset``, the output of the step ``input_step``."""
    return Step(
        name, {"run": run.record}, lambda staging: run.train(model, dataset, staging, launch), inputs=(input_step,)
    )


def _warm_start(run: TrainingRun, model: str, staging: Path, launch: dict | None) -> None:
    """The warm-start SFT of ``model``; a LoRA adapter is merged, so the step's output is a plain model directory
    (the adapter is kept in ``adapter/``)."""
    if not run.model_args.use_peft:
        run.train(model, None, staging, launch)
        return
    run.train(model, None, staging / "adapter", launch)
    save_merged_model(str(staging / "adapter"), str(staging))
    logger.info(f"[{LOG_PREFIX}] warm start: LoRA adapter merged into {model}")


def _sampling_arguments(config: CriticalPipelineConfig) -> dict:
    """The arguments of :func:`~tokenweave.inference.sampling.sample_trajectories` in step (a, b): the samples step's
    record too (``model`` is the base model's name; with a warm start the call samples from ``warm_start/``)."""
    return dict(
        model=config.model,
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
        dtype=config.inference_dtype,
        sampler=config.sampler,
        vllm_options=(
            dict(tensor_parallel_size=config.vllm_tensor_parallel_size,
                 gpu_memory_utilization=config.vllm_gpu_memory_utilization)
            if config.sampler == "vllm" else None
        ),
    )


def _sample(sampling: dict, staging: Path, launch: dict | None) -> None:
    """Step (a, b): with transformers, in the processes of the launch flags (else in this process); with vLLM, in
    one process of its own (the engine takes its GPUs itself, and they are all free again when it exits, before
    the training steps)."""
    if sampling["sampler"] == "vllm":
        run_launched_work("sample", sampling, staging, launch={})
    elif launch:
        run_launched_work("sample", sampling, staging, launch)
    else:
        sample_trajectories(**sampling).save_to_disk(str(staging))
    samples = load_from_disk(str(staging))
    logger.info(f"[{LOG_PREFIX}] sampled {len(samples)} trajectories, {sum(samples['correct'])} correct")


def _sft_data(config: CriticalPipelineConfig, samples_dir: Path, staging: Path) -> None:
    """The positive and negative SFT sets (prompt/completion) from the labelled samples."""
    positive, negative = build_sft_sets(
        load_from_disk(str(samples_dir)),
        positive_per_question=config.positive_per_question,
        negative_top_p=config.negative_top_p,
        reference_fallback=config.reference_fallback,
    )
    for side, rows in (("positive", positive), ("negative", negative)):
        if not rows:
            correctness = "correct" if side == "positive" else "incorrect"
            raise ValueError(
                f"No {correctness} trajectory in {samples_dir} to train the {side} model on: change "
                "temperature, num_samples_per_prompt or task_difficulty"
                + (", or set reference_fallback: true." if side == "positive" else ".")
            )
        Dataset.from_list(rows).save_to_disk(str(staging / side))
    logger.info(f"[{LOG_PREFIX}] SFT sets: {len(positive)} positive, {len(negative)} negative examples")


def _pairs(config: CriticalPipelineConfig, work_dir: Path, staging: Path, launch: dict | None) -> None:
    """Preference pairs from the samples, every completion token scored by the positive/negative models (in the
    processes of the launch flags, if given)."""
    samples_dir = work_dir / "samples"
    pairs = build_preference_pairs(load_from_disk(str(samples_dir)), reference_fallback=config.reference_fallback)
    if len(pairs) == 0:
        raise ValueError(
            f"No preference pair in {samples_dir}: no question has both a correct (or, with "
            "reference_fallback, a reference) and an incorrect trajectory."
        )
    scoring = dict(
        positive=str(work_dir / "positive"),
        negative=str(work_dir / "negative"),
        b=config.score_b,
        batch_size=config.score_batch_size,
        chunk_size=config.score_chunk_size,
        dtype=config.inference_dtype,
    )
    if launch:
        with tempfile.TemporaryDirectory(dir=work_dir, prefix=".pairs-unscored-") as unscored:
            pairs.save_to_disk(unscored)
            run_launched_work("score", {"dataset": unscored, **scoring}, staging, launch)
        scored = load_from_disk(str(staging))
    else:
        scored = score_with_models(pairs, **scoring)
        scored.save_to_disk(str(staging))
    statistics = {"samples": sample_statistics(load_from_disk(str(samples_dir))), "pairs": pair_statistics(scored)}
    (staging / STATISTICS_FILE).write_text(json.dumps(statistics, indent=2) + "\n")
    logger.info(
        f"[{LOG_PREFIX}] scored {len(scored)} preference pairs; "
        f"{statistics['samples']['with_both_share']:.0%} of questions have correct and incorrect samples, "
        f"{statistics['pairs']['own_chosen_share']:.0%} of the chosen responses are the model's own"
    )


def _localization(pairs: Path, staging: Path) -> None:
    """hit@k / MRR of the lowest scores against the first errors (:func:`.localization.localization_report`)."""
    report = localization_report(load_from_disk(str(pairs)))
    staging.mkdir(parents=True)
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info(f"[{LOG_PREFIX}] localization: {format_localization(report)}")


def _rollout_arguments(config: CriticalPipelineConfig) -> dict:
    """The rollout step's settings (its record too)."""
    return dict(
        num_trajectories=config.rollout_trajectories,
        num_rollouts=config.rollout_samples,
        temperature=config.temperature if config.rollout_temperature is None else config.rollout_temperature,
        max_new_tokens=(
            config.max_new_tokens if config.rollout_max_new_tokens is None else config.rollout_max_new_tokens
        ),
        batch_size=config.sample_batch_size,
        seed=config.seed,
    )


def _rollout(policy: str, pairs: Path, arguments: dict, staging: Path) -> None:
    """cDPO's rollout test from the policy (:func:`.localization.rollout_report`)."""
    model, tokenizer = load_model_and_tokenizer(policy)
    report = rollout_report(load_from_disk(str(pairs)), model, tokenizer, **arguments)
    staging.mkdir(parents=True)
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info(f"[{LOG_PREFIX}] rollout test: {format_rollout(report)}")
