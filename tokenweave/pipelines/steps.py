"""Resumable pipeline steps: each step writes its output atomically and records the config it was made from.

A pipeline is a list of :class:`Step` objects run by :func:`run_steps` into one work directory, each into its own
subdirectory. A step's *record* is its own settings plus the records of the steps it reads (``inputs``), so it
depends only on the config, never on outputs, and a change anywhere upstream reaches every step downstream. The
record is written as ``step_config.json`` inside the step's directory.

* A step whose directory is missing runs: into ``.<name>.partial`` first (a stale one is removed), the record is
  written last, then the directory is renamed into place. An interrupted step leaves no output and reruns.
* A step whose directory holds the same record is skipped.
* If any step's directory holds a different record, nothing runs: :class:`StepConfigChanged` names every such step
  and what changed, and says how to proceed (delete those directories to recompute them, or use another work
  directory). Finished work is never silently reused for a changed config, nor silently thrown away.
* A directory with no record (not written by a step) is an error too.
* A finished step also records each output file's size and a hash of its first and last MiB (``step_output.json``:
  cheap for many-GB weights, and the same after a copy of the work directory); a step whose files were replaced or
  removed since (a standalone run that wrote its ``output_dir`` there) is not reused: :class:`StepOutputChanged`
  names the files. Files added since (a dataset's map cache) are not a change.

A step that reads the output of a step run by another :func:`run_steps` call puts :func:`made_from` of that output
into its settings (not its path), so a change upstream reaches it all the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)  # progress (INFO); the tokenweave command shows it

STEP_RECORD = "step_config.json"
STEP_OUTPUT = "step_output.json"  # {relative file path: [size, ends hash]} of the output as the step finished it
HASHED_BYTES = 1 << 20  # from each end of a file


@dataclass(frozen=True)
class Step:
    """One step: its directory ``name``, the settings its output is made from, the steps it reads, and how to build.

    ``config`` must be JSON data without the key ``inputs`` (it is compared with the recorded one after a JSON round
    trip). ``build(directory)`` writes the step's output into ``directory``, which does not exist yet.
    """

    name: str
    config: dict
    build: Callable[[Path], None]
    inputs: tuple[str, ...] = ()


def made_from(output: Path) -> dict:
    """The record of the finished step whose output directory is ``output``: what it was made from (for the
    settings of a step that reads it, across :func:`run_steps` calls)."""
    return json.loads((Path(output) / STEP_RECORD).read_text())


class StepConfigChanged(ValueError):
    """Finished steps in the work directory were made from a config other than the current one."""


class StepOutputChanged(ValueError):
    """A finished step's output files were replaced or removed after the step wrote them."""


def file_stamp(path: Path) -> list:
    """``[size, sha256 of the first and last HASHED_BYTES]`` of the file ``path``: what tells a replaced file (other
    weights of the same shape differ in both ends) without reading many GB."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(HASHED_BYTES))
        if size > HASHED_BYTES:
            handle.seek(max(size - HASHED_BYTES, HASHED_BYTES))
            digest.update(handle.read())
    return [size, digest.hexdigest()]


def output_files(directory: Path) -> dict[str, list]:
    """``{relative path: file_stamp}`` of every file under ``directory`` but the step's own records."""
    return {str(path.relative_to(directory)): file_stamp(path)
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name not in (STEP_RECORD, STEP_OUTPUT)}


def check_output_unchanged(name: str, directory: Path) -> None:
    """Refuse to reuse step ``name``'s output in ``directory`` if a file it wrote was replaced or removed since
    (:class:`StepOutputChanged`); a step finished before outputs were recorded is not checked."""
    recorded_file = directory / STEP_OUTPUT
    if not recorded_file.exists():
        return
    now = output_files(directory)
    changed = [path for path, stamp in json.loads(recorded_file.read_text()).items() if now.get(path) != stamp]
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise StepOutputChanged(f"The output of the step {name!r} ({directory}) changed after the step wrote it: "
                                f"{shown} replaced or removed (a run with its output_dir there?). Delete {directory} "
                                "to recompute it.")


def run_steps(work_dir: Path, steps: Sequence[Step], log_prefix: str) -> dict[str, Path]:
    """Run every step not done yet, in order (module docstring); returns each step's output directory.

    Raises :class:`StepConfigChanged` before running anything if a finished step was made from another config, and
    ``FileExistsError`` if a step's directory exists without a record.
    """
    work_dir = Path(work_dir)
    records: dict[str, dict] = {}
    for step in steps:
        if "inputs" in step.config:
            raise ValueError(f"Step {step.name!r}: 'inputs' is the record's key for the steps it reads, not a setting.")
        unknown = [name for name in step.inputs if name not in records]
        if unknown:
            raise ValueError(f"Step {step.name!r} reads {unknown}, which are not earlier steps.")
        records[step.name] = _json_data({**step.config, "inputs": {name: records[name] for name in step.inputs}})
    outputs = {step.name: work_dir / step.name for step in steps}
    _check_records(work_dir, outputs, records)
    work_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        target = outputs[step.name]
        if (target / STEP_RECORD).exists():
            check_output_unchanged(step.name, target)
            logger.info(f"[{log_prefix}] {step.name}: done already ({target}), skipped")
            continue
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        logger.info(f"[{log_prefix}] {step.name}: running")
        step.build(staging)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / STEP_OUTPUT).write_text(json.dumps(output_files(staging), indent=1) + "\n")
        (staging / STEP_RECORD).write_text(json.dumps(records[step.name], indent=2) + "\n")
        os.replace(staging, target)
    return outputs


def _check_records(work_dir: Path, outputs: dict[str, Path], records: dict[str, dict]) -> None:
    """Refuse a step directory without a record, and (all at once) every step made from another config."""
    changed = []
    for name, target in outputs.items():
        if not target.exists():
            continue
        record_path = target / STEP_RECORD
        if not record_path.exists():
            raise FileExistsError(
                f"{target} exists but has no {STEP_RECORD}: it is not the output of the step {name!r}; delete it."
            )
        previous = json.loads(record_path.read_text())
        if previous != records[name]:
            changed.append(f"  {name}/: {'; '.join(_differences(previous, records[name]))}")
    if changed:
        raise StepConfigChanged(
            f"{work_dir} holds steps made from another config than this one:\n" + "\n".join(changed) + "\n"
            "Delete these step directories to recompute them with this config, or run into another work directory "
            "to keep them (or restore the old values)."
        )


def _differences(previous: dict, current: dict) -> list[str]:
    """What differs between two records: ``key: old -> new`` for the step's own settings (dotted keys into nested
    mappings), ``input <name>/ changed`` for an input made from another config."""
    previous_inputs, current_inputs = previous.get("inputs", {}), current.get("inputs", {})
    differences = [
        f"{key}: {_show(previous_value)} -> {_show(current_value)}"
        for key, previous_value, current_value in _changed_leaves(
            {k: v for k, v in previous.items() if k != "inputs"}, {k: v for k, v in current.items() if k != "inputs"}
        )
    ]
    differences += [
        f"input {name}/ changed"
        for name in sorted(set(previous_inputs) | set(current_inputs))
        if previous_inputs.get(name) != current_inputs.get(name)
    ]
    return differences


_MISSING = object()


def _changed_leaves(previous: dict, current: dict, prefix: str = ""):
    """``(dotted key, previous value, current value)`` for every leaf that differs (``_MISSING`` when absent)."""
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key, _MISSING), current.get(key, _MISSING)
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _changed_leaves(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key}", old, new


def _show(value) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


def _json_data(value):
    """``value`` as JSON reads it back (tuples become lists), so a record compares equal to its stored copy."""
    return json.loads(json.dumps(value))
