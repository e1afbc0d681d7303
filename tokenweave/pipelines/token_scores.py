"""``tokenweave score-tokens``: TokenCleaning's offline token scores and labels for an SFT run (arXiv 2502.01968).

    tokenweave score-tokens --config configs/sft_token_cleaning_tiny.yaml [--output DIR]
    tokenweave train --config configs/sft_token_cleaning_tiny.yaml --dataset_name DIR

From the SFT run config that training then uses (:func:`score_tokens`, with the config's three dataclasses):

1. the train split as the run loads it (``dataset_name``, ``num_train_examples``, ...:
   :func:`~tokenweave.data.loading.load_run_dataset`), tokenised by TRL 1.16's own ``SFTTrainer._prepare_dataset``
   (:func:`sft_labelled_rows`), untruncated, as ``TokenSFTTrainer`` prepares a dataset before its signals' columns
   are added: the labelled tokens (``labels != -100``) are exactly those the trainer's per-token columns align with;
2. two frozen models, one after the other, on one device (the first GPU unless ``use_cpu``, else the CPU): the base
   (``model_name_or_path``, the policy's initial weights) and the reference (``reference_model_path``), each loaded as
   the run loads its models (``dtype``, ``model_revision``, ``attn_implementation``; the reference in
   ``frozen_models_dtype`` when set; a LoRA adapter directory merged into its base), read every row without gradient, in batches of rows of similar length
   (``--batch_size``, default ``per_device_eval_batch_size``), through TRL's fused LM head in float32
   (:func:`label_logps`): log π(x_ij) of every label token;
3. per label token the score ``L_base − L_ref`` (L = −log π) and the label: 1 for the top ``int(n · ratio)`` scores
   (``token_cleaning_ratio``) over the whole dataset (``token_cleaning_level: global``) or of each row (``sample``),
   ties in dataset order, as the released ``generate_token_label.py`` (:func:`select_tokens`);
4. the raw dataset (its own columns, as loaded) with three per-label-token columns, one value per token SFTTrainer
   labels before truncation (what the token signals read): ``reference_logps`` (log π_ref: Rho-1 can read it instead
   of an online reference), ``token_cleaning_scores`` (the score; ``token_cleaning_scores_column``) and
   ``token_cleaning_labels`` (0/1; ``token_cleaning_column``), written with ``save_to_disk`` (``dataset_name: <DIR>``
   reads it back) atomically, with the settings it was made from (``step_config.json``,
   :mod:`tokenweave.pipelines.steps`): run again with the same settings it is reused; with others it is refused,
   naming what changed.

A label at position 0 (a language-modelling row's first token: nothing predicts it, and TRL's loss never sees it) has
no loss: it gets log-prob 0, score 0, label 0, and is not ranked. The default output directory is the run's
``output_dir`` with ``_token_scores`` appended.
"""

from __future__ import annotations

import json
import math
import time
from copy import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from torch import nn
from tqdm.auto import tqdm

from ..data.loading import load_run_dataset
from ..models import adapter_base_model, resolve_model
from ..train import run_dataset_kwargs
from ..trainers.token_cleaning import TOKEN_CLEANING_LEVELS
from .steps import STEP_RECORD, Step, run_steps

REFERENCE_LOGPS_COLUMN = "reference_logps"
OUTPUT_SUFFIX = "_token_scores"
"""The default output directory: the run's ``output_dir`` with this appended."""
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)

# The settings the output is made from (its record): what loads the rows, tokenises them, loads the two models, ranks.
RECORD_FIELDS = {
    "run": ("dataset_name", "dataset_config", "dataset_train_split", "num_train_examples", "task_difficulty",
            "task_seed", "task_list_length", "task_num_candidates", "task_noise_share", "task_noise_kinds"),
    "model": ("model_name_or_path", "model_revision", "dtype", "attn_implementation"),
    "training": ("reference_model_path", "frozen_models_dtype", "model_init_kwargs", "trust_remote_code",
                 "dataset_text_field", "completion_only_loss", "assistant_only_loss", "eos_token", "chat_template_path",
                 "token_cleaning_ratio", "token_cleaning_level", "token_cleaning_column",
                 "token_cleaning_scores_column"),
}


def default_output(training_args) -> Path:
    """Where the scored dataset goes without ``--output``: ``<output_dir>_token_scores``."""
    return Path(str(training_args.output_dir).rstrip("/") + OUTPUT_SUFFIX)


def score_tokens_record(run_args, training_args, model_args) -> dict:
    """The settings the scored dataset is made from (:data:`RECORD_FIELDS`), as JSON data."""
    configs = {"run": run_args, "model": model_args, "training": training_args}
    record = {name: getattr(configs[part], name) for part, names in RECORD_FIELDS.items() for name in names}
    return json.loads(json.dumps(record, default=str))


# -- tokenisation: TRL's own -------------------------------------------------------------------------------------

def sft_tokenizer(training_args, model_args):
    """The tokenizer SFTTrainer uses for a model path (TRL 1.16, ``SFTTrainer.__init__``, sft_trainer.py lines
    712-744 and 746-756): ``AutoProcessor`` of the model (a processor's tokenizer), ``eos_token`` set, a
    ``chat_template_path`` template file read. A template cloned from another model (which adds tokens to the model)
    is refused."""
    from transformers import AutoProcessor, ProcessorMixin

    processor = AutoProcessor.from_pretrained(resolve_model(model_args.model_name_or_path),
                                              revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    tokenizer = processor.tokenizer if isinstance(processor, ProcessorMixin) else processor
    if training_args.eos_token is not None:
        if training_args.eos_token not in tokenizer.get_vocab():
            raise ValueError(f"eos_token {training_args.eos_token!r} is not in the tokenizer's vocabulary.")
        tokenizer.eos_token = training_args.eos_token
    path = training_args.chat_template_path
    if path is not None:
        if not (Path(path).is_file() and path.endswith((".jinja", ".j2"))):
            raise ValueError(f"score-tokens reads a chat_template_path template file (.jinja, .j2), not {path!r}: a "
                             "template cloned from another model adds tokens to the model.")
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
    return tokenizer


def sft_labelled_rows(dataset: Dataset, tokenizer, training_args) -> Dataset:
    """Every row's ``input_ids`` and ``labels`` (a dataset of these two columns, one row per row of ``dataset``) as TRL
    1.16's ``SFTTrainer._prepare_dataset`` makes them, untruncated and unshuffled (as ``TokenSFTTrainer`` prepares a
    dataset before adding its signals' columns). TRL's
    method runs on a stand-in of the trainer with the three attributes it reads, set as ``SFTTrainer.__init__`` sets
    them (sft_trainer.py lines 940-964: the training chat template for ``assistant_only_loss``, completion-only loss
    by default for prompt-completion rows)."""
    from trl import SFTTrainer
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )
    from trl.data_utils import is_conversational

    sample = next(iter(dataset))
    if "image" in sample or "images" in sample:
        raise ValueError("score-tokens scores text datasets: this one has images.")
    if training_args.assistant_only_loss and not is_conversational(sample):
        raise ValueError("assistant_only_loss needs a conversational dataset.")
    chat_template = None
    if training_args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        chat_template = get_training_chat_template(tokenizer)
    completion_only_loss = training_args.completion_only_loss
    if completion_only_loss is None:
        completion_only_loss = "prompt" in sample and "completion" in sample
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=chat_template,
                              completion_only_loss=completion_only_loss)
    untruncated = copy(training_args)
    untruncated.max_length, untruncated.shuffle_dataset = None, False
    prepared = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, untruncated, False, None, "train")
    if len(prepared) != len(dataset):
        raise RuntimeError(f"TRL's preparation gave {len(prepared)} rows for {len(dataset)}.")
    return prepared.select_columns(["input_ids", "labels"])


# -- the models' log-probs ---------------------------------------------------------------------------------------

def load_scoring_model(path: str, training_args, model_args, device: torch.device, dtype=None) -> nn.Module:
    """A frozen model from ``path`` (a directory or a built-in name) as a run loads its models (``dtype``, or
    ``model_args.dtype``; ``model_revision``, ``attn_implementation``, ``model_init_kwargs``), on ``device``, in eval
    mode, with TRL's fused LM head projecting in float32. A LoRA adapter directory (a ``use_peft`` run's output, as the
    paper's reference) is loaded on its base model and merged."""
    from trl.trainer.utils import (
        add_fused_lm_head,
        create_model_from_path,
        disable_dropout_in_model,
    )

    kwargs = {"revision": model_args.model_revision, "dtype": dtype or model_args.dtype,
              "trust_remote_code": training_args.trust_remote_code, **(training_args.model_init_kwargs or {})}
    if model_args.attn_implementation is not None:
        kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    kwargs["device_map"] = None
    path = resolve_model(path)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        base = resolve_model(adapter_base_model(adapter_config.parent))
        model = PeftModel.from_pretrained(create_model_from_path(base, **kwargs), path).merge_and_unload()
    else:
        model = create_model_from_path(path, **kwargs)
    disable_dropout_in_model(model)
    model.requires_grad_(False)
    model.eval()
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    return model.to(device)


@torch.no_grad()
def label_logps(model: nn.Module, rows: Dataset, *, batch_size: int, pad_token_id: int,
                desc: str = "scoring") -> list[torch.Tensor]:
    """log π(x_ij) of every label token of every row of ``rows`` (``input_ids``, ``labels``: float32, one tensor per
    row, one value per label: 0 for a label at position 0, which nothing predicts), from ``batch_size`` rows at a time,
    longest first, right-padded, through TRL's fused head (no ``[B, T, V]`` logits), with a progress bar."""
    device = next(model.parameters()).device
    lengths = pc.list_value_length(rows.with_format("arrow")[:]["input_ids"]).to_numpy()
    order = np.argsort(-lengths, kind="stable").tolist()
    results: list[torch.Tensor | None] = [None] * len(order)
    with tqdm(total=len(order), desc=desc, unit="row") as progress:
        for begin in range(0, len(order), batch_size):
            batch = order[begin : begin + batch_size]
            read = rows[batch]
            width = len(read["input_ids"][0])
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for index, (ids, row_labels) in enumerate(zip(read["input_ids"], read["labels"], strict=True)):
                input_ids[index, : len(ids)] = torch.tensor(ids)
                labels[index, : len(ids)] = torch.tensor(row_labels)
                attention_mask[index, : len(ids)] = 1
            output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           labels=labels.to(device), fused_lm_head=True)
            logps = output.log_probs.float().cpu()  # [B, width - 1]: entry t is about token t + 1
            for index, row in enumerate(batch):
                values = logps[index][labels[index, 1:] != -100]
                if labels[index, 0] != -100:
                    values = torch.cat([values.new_zeros(1), values])
                results[row] = values
            progress.update(len(batch))
    return results


# -- the selection -------------------------------------------------------------------------------------------------

def kept_count(count: int, ratio: float) -> int:
    """``int(count · ratio)``, the floor, as the released code keeps, but read to 6 decimals first so that a float
    product just below an integer is that integer (0.29 · 100 keeps 29, where the released ``int()`` keeps 28)."""
    return math.floor(round(count * ratio, 6))


def select_tokens(scores: list[np.ndarray], ranked: list[np.ndarray], ratio: float, level: str) -> list[np.ndarray]:
    """TokenCleaning's labels (``generate_token_label.py``): 1 for the top ``int(n · ratio)`` of the ``n`` ranked
    tokens (``ranked``: a boolean per token), by descending score, over all rows (``global``) or within each row
    (``sample``); equal scores in dataset order (row, then position: the released stable sort). 0 elsewhere."""
    if level not in TOKEN_CLEANING_LEVELS:
        raise ValueError(f"token_cleaning_level must be one of {TOKEN_CLEANING_LEVELS}, got {level!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"token_cleaning_ratio must be in (0, 1], got {ratio!r}")
    labels = [np.zeros(len(row), dtype=np.int8) for row in scores]
    if level == "sample":
        for row_scores, row_ranked, row_labels in zip(scores, ranked, labels, strict=True):
            positions = np.flatnonzero(row_ranked)
            order = np.argsort(-row_scores[positions], kind="stable")
            row_labels[positions[order[: kept_count(len(positions), ratio)]]] = 1
        return labels
    if not scores:
        return labels
    flat_ranked = np.concatenate(ranked)
    positions = np.flatnonzero(flat_ranked)  # ascending: dataset order, which the stable sort keeps among ties
    order = np.argsort(-np.concatenate(scores)[positions], kind="stable")
    flat = np.zeros(len(flat_ranked), dtype=np.int8)
    flat[positions[order[: kept_count(len(positions), ratio)]]] = 1
    return np.split(flat, np.cumsum([len(row) for row in scores])[:-1])


# -- the command -----------------------------------------------------------------------------------------------------

def score_tokens(run_args, training_args, model_args, output: str | Path | None = None, *,
                 batch_size: int | None = None) -> dict:
    """Score and label the run's train split into ``output`` (module docstring; None: :func:`default_output`); reused
    when it holds the output of the same settings. Returns :func:`summarize`'s summary of the dataset written."""
    if run_args.method != "sft":
        raise ValueError(f"score-tokens scores the label tokens of an SFT run: the config's method is "
                         f"{run_args.method!r}.")
    if training_args.reference_model_path is None:
        raise ValueError("score-tokens needs reference_model_path, the reference model (L_ref), next to "
                         "model_name_or_path (the base model, L_base).")
    output = Path(output if output is not None else default_output(training_args)).expanduser().absolute()
    started = time.perf_counter()
    reused = (output / STEP_RECORD).exists()

    def build(directory: Path) -> None:
        write_scored_dataset(run_args, training_args, model_args, directory, batch_size=batch_size)

    step = Step(output.name, score_tokens_record(run_args, training_args, model_args), build)
    run_steps(output.parent, [step], "score-tokens")
    summary = summarize(load_from_disk(str(output)), training_args)
    return summary | {"output": str(output), "reused": reused, "seconds": time.perf_counter() - started}


def write_scored_dataset(run_args, training_args, model_args, directory: Path, *, batch_size: int | None = None):
    """The work of :func:`score_tokens`, into ``directory`` (``save_to_disk``)."""
    dataset = load_run_dataset(run_args.dataset_name, run_args.dataset_train_split,
                               num_examples=run_args.num_train_examples, **run_dataset_kwargs(run_args))
    names = (REFERENCE_LOGPS_COLUMN, training_args.token_cleaning_scores_column, training_args.token_cleaning_column)
    dataset = dataset.remove_columns([name for name in names if name in dataset.column_names])
    tokenizer = sft_tokenizer(training_args, model_args)
    rows = sft_labelled_rows(dataset, tokenizer, training_args)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = torch.device("cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu")
    batch_size = batch_size or training_args.per_device_eval_batch_size
    logps = {}
    for name, path, dtype in (("base", model_args.model_name_or_path, None),
                              ("reference", training_args.reference_model_path, training_args.frozen_models_dtype)):
        model = load_scoring_model(path, training_args, model_args, device, dtype)
        logps[name] = label_logps(model, rows, batch_size=batch_size, pad_token_id=pad_token_id,
                                  desc=f"score-tokens: {name} model")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # L_base − L_ref = log π_ref − log π_base, in float32
    scores = [(reference - base).numpy() for base, reference in zip(logps["base"], logps["reference"], strict=True)]
    for row, row_scores in enumerate(scores):
        if not np.isfinite(row_scores).all():
            raise ValueError(f"row {row}: a model gave a label token probability 0 (a score is not finite).")
    first_labelled = pc.list_element(rows.with_format("arrow")[:]["labels"], 0).to_numpy() != -100
    ranked = [np.arange(len(row_scores)) >= first  # a label at position 0 is not ranked
              for row_scores, first in zip(scores, first_labelled, strict=True)]
    labels = select_tokens(scores, ranked, training_args.token_cleaning_ratio, training_args.token_cleaning_level)
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(row) for row in scores])]), pa.int32())

    def per_token(rows_values, dtype) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(rows_values).astype(dtype)))

    values = (per_token([row.numpy() for row in logps["reference"]], np.float32), per_token(scores, np.float32),
              per_token(labels, np.int8))
    columns = Dataset(pa.table(dict(zip(names, values, strict=True))))
    concatenate_datasets([dataset, columns], axis=1).save_to_disk(str(directory))


def summarize(dataset: Dataset, training_args) -> dict:
    """Rows, label tokens, kept tokens and share, and the scores' quantiles (:data:`QUANTILES`) of a scored dataset."""
    table = dataset.with_format("arrow")[:]
    scores = pc.list_flatten(table[training_args.token_cleaning_scores_column]).to_numpy().astype(np.float64)
    kept = int(pc.sum(pc.list_flatten(table[training_args.token_cleaning_column])).as_py() or 0)
    quantiles = np.quantile(scores, QUANTILES).tolist() if len(scores) else [math.nan] * len(QUANTILES)
    return {"rows": len(dataset), "tokens": len(scores), "kept": int(kept),
            "kept_share": kept / len(scores) if len(scores) else math.nan,
            "ratio": training_args.token_cleaning_ratio, "level": training_args.token_cleaning_level,
            "quantiles": dict(zip(QUANTILES, quantiles, strict=True))}


def format_summary(summary: dict) -> str:
    """One line: what :func:`score_tokens` wrote (or reused) and the scores' spread."""
    quantiles = " ".join(f"q{round(q * 100)}={value:.4g}" for q, value in summary["quantiles"].items())
    return (f"score-tokens: {summary['rows']} rows, {summary['tokens']} label tokens, kept {summary['kept']} "
            f"({summary['kept_share']:.1%}; {summary['level']} top {summary['ratio']:g}); scores L_base-L_ref "
            f"{quantiles}; {'reused' if summary['reused'] else 'wrote'} {summary['output']} "
            f"({summary['seconds']:.1f} s)")
