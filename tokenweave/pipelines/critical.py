"""The critical-token pipeline of cDPO ("Critical Tokens Matter", Lin et al., ICML 2025, arXiv 2411.19943).

``tokenweave critical --config configs/critical_tiny.yaml [--key value ...]`` runs, into one work dir:

=========  ================  ==================================================================================
step       output            what
=========  ================  ==================================================================================
samples    ``samples/``      (a) K trajectories per question from the base model, (b) each labelled ``correct``
                             by the answer reward (:func:`~tokenweave.inference.sampling.sample_trajectories`)
sft_data   ``sft_data/``     ``positive/``: correct trajectories, ``positive_per_question`` per question with
                             the most frequent correct answer (with ``reference_fallback``, plus every question's
                             reference solution); ``negative/``: the incorrect ones whose answers cover
                             ``negative_top_p`` of a question's incorrect answers (prompt/completion;
                             :func:`~tokenweave.data.preferences.build_sft_sets`)
positive   ``positive/``     (c) the ``sft_config`` run (LoRA SFT) of the base model on ``sft_data/positive``
negative   ``negative/``     (c) the same run on ``sft_data/negative``
pairs      ``pairs/``        (d, e) preference pairs (:func:`~tokenweave.data.preferences.build_preference_pairs`)
                             with ``chosen_scores``/``rejected_scores`` (one critical-token score per completion
                             token, :func:`~tokenweave.inference.scoring.score_dataset`) and
                             ``chosen_tokens``/``rejected_tokens``
cdpo       ``cdpo/``         (f) only with ``cdpo_config``: that run on ``pairs/``
dpo        ``dpo/``          only with ``compare_dpo``: the same run with ``loss_type: sigmoid`` (plain DPO on the
                             same pairs and budget: the baseline of cDPO)
=========  ================  ==================================================================================

Scoring and pairing are one step because the completion tokens of a pair depend on both of its responses
(DPOTrainer starts the completion after the shortest common prefix of prompt and prompt+chosen /
prompt+rejected), so only the pair fixes which tokens get scores.

The training runs are run configs (``sft_config``, ``cdpo_config``: YAML files of ``tokenweave train``), parsed
before any step runs and trained with :func:`tokenweave.train.train_from_args`; the pipeline replaces their
``model_name_or_path`` (with ``model``), ``dataset_name`` and ``output_dir``, and the SFT runs' ``seed`` (with
``seed``). Every step is resumable and records the config it was made from (:mod:`tokenweave.pipelines.steps`):
rerunning skips finished steps, and a finished step whose config changed stops the pipeline with what changed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

from ..config import RunArguments, config_file_of, config_keys, load_run_config, read_config_file
from ..data.preferences import build_preference_pairs, build_sft_sets
from ..inference.sampling import sample_trajectories
from ..inference.scoring import load_contrastive_models, score_dataset
from ..train import train_from_args
from .steps import Step, run_steps

LOG_PREFIX = "critical"
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
        if self.sft_config is None:
            raise ValueError(
                "sft_config is required: the run config (method: sft) of the positive and negative models, e.g. "
                "configs/critical_sft_tiny.yaml."
            )
        for name in ("sft_config", "cdpo_config"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path!r} does not exist.")


def parse_pipeline_config(argv: list[str] | None = None) -> CriticalPipelineConfig:
    """Parse ``--config file.yaml [--key value ...]`` (``tokenweave critical``) into a :class:`CriticalPipelineConfig`.

    A YAML key or flag that is not a field is a ``ValueError`` naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_keys(config_file_of(argv))
    (pipeline_config,) = TrlParser((CriticalPipelineConfig,)).parse_args_and_config(argv)
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

    Its dataset and output directory are set per step with ``dataclasses.replace``, which reruns the dataclasses'
    ``__post_init__``: for SFT and DPO configs that equals parsing the same keys on the command line (a test
    checks it); TRL's ``GRPOConfig`` refuses it (its ``__post_init__`` derives ``generation_batch_size``).
    """

    run_args: RunArguments
    training_args: TrainingArguments
    model_args: ModelConfig
    record: dict

    def train(self, dataset: Path, output_dir: Path) -> None:
        """Train this run on ``dataset`` into ``output_dir`` (:func:`tokenweave.train.train_from_args`)."""
        train_from_args(
            replace(self.run_args, dataset_name=str(dataset)),
            replace(self.training_args, output_dir=str(output_dir)),
            self.model_args,
        )


def training_runs(config: CriticalPipelineConfig) -> dict[str, TrainingRun]:
    """The pipeline's training runs (``sft``, and ``cdpo`` / ``dpo`` when configured) from their run configs.

    Each run config is parsed and checked here, so a bad one fails before any step runs.
    """
    runs = {"sft": _training_run(config, config.sft_config, "sft", seed=config.seed)}
    if config.cdpo_config is not None:
        runs["cdpo"] = _training_run(config, config.cdpo_config, "dpo")
    if config.compare_dpo:
        cdpo = runs["cdpo"]
        runs["dpo"] = TrainingRun(
            cdpo.run_args,
            replace(cdpo.training_args, loss_type="sigmoid"),
            cdpo.model_args,
            {**cdpo.record, "loss_type": "sigmoid"},
        )
    return runs


def _training_run(config: CriticalPipelineConfig, path: str, method: str, seed: int | None = None) -> TrainingRun:
    """The run config at ``path`` on the pipeline's model (and ``seed``), checked to be a ``method`` run."""
    run_args, training_args, model_args = load_run_config(path)
    if run_args.method != method:
        raise ValueError(f"{path} is a {run_args.method!r} run; the pipeline needs a {method!r} run config there.")
    record = {key: value for key, value in read_config_file(path).items() if key not in _PIPELINE_RUN_KEYS}
    record["model_name_or_path"] = config.model
    if seed is not None:
        training_args = replace(training_args, seed=seed)
        record["seed"] = seed
    return TrainingRun(run_args, training_args, replace(model_args, model_name_or_path=config.model), record)


def run_critical_pipeline(config: CriticalPipelineConfig) -> dict[str, Path]:
    """Run every step not done yet (module docstring); returns each step's output directory."""
    work_dir = Path(config.work_dir)
    runs = training_runs(config)
    samples, sft_data = work_dir / "samples", work_dir / "sft_data"
    sampling = _sampling_arguments(config)
    steps = [
        Step("samples", sampling, lambda staging: _sample(sampling, staging)),
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
        *(_training_step(side, runs["sft"], sft_data / side, "sft_data") for side in ("positive", "negative")),
        Step(
            "pairs",
            {
                "reference_fallback": config.reference_fallback,
                "score_b": config.score_b,
                "score_batch_size": config.score_batch_size,
                "score_chunk_size": config.score_chunk_size,
            },
            lambda staging: _pairs(config, work_dir, staging),
            inputs=("samples", "positive", "negative"),
        ),
        *(_training_step(name, runs[name], work_dir / "pairs", "pairs") for name in ("cdpo", "dpo") if name in runs),
    ]
    return run_steps(work_dir, steps, LOG_PREFIX)


def _training_step(name: str, run: TrainingRun, dataset: Path, input_step: str) -> Step:
    """The step ``name`` that trains ``run`` on ``dataset``, the output of the step ``input_step``."""
    return Step(name, {"run": run.record}, lambda staging: run.train(dataset, staging), inputs=(input_step,))


def _sampling_arguments(config: CriticalPipelineConfig) -> dict:
    """The arguments of :func:`~tokenweave.inference.sampling.sample_trajectories` in step (a, b): the samples step's
    record too."""
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
    )


def _sample(sampling: dict, staging: Path) -> None:
    samples = sample_trajectories(**sampling)
    print(f"[{LOG_PREFIX}] sampled {len(samples)} trajectories, {sum(samples['correct'])} correct")
    samples.save_to_disk(str(staging))


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
    print(f"[{LOG_PREFIX}] SFT sets: {len(positive)} positive, {len(negative)} negative examples")


def _pairs(config: CriticalPipelineConfig, work_dir: Path, staging: Path) -> None:
    """Preference pairs from the samples, every completion token scored by the positive/negative models."""
    samples_dir = work_dir / "samples"
    pairs = build_preference_pairs(load_from_disk(str(samples_dir)), reference_fallback=config.reference_fallback)
    if len(pairs) == 0:
        raise ValueError(
            f"No preference pair in {samples_dir}: no question has both a correct (or, with "
            "reference_fallback, a reference) and an incorrect trajectory."
        )
    positive, negative, tokenizer = load_contrastive_models(str(work_dir / "positive"), str(work_dir / "negative"))
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
    print(f"[{LOG_PREFIX}] scored {len(scored)} preference pairs")
