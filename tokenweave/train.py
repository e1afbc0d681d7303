"""Train from one YAML file: ``tokenweave train --config configs/X.yaml [--key value ...]``.

The same entry point runs under accelerate / DeepSpeed::

    accelerate launch --config_file launch/zero3.yaml -m tokenweave.train --config configs/X.yaml

Code that trains (the pipelines, the tests) calls the typed entry point :func:`train_from_args` with the three
config dataclasses; :func:`train` is the command line, which parses them and calls it.

Everything that can be wrong with the input (config keys, model path, dataset columns, reward names) is
checked before the trainer is built; a run that fails before training starts leaves no output directory
behind it if it created one. At the end the model (or LoRA adapter) is saved to ``output_dir`` together
with ``run_info.json``, a record of how the run was distributed and what it reported.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers.utils import logging
from trl import get_peft_config, get_quantization_config

from .checks import ConfigError, check_options
from .config import given_run_config, parse_run_config
from .data.loading import checked_rows, load_mixture, load_run_dataset
from .models import resolve_model
from .preflight import check_dataset_names
from .provenance import provenance
from .resume import (
    RunIdentityCallback,
    check_same_run,
    finished_run,
    resume_checkpoint,
    resume_value,
    run_identity,
)
from .rewards import get_reward_func
from .run_files import RUN_CONFIG_FILE, RUN_INFO_FILE
from .trainers import METHODS
from .trainers.card import token_method
from .trainers.signals import active_signal_classes

PR_SET_PDEATHSIG = 1  # linux/prctl.h
logger = logging.get_logger(__name__)


def run_dataset_kwargs(run_args) -> dict:
    """The keyword arguments of :func:`~tokenweave.data.loading.load_run_dataset` a run's config gives (the method,
    the dataset's config and the built-in tasks' options), for every split: what a run loads, and what another
    command that reads the run's data (``tokenweave score-tokens``) loads the same way."""
    return dict(
        method=run_args.method,
        dataset_config=run_args.dataset_config,
        difficulty=run_args.task_difficulty,
        seed=run_args.task_seed,
        list_length=run_args.task_list_length,
        num_candidates=run_args.task_num_candidates,
        noise_share=run_args.task_noise_share,
        noise_kinds=run_args.task_noise_kinds,
    )


def load_run_splits(run_args, training_args):
    """``(train dataset, eval dataset or None)`` of a run: TRL's mixture (``datasets:``) or ``dataset_name``'s splits;
    with ``test_split_size``, the eval rows held out of the train data (seeded with the run's seed) instead of
    ``dataset_test_split``. A GRPO train dataset with fewer prompts than one generation batch takes is refused: TRL's
    sampler would give no batch, and the run would train 0 steps and save the base model as if trained."""
    if run_args.datasets:
        train_dataset = load_mixture(run_args.datasets, run_args.method, streaming=run_args.streaming,
                                     num_examples=run_args.num_train_examples)
    else:
        train_dataset = load_run_dataset(run_args.dataset_name, run_args.dataset_train_split,
                                         num_examples=run_args.num_train_examples,
                                         streaming=run_args.dataset_streaming, **run_dataset_kwargs(run_args))
    eval_dataset = None
    if run_args.test_split_size is not None:
        if run_args.is_streaming:
            raise ConfigError("test_split_size splits a dataset by its length, which a streamed one has not: give "
                              "dataset_test_split instead, or turn streaming off.")
        size = run_args.test_split_size
        splits = train_dataset.train_test_split(test_size=size if size < 1 else int(size), seed=training_args.seed)
        train_dataset, eval_dataset = splits["train"], splits["test"]
    elif training_args.eval_strategy != "no" and not run_args.datasets:
        eval_dataset = load_run_dataset(run_args.dataset_name, run_args.dataset_test_split,
                                        num_examples=run_args.num_test_examples, **run_dataset_kwargs(run_args))
    elif training_args.eval_strategy != "no":
        raise ConfigError("A dataset mixture (datasets:) has no test split of its own: set test_split_size to hold "
                          "out eval rows, or eval_strategy: no.")
    if run_args.method == "grpo" and not run_args.is_streaming:  # generation_batch_size is over all processes
        prompts = training_args.generation_batch_size // training_args.num_generations
        if len(train_dataset) < prompts:
            raise ConfigError(f"The train data has {len(train_dataset)} prompts, fewer than one generation batch takes "
                              f"({prompts}: generation_batch_size {training_args.generation_batch_size} / "
                              f"num_generations {training_args.num_generations}): the run would train 0 steps. Give "
                              "more prompts or a smaller batch.")
    return train_dataset, eval_dataset


def build_trainer(run_args, training_args, model_args):
    """Check the inputs and build the method's trainer (no training yet)."""
    check_options(model_args)  # the other two configs check themselves in __post_init__
    check_dataset_names(run_args)  # here, not when parsing: a pipeline's config names data its earlier steps write
    if training_args.use_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(
            "An FSDP launch of a use_cpu run: accelerate turns FSDP on for accelerator devices only, so this would "
            "silently be plain data parallelism. On CPU, launch with cpu_ddp, cpu_zero2 or cpu_zero3."
        )
    trainer_class = METHODS[run_args.method][0]
    model_path = resolve_model(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model_init_kwargs = {"revision": model_args.model_revision, "dtype": dtype}
    if model_args.attn_implementation is not None:
        model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    train_dataset, eval_dataset = load_run_splits(run_args, training_args)
    for split, dataset in ((run_args.dataset_train_split, train_dataset), (run_args.dataset_test_split, eval_dataset)):
        checked, name = checked_rows(dataset), f"{run_args.data_name} (split {split!r})"
        for token_signal in active_signal_classes(training_args) if dataset is not None else ():
            token_signal.check_dataset(checked, training_args, name)
    peft_config = get_peft_config(model_args)
    if run_args.lora_layers is not None:
        if peft_config is None:
            raise ValueError("lora_layers puts LoRA adapters on some layers: it needs use_peft: true.")
        peft_config.layers_to_transform = list(run_args.lora_layers)
    trainer_kwargs = {}
    if run_args.method == "grpo":
        trainer_kwargs["reward_funcs"] = [get_reward_func(name) for name in run_args.reward_funcs]
    trainer = trainer_class(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        **trainer_kwargs,
    )
    trainer.card_dataset_name = run_args.data_name  # every card it writes, push_to_hub's too
    return trainer


def run_info(trainer, run_args, model_args, train_metrics: dict) -> dict:
    """What the run was: method, model, how it was distributed, and what it logged."""
    accelerator = trainer.accelerator
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    method = token_method(trainer.args, trainer.trainer_kind)
    return {
        "tokenweave": provenance(),
        "method": run_args.method,
        "token_method": method["method"],
        "loss_type": method["loss_type"],
        "policy_loss": method["policy_loss"],
        "token_signals": method["token_signals"],
        "method_options": method["options"],
        "papers": [f"arXiv:{paper.arxiv}" for paper in method["papers"]],
        "token_metric_prefixes": list(trainer.token_metric_prefixes),
        "model_name_or_path": model_args.model_name_or_path,
        "use_peft": model_args.use_peft,
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "model_wrapper": type(trainer.model_wrapped).__name__,
        "zero_stage": deepspeed_plugin.zero_stage if deepspeed_plugin is not None else None,
        "activation_checkpointing": trainer.args.activation_checkpointing,
        "activation_checkpointing_kwargs": trainer.args.activation_checkpointing_kwargs,
        "global_step": trainer.state.global_step,
        "planned_steps": trainer.state.max_steps,
        "num_train_epochs": trainer.args.num_train_epochs,
        "completed": False,
        "train_metrics": train_metrics,
        "log_history": trainer.state.log_history,
    }


def exit_with_launcher() -> None:
    """Under a launcher (``accelerate launch`` / ``torchrun`` set ``LOCAL_RANK``), have Linux send this worker SIGTERM
    when the process that started it dies (``prctl(PR_SET_PDEATHSIG)``): ``kill -9`` of the launcher then stops
    the run instead of leaving its workers training and writing checkpoints. A no-op on one process and off Linux."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def check_writable(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that cannot be written (itself, or the nearest folder above it that exists), before
    anything loads: otherwise the run would find out when it saves, after training."""
    existing = next(path for path in (output_dir.absolute(), *output_dir.absolute().parents) if path.exists())
    what = "it" if existing == output_dir.absolute() else f"the folder above it that exists, {str(existing)!r},"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        with tempfile.TemporaryFile(dir=existing):  # a real write: permission bits do not tell for root or mounts
            pass
    except OSError as error:
        raise ConfigError(f"output_dir {str(output_dir)!r}: {what} cannot be written ({type(error).__name__}); give a "
                          "writable output_dir.") from None


def train_from_args(
    run_args, training_args, model_args, *, finish_distributed: bool = True, run_config: dict | None = None
) -> dict:
    """Train one run from its three config dataclasses and save it; returns the run info.

    The typed entry point: ``run_args`` is a :class:`~tokenweave.config.RunArguments`, ``training_args`` the
    method's TRL config, ``model_args`` TRL's ``ModelConfig`` (as :func:`~tokenweave.config.parse_run_config`
    returns them; pipelines derive them with ``dataclasses.replace``). ``finish_distributed=False`` leaves the
    process group up after the run, for several runs in one launch; the last one must finish it.

    What ``output_dir`` gets, in this order (so that ``push_to_hub``, which uploads the directory when the model is
    saved, uploads all of it): ``run_info.json`` (:func:`run_info`), ``run_config.yaml`` (``run_config``, the keys
    that made the run, when given: ``tokenweave train --config`` it reproduces the run), the model or LoRA
    adapter, and the model card (``README.md``, naming the token-level method: :mod:`tokenweave.trainers.card`).
    """
    exit_with_launcher()
    output_dir = Path(training_args.output_dir)
    check_writable(output_dir)
    created_output_dir = not output_dir.exists()
    identity = run_identity(run_args, training_args, model_args, METHODS[run_args.method][0].trainer_kind)
    finished = finished_run(output_dir, training_args) if resume_value(training_args.resume_from_checkpoint) else None
    if finished is not None:
        logger.warning("%s has finished (step %s): nothing to resume; its saved model is left as it is.",
                       output_dir, finished["global_step"])
        return finished
    checkpoint = resume_checkpoint(output_dir, training_args.resume_from_checkpoint)
    if checkpoint is not None:
        check_same_run(checkpoint, identity)
    try:
        trainer = build_trainer(run_args, training_args, model_args)
    except BaseException:
        if created_output_dir and trainer_is_main_process():
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    trainer.add_callback(RunIdentityCallback(identity))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    info = run_info(trainer, run_args, model_args, result.metrics)
    if trainer.accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        if run_config is not None:
            (output_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=False))
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(model_name=output_dir.name)
    info["completed"] = True  # the model and the card are saved: a resume of this run has nothing left to do
    if trainer.accelerator.is_main_process:
        (output_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    if finish_distributed:  # every rank done with the files, then Trainer.end(): trackers and the process group
        trainer.accelerator.wait_for_everyone()
        trainer.end()
    return info


def train(argv: list[str] | None = None) -> dict:
    """The command line: parse ``--config file.yaml [--key value ...]``, then :func:`train_from_args`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configs = parse_run_config(argv)
    return train_from_args(*configs, run_config={"method": configs[0].method, **given_run_config(argv, *configs)})


def trainer_is_main_process() -> bool:
    """True on the process that owns shared files (rank 0, or the only process). Read from the launcher's ``RANK``,
    not accelerate's state: it answers before that state exists, for a run refused while its trainer is built."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> None:
    train(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
