"""Resuming a run (``resume_from_checkpoint``) as a requeued cluster job needs it: from the newest checkpoint that
can be read, never past a finished run, never into another run.

- **Which checkpoint**: ``true`` is the newest ``checkpoint-N`` of ``output_dir`` whose files can be read
  (:func:`checkpoint_problem`: ``trainer_state.json`` parses, the weight files are whole, the optimizer and DeepSpeed
  files are whole zip archives); one that a killed job left half-written is skipped with a warning naming the file,
  and the one before it is used.
- **A finished run** (its ``run_info.json`` marked ``completed``, written again once the model and card are saved,
  at the last step the config asks for) resumes to nothing, with or without checkpoints: :func:`finished_run` says
  so, and ``tokenweave train`` returns the saved run's info without training a step more or saving over the final
  model. A config that asks for more (a larger ``max_steps`` or ``num_train_epochs``) resumes from the checkpoint.
- **The same run**: each checkpoint records what trained it (:data:`RUN_IDENTITY_FILE`: method, loss, policy loss,
  token signals, model; :class:`RunIdentityCallback`); resuming it under a config that differs in any of these is
  refused, naming both.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import struct
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from .checks import ConfigError
from .models import portable_base_model
from .run_files import RUN_IDENTITY_FILE, RUN_INFO_FILE, TRAINER_STATE_NAME, checkpoints_newest_first

IDENTITY_KEYS = ("method", "loss_type", "policy_loss", "token_signals", "model_name_or_path")
logger = logging.getLogger(__name__)


def run_identity(run_args, training_args, model_args, trainer_kind: str) -> dict:
    """What makes a checkpoint this run's: :data:`IDENTITY_KEYS`."""
    from .trainers.card import token_method

    method = token_method(training_args, trainer_kind)
    return {"method": run_args.method, "loss_type": method["loss_type"], "policy_loss": method["policy_loss"],
            "token_signals": list(method["token_signals"]), "model_name_or_path": model_args.model_name_or_path}


class RunIdentityCallback(TrainerCallback):
    """Writes the run's identity (:func:`run_identity`) into each checkpoint it saves (the main process)."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / RUN_IDENTITY_FILE).write_text(json.dumps(self.identity, indent=2) + "\n")


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` cannot be read whole (its header names byte ranges past its end), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "truncated (no header)"
        (header_size,) = struct.unpack("<Q", head)
        if 8 + header_size > size:
            return "truncated (header past the end)"
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return "unreadable header"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return "truncated (tensors past the end)" if 8 + header_size + max(ends, default=0) > size else None


def _torch_archive_problem(path: Path) -> str | None:
    """Why the ``torch.save`` archive ``path`` (a zip file, whose index is at its end) cannot be opened, or None: a
    truncated file has lost its index. (The members' data are not read: optimizer states can be many GB.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"not a whole torch archive, truncated? ({error})"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """``"<file>: <what is wrong>"`` for the first file of ``checkpoint`` that a resume could not read, or None: its
    trainer state (missing, or not JSON), its weights (``*.safetensors``) and its ``*.pt`` / ``*.bin`` archives
    (optimizer, scheduler, RNG, DeepSpeed's ``global_step*/`` states)."""
    state = checkpoint / TRAINER_STATE_NAME
    if not state.is_file():
        return f"{state}: missing (the trainer writes it last)"
    try:
        json.loads(state.read_text())
    except ValueError:
        return f"{state}: not valid JSON (truncated?)"
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".bin", ".pth"):
            problem = _torch_archive_problem(path)
        else:
            continue
        if problem:
            return f"{path}: {problem}"
    return None


def resume_value(resume_from_checkpoint) -> bool | str:
    """``resume_from_checkpoint`` as a bool or a checkpoint path: ``True`` (YAML) and ``"true"`` (the command line,
    where the field is a string) are True; ``False``, ``"false"`` and None are False."""
    value = resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return False if value is None else value


def resume_checkpoint(output_dir: Path, resume_from_checkpoint) -> str | None:
    """The checkpoint a run resumes from (:func:`resume_value`): True is the newest ``checkpoint-N`` of ``output_dir``
    that can be read (:func:`checkpoint_problem`; others are skipped with a warning naming the file, on the main
    process); False: none; a path is that checkpoint directory."""
    value = resume_value(resume_from_checkpoint)
    if value is False:
        return None
    if value is not True:
        return str(value)
    for checkpoint in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        if int(os.environ.get("RANK", "0")) == 0:
            logger.warning("Skipping the checkpoint %s, which cannot be resumed from: %s. Resuming from an earlier "
                           "one.", checkpoint.name, problem)
    raise ConfigError(f"resume_from_checkpoint: {output_dir} has no checkpoint that can be resumed from.")


def finished_run(output_dir: Path, training_args) -> dict | None:
    """The saved run info of the run in ``output_dir`` if it has finished what ``training_args`` ask for: its
    ``run_info.json`` marked ``completed`` (written once the model and card are saved), at the last step (the
    config's ``max_steps`` when it sets one, else the steps the run planned, unless the config asks for more epochs
    than it had); None when there is training left."""
    info_file = Path(output_dir) / RUN_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if not info.get("completed"):
        return None
    if training_args.max_steps > 0:
        return info if info["global_step"] >= training_args.max_steps else None
    more_epochs = training_args.num_train_epochs > info.get("num_train_epochs", 0)
    return info if not more_epochs and info["global_step"] >= info.get("planned_steps", 0) else None


def check_same_run(checkpoint: str, identity: dict) -> None:
    """Refuse to resume ``checkpoint`` under a run whose :func:`run_identity` differs from the one it recorded (a
    checkpoint from before identities were recorded is not checked)."""
    recorded_file = Path(checkpoint) / RUN_IDENTITY_FILE
    if not recorded_file.is_file():
        return
    recorded = json.loads(recorded_file.read_text())
    same = {"model_name_or_path": lambda a, b: portable_base_model(str(a)) == portable_base_model(str(b))}
    differences = [f"{key} {recorded.get(key)!r} there, {identity[key]!r} here" for key in IDENTITY_KEYS
                   if not same.get(key, operator.eq)(recorded.get(key), identity[key])]
    if differences:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was trained by another run ({'; '.join(differences)}): "
                          "resume it with its own config, or give a new output_dir.")
