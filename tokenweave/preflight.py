"""Checks of a run's inputs that need nothing heavy: no torch, no TRL, no dataset library, no model.

``tokenweave train`` runs them on the raw config (the YAML file and the command-line flags) before it imports
anything else, so that a missing dataset file or an uninstalled logging backend is refused in a moment, in one line;
the Python entry points get the same refusals from the parsed config (``report_to`` in
:func:`tokenweave.config.parse_run_config`, the dataset paths in :func:`tokenweave.train.build_trainer`, where a
pipeline's earlier steps have written the data its config names). Each check raises
:class:`~tokenweave.checks.ConfigError`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import yaml

from .checks import ConfigError
from .data import BUILTIN_TASKS

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
# report_to backend -> (the modules transformers accepts for it, any one of them; what to install). A backend not
# named here is left to transformers to check when the trainer is built.
REPORT_BACKENDS = {
    "tensorboard": (("tensorboard", "tensorboardX"), 'pip install "tokenweave[logging]"'),
    "wandb": (("wandb",), "pip install wandb"),
    "trackio": (("trackio",), "pip install trackio"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "clearml": (("clearml",), "pip install clearml"),
    "neptune": (("neptune",), "pip install neptune"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
    "flyte": (("flytekit",), "pip install flytekit"),
    "dagshub": (("dagshub",), "pip install dagshub"),
}
NO_REPORTING = ("none", "all")  # "all": whatever is installed, so nothing to refuse


def read_config_file(path: str | Path) -> dict:
    """The mapping in the YAML config file ``path``, as written."""
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"Config file {str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise ValueError(f"Config file {str(path)!r} must contain a YAML mapping.")
    return config


def config_file_of(argv: list[str]) -> dict:
    """The mapping in the ``--config`` file named on the command line ``argv`` (empty without one)."""
    return read_config_file(argv[argv.index("--config") + 1]) if "--config" in argv else {}


def looks_like_path(name: str) -> bool:
    """Whether a ``dataset_name`` names a local file or folder rather than a hub id (``org/name``): it starts with
    ``.``, ``/`` or ``~``, ends with a data-file suffix, or has more than one ``/``."""
    return name.startswith((".", "/", "~")) or name.endswith(DATA_FILE_SUFFIXES) or name.count("/") > 1


def check_dataset_name(name: str | None, key: str = "dataset_name") -> None:
    """Refuse a dataset that names a local path that does not exist (a built-in task, an existing path and a hub id
    pass)."""
    if name is None or name in BUILTIN_TASKS or Path(name).expanduser().exists() or not looks_like_path(name):
        return
    raise ConfigError(f"{key} {name!r}: no such file or folder (relative to {os.getcwd()}); give an existing "
                      f"dataset path, a built-in task ({', '.join(BUILTIN_TASKS)}) or a hub dataset id.")


def check_dataset_names(values) -> None:
    """:func:`check_dataset_name` on a run's ``dataset_name`` and each ``datasets:`` mixture entry's ``path``
    (``values``: a mapping, the raw config, or an object with those attributes, the parsed one)."""
    get = values.get if isinstance(values, dict) else lambda key: getattr(values, key, None)
    check_dataset_name(get("dataset_name"))
    for index, mixed in enumerate(get("datasets") or []):
        if isinstance(mixed, dict):
            check_dataset_name(mixed.get("path"), key=f"datasets[{index}].path")


def check_report_to(report_to) -> None:
    """Refuse a ``report_to`` backend of :data:`REPORT_BACKENDS` that is not installed, naming what to install
    (``none`` and ``all`` pass, and names transformers checks itself)."""
    backends = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for backend in backends:
        if backend in NO_REPORTING:
            continue
        modules, install = REPORT_BACKENDS.get(backend, ((), ""))
        if modules and all(importlib.util.find_spec(module) is None for module in modules):
            raise ConfigError(f"report_to {backend!r}: {' or '.join(modules)} is not installed; {install}, or set "
                              "report_to: none.")


def raw_option(argv: list[str], config: dict, key: str):
    """The value of option ``key`` as the command line (``--key value`` or ``--key=value``, the last one) or else the
    YAML config gives it, before any parsing (a flag's value is a string; a list flag gives its first value)."""
    value = config.get(key)
    for index, arg in enumerate(argv):
        if arg == f"--{key}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def check_raw_run_config(argv: list[str], config: dict) -> None:
    """The checks above on a run's raw config: ``config`` (the YAML file's mapping) with the flags of ``argv``."""
    check_dataset_names({**config, "dataset_name": raw_option(argv, config, "dataset_name")})
    check_report_to(raw_option(argv, config, "report_to"))
