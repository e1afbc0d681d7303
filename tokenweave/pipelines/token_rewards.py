"""``tokenweave token-rewards``: per-token rewards of a DPO run's preference pairs, from frozen models, written as the
columns the ``tgdpo`` and ``treg`` signals read (:mod:`tokenweave.trainers.token_rewards`).

    tokenweave token-rewards --config configs/tgdpo_tiny.yaml --reward_model DIR [--output DIR]
    tokenweave token-rewards --config configs/treg_tiny.yaml [--output DIR]
    tokenweave train --config <the same config> --dataset_name <the output>

From the DPO run config that training then uses (its ``loss_type`` names the rewards):

1. the train split as the run loads it (:func:`~tokenweave.data.loading.load_run_dataset`), each pair tokenised as
   TRL 1.16's ``DPOTrainer`` tokenises it (:func:`~tokenweave.data.token_columns.tokenize_like_dpo`: conversational
   pairs; ``prompt_ids``, ``chosen_ids``, ``rejected_ids``);
2. frozen models, one after the other, on one device (the first GPU unless ``use_cpu``), loaded as the run loads its
   models (:func:`~tokenweave.pipelines.token_scores.load_scoring_model`; a LoRA adapter directory is merged into its
   base), reading every completion without gradient through TRL's fused head in float32
   (:func:`~tokenweave.pipelines.token_scores.label_logps`), ``--batch_size`` sequences at a time:

   - ``tgdpo``: the reward model (``--reward_model``, else ``tgdpo_reward_model_path``) and the run's reference
     (``reference_model_path``, else the policy's initial weights ``model_name_or_path``, TRL's reference) read
     ``prompt + completion``; ``r̂_t = log π_RM − log π_ref``
     (:func:`~tokenweave.losses.tgdpo.tgdpo_token_rewards`, the function the online signal uses);
   - ``treg``: the source model (``treg_reward_source``: the reference, or the policy's initial weights) reads each
     completion after the prompt with ``treg_better_instruction`` and after the prompt with ``treg_worse_instruction``
     appended to its last user message (:func:`revised_prompt`); ``r̂_t = σ(log π(y_t | x_better) − log π(y_t |
     x_worse)) − ½`` (:func:`~tokenweave.losses.treg.treg_token_rewards`);

3. the raw dataset (its own columns, as loaded) with ``chosen_token_rewards`` and ``rejected_token_rewards``
   (``chosen_token_rewards_column`` / ``rejected_token_rewards_column``), one float per token of ``chosen_ids`` /
   ``rejected_ids``, written with ``save_to_disk`` atomically with the settings it was made from (``step_config.json``,
   :mod:`tokenweave.pipelines.steps`): reused when run again with the same settings, refused with others, naming what
   changed. The default output directory is the run's ``output_dir`` with ``_token_rewards`` appended.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from trl.data_utils import _tokenize

from ..data.loading import load_run_dataset
from ..data.token_columns import tokenize_like_dpo
from ..losses.tgdpo import tgdpo_token_rewards
from ..losses.treg import treg_token_rewards
from ..models import resolve_model
from ..train import run_dataset_kwargs
from ..trainers.token_rewards import token_reward_columns
from .steps import STEP_RECORD, Step, run_steps
from .token_scores import QUANTILES, label_logps, load_scoring_model

OUTPUT_SUFFIX = "_token_rewards"
"""The default output directory: the run's ``output_dir`` with this appended."""
REWARD_LOSSES = ("tgdpo", "treg")

# The settings the output is made from (its record), besides the models' paths.
RECORD_FIELDS = {
    "run": ("dataset_name", "dataset_config", "dataset_train_split", "num_train_examples", "task_difficulty",
            "task_seed", "task_list_length", "task_num_candidates", "task_noise_share", "task_noise_kinds"),
    "model": ("model_name_or_path", "model_revision", "dtype", "attn_implementation"),
    "training": ("loss_type", "reference_model_path", "frozen_models_dtype", "model_init_kwargs", "trust_remote_code",
                 "chosen_token_rewards_column", "rejected_token_rewards_column", "treg_reward_source",
                 "treg_better_instruction", "treg_worse_instruction"),
}


def default_output(training_args) -> Path:
    """Where the dataset goes without ``--output``: ``<output_dir>_token_rewards``."""
    return Path(str(training_args.output_dir).rstrip("/") + OUTPUT_SUFFIX)


def reward_models(training_args, model_args, reward_model: str | None) -> dict[str, tuple[str, str | None]]:
    """The frozen models the run's loss reads, by role: ``{role: (path, dtype or None for the run's)}`` (module
    docstring); a ``ValueError`` for a run whose loss has no token rewards, or TGDPO without a reward model."""
    loss = training_args.loss_type[0] if len(training_args.loss_type) == 1 else None
    if loss not in REWARD_LOSSES:
        raise ValueError(f"token-rewards writes the token rewards of loss_type {' or '.join(REWARD_LOSSES)}; the "
                         f"config's loss_type is {training_args.loss_type}.")
    reference = (training_args.reference_model_path or model_args.model_name_or_path,
                 training_args.frozen_models_dtype if training_args.reference_model_path else None)
    if loss == "tgdpo":
        reward_model = reward_model or training_args.tgdpo_reward_model_path
        if reward_model is None:
            raise ValueError("token-rewards for tgdpo needs the reward model (a DPO-trained model): --reward_model "
                             "PATH, or tgdpo_reward_model_path in the config.")
        return {"reward_model": (reward_model, training_args.frozen_models_dtype), "reference": reference}
    if training_args.treg_reward_source == "policy":
        return {"source": (model_args.model_name_or_path, None)}
    return {"source": reference}


def token_rewards_record(run_args, training_args, model_args, models: dict) -> dict:
    """The settings the dataset is made from (:data:`RECORD_FIELDS` and the models), as JSON data."""
    configs = {"run": run_args, "model": model_args, "training": training_args}
    record = {name: getattr(configs[part], name) for part, names in RECORD_FIELDS.items() for name in names}
    return json.loads(json.dumps(record | {"models": models}, default=str))


def dpo_tokenizer(training_args, model_args):
    """The tokenizer DPOTrainer loads for a model path (TRL 1.16, ``DPOTrainer.__init__``: ``AutoProcessor``, a
    processor's tokenizer)."""
    from transformers import AutoProcessor, ProcessorMixin

    processor = AutoProcessor.from_pretrained(resolve_model(model_args.model_name_or_path),
                                              revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    return processor.tokenizer if isinstance(processor, ProcessorMixin) else processor


def revised_prompt(prompt: list[dict], instruction: str) -> list[dict]:
    """T-REG's revision prompt: ``prompt`` (a list of messages) with ``instruction`` appended to its last user
    message, after a blank line."""
    revised = copy.deepcopy(prompt)
    users = [message for message in revised if message.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise ValueError("T-REG's revision prompts append to the last user message: this prompt has no user message "
                         "with text content.")
    users[-1]["content"] = f"{users[-1]['content']}\n\n{instruction}"
    return revised


def _prompt_ids(tokenizer, example: dict, prompt: list[dict]) -> list[int]:
    """``prompt`` through the chat template with the generation prompt, as DPOTrainer tokenises a prompt."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return _tokenize(tokenizer, prompt, add_generation_prompt=True, tools=tools,
                     **example.get("chat_template_kwargs", {}))["input_ids"]


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], *, batch_size: int,
                     pad_token_id: int, desc: str) -> list[torch.Tensor]:
    """log π(y_t | prompt, y_<t) of every completion token (one float32 tensor per completion)."""
    rows = Dataset.from_dict({"input_ids": [p + c for p, c in zip(prompts, completions, strict=True)],
                              "labels": [[-100] * len(p) + c for p, c in zip(prompts, completions, strict=True)]})
    return label_logps(model, rows, batch_size=batch_size, pad_token_id=pad_token_id, desc=desc)


def token_rewards(run_args, training_args, model_args, output: str | Path | None = None, *,
                  reward_model: str | None = None, batch_size: int | None = None) -> dict:
    """Write the run's token rewards into ``output`` (module docstring; None: :func:`default_output`); reused when it
    holds the output of the same settings. Returns :func:`summarize`'s summary of the dataset written."""
    if run_args.method != "dpo":
        raise ValueError(f"token-rewards scores the preference pairs of a DPO run: the config's method is "
                         f"{run_args.method!r}.")
    models = reward_models(training_args, model_args, reward_model)
    output = Path(output if output is not None else default_output(training_args)).expanduser().absolute()
    started = time.perf_counter()
    reused = (output / STEP_RECORD).exists()

    def build(directory: Path) -> None:
        write_rewarded_dataset(run_args, training_args, model_args, models, directory, batch_size=batch_size)

    step = Step(output.name, token_rewards_record(run_args, training_args, model_args, models), build)
    run_steps(output.parent, [step], "token-rewards")
    summary = summarize(load_from_disk(str(output)), training_args)
    return summary | {"output": str(output), "reused": reused, "seconds": time.perf_counter() - started}


def write_rewarded_dataset(run_args, training_args, model_args, models: dict, directory: Path, *,
                           batch_size: int | None = None) -> None:
    """The work of :func:`token_rewards`, into ``directory`` (``save_to_disk``)."""
    dataset = load_run_dataset(run_args.dataset_name, run_args.dataset_train_split,
                               num_examples=run_args.num_train_examples, **run_dataset_kwargs(run_args))
    columns = token_reward_columns(training_args)
    dataset = dataset.remove_columns([name for name in columns if name in dataset.column_names])
    tokenizer = dpo_tokenizer(training_args, model_args)
    examples = list(dataset)
    tokenized = [tokenize_like_dpo(example, tokenizer) for example in examples]
    sides = ("chosen", "rejected")
    completions = [row[f"{side}_ids"] for side in sides for row in tokenized]  # all chosen, then all rejected
    prompts = {"": [row["prompt_ids"] for row in tokenized] * 2}
    if "source" in models:  # T-REG: the two revision prompts
        prompts = {kind: [_prompt_ids(tokenizer, example, revised_prompt(example["prompt"], instruction))
                          for example in examples] * 2
                   for kind, instruction in (("better", training_args.treg_better_instruction),
                                             ("worse", training_args.treg_worse_instruction))}
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = torch.device("cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu")
    batch_size = batch_size or training_args.per_device_eval_batch_size
    logps = {}
    for role, (path, dtype) in models.items():
        model = load_scoring_model(path, training_args, model_args, device, dtype and getattr(torch, dtype))
        for kind, kind_prompts in prompts.items():
            logps[role, kind] = completion_logps(model, kind_prompts, completions, batch_size=batch_size,
                                                 pad_token_id=pad_token_id,
                                                 desc=f"token-rewards: {role} model {kind}".rstrip())
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "source" in models:
        rewards = [treg_token_rewards(better, worse) for better, worse in
                   zip(logps["source", "better"], logps["source", "worse"], strict=True)]
    else:
        rewards = [tgdpo_token_rewards(rm, ref) for rm, ref in
                   zip(logps["reward_model", ""], logps["reference", ""], strict=True)]
    for index, row in enumerate(rewards):
        if not torch.isfinite(row).all():
            raise ValueError(f"pair {index % len(examples)} ({sides[index // len(examples)]}): a model gave a "
                             "completion token probability 0 (a reward is not finite).")
    values = {}
    for column, side_rewards in zip(columns, (rewards[: len(examples)], rewards[len(examples) :]), strict=True):
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(row) for row in side_rewards])]), pa.int32())
        flat = np.concatenate([row.numpy() for row in side_rewards]) if side_rewards else np.zeros(0)
        values[column] = pa.ListArray.from_arrays(offsets, pa.array(flat.astype(np.float32)))
    concatenate_datasets([dataset, Dataset(pa.table(values))], axis=1).save_to_disk(str(directory))


def summarize(dataset: Dataset, training_args) -> dict:
    """Rows, completion tokens and the rewards' mean and quantiles (:data:`QUANTILES`) of each side."""
    summary = {"rows": len(dataset), "loss_type": training_args.loss_type[0]}
    for side, column in zip(("chosen", "rejected"), token_reward_columns(training_args), strict=True):
        values = np.concatenate([np.asarray(row, dtype=np.float64) for row in dataset[column]] or [np.zeros(0)])
        quantiles = np.quantile(values, QUANTILES).tolist() if len(values) else [math.nan] * len(QUANTILES)
        summary[side] = {"tokens": len(values), "mean": float(values.mean()) if len(values) else math.nan,
                         "quantiles": dict(zip(QUANTILES, quantiles, strict=True))}
    return summary


def format_summary(summary: dict) -> str:
    """One line: what :func:`token_rewards` wrote (or reused) and the rewards' spread per side."""
    sides = "; ".join(
        f"{side} {summary[side]['tokens']} tokens mean {summary[side]['mean']:.4g} "
        + " ".join(f"q{round(q * 100)}={value:.4g}" for q, value in summary[side]["quantiles"].items())
        for side in ("chosen", "rejected"))
    return (f"token-rewards ({summary['loss_type']}): {summary['rows']} pairs; {sides}; "
            f"{'reused' if summary['reused'] else 'wrote'} {summary['output']} ({summary['seconds']:.1f} s)")


def pairs_rewards_step(name: str, run, warm_start: str, pairs: Path, reward_model: Path | None,
                       upstream: dict | None = None) -> Step:
    """The step ``<name>_rewards`` that writes the token rewards of ``run``'s loss (a pipeline ``TrainingRun`` whose
    ``loss_type`` is tgdpo or treg) over the pairs dataset ``pairs``, its models the policy ``warm_start`` and, for
    TGDPO, ``reward_model`` (the pipelines' use: the critical-token pairs, scored before training from the warm
    start); ``upstream``: what those were made from (:func:`~.steps.made_from`), recorded too."""

    def build(directory: Path) -> None:
        model_args = replace(run.model_args, model_name_or_path=warm_start)
        models = reward_models(run.training_args, model_args, None if reward_model is None else str(reward_model))
        write_rewarded_dataset(replace(run.run_args, dataset_name=str(pairs)), run.training_args, model_args, models,
                               directory)

    record = {"run": run.record, "reward_model": str(reward_model), "warm_start": warm_start, "pairs": str(pairs)}
    return Step(f"{name}_rewards", record | ({"upstream": upstream} if upstream else {}), build)
