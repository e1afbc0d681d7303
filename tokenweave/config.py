"""Run configuration: one YAML file (plus CLI overrides) drives a run, parsed with TRL's ``TrlParser``.

A run config mixes three dataclasses, exactly as TRL's own scripts do:

- :class:`RunArguments`: what to train (``method``), on what data, with which rewards;
- the method's TRL config (``SFTConfig`` / ``DPOConfig`` / ``GRPOConfig`` subclasses from
  :mod:`tokenweave.trainers`): every TRL training option;
- TRL's ``ModelConfig``: the model and LoRA (``use_peft``, ``lora_r``, ...).

Values from ``--config file.yaml`` become defaults and command-line flags override them; a key that
none of the three dataclasses knows is an error naming the key.
"""

from __future__ import annotations

import difflib
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import ClassVar

from transformers import TrainingArguments
from trl import ModelConfig, TrlParser
from trl.scripts.utils import DatasetConfig

from .checks import UNIT, ConfigError, check_options
from .data.noisy_arithmetic import NOISE_KINDS
from .launch import launch_settings_from_config
from .preflight import check_report_to, config_file_of
from .trainers import METHODS


def _check_noise_kinds(kinds: list[str]) -> str | None:
    """``task_noise_kinds``: one or more known kinds."""
    unknown = [kind for kind in kinds if kind not in NOISE_KINDS]
    if unknown or not kinds:
        return f"task_noise_kinds must be one or more of {list(NOISE_KINDS)}, got {kinds!r}"
    return None


MIXTURE_KEYS = {item.name for item in fields(DatasetConfig)}  # what a `datasets:` entry may set, as in TRL


@dataclass
class RunArguments:
    """What a run trains and on which data. The method's own options live in its TRL config."""

    method: str | None = field(
        default=None, metadata={"help": f"Which trainer to run: one of {sorted(METHODS)}.", "choices": sorted(METHODS)}
    )
    dataset_name: str = field(
        default="arithmetic",
        metadata={
            "help": "A built-in task ('arithmetic', 'recommendation'), a local dataset (a save_to_disk directory, or a "
            ".json/.jsonl/.csv/.parquet file or directory of them) or a hub dataset id."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    num_train_examples: int | None = field(
        default=None,
        metadata={"help": "Train examples to use (built-in tasks generate this many; default 1000). None: all."},
    )
    num_test_examples: int | None = field(
        default=None,
        metadata={"help": "Test examples to use (built-in tasks generate this many; default 200). None: all."},
    )
    task_difficulty: str = field(
        default="easy", metadata={"help": "Built-in arithmetic task difficulty: easy, medium or hard."}
    )
    task_seed: int = field(default=0, metadata={"help": "Seed of the built-in task's problem generator."})
    task_list_length: int = field(
        default=5, metadata={"help": "Built-in recommendation task: the items each answer lists (Rank-GRPO's N)."}
    )
    task_num_candidates: int = field(
        default=12, metadata={"help": "Built-in recommendation task: the candidate items shown in each prompt."}
    )
    task_noise_share: float = field(
        default=0.3,
        metadata={"help": "Built-in noisy_arithmetic task: the share of train rows with a planted error, in [0, 1] "
                  "(exactly that share, rounded; the test and clean splits have none)."},
    )
    task_noise_kinds: list[str] = field(
        default_factory=lambda: list(NOISE_KINDS),
        metadata={"help": f"Built-in noisy_arithmetic task: the kinds of planted error, one or more of "
                  f"{list(NOISE_KINDS)} (a wrong calculation step carried on to a wrong answer; a junk span)."},
    )
    datasets: list[dict] | None = field(
        default=None,
        metadata={
            "help": "TRL's dataset mixture (DatasetMixtureConfig): a list of {path, name, data_dir, data_files, split, "
            "columns, fraction} mappings, each loaded with datasets.load_dataset and concatenated (fraction: each "
            "one's share), as trl.get_dataset does. When given, dataset_name is not used."
        },
    )
    streaming: bool = field(default=False, metadata={"help": "TRL's mixture key: stream the datasets of `datasets`."})
    dataset_streaming: bool = field(
        default=False, metadata={"help": "TRL's key: stream dataset_name (a hub id or data files; needs max_steps)."}
    )
    test_split_size: float | None = field(
        default=None,
        metadata={
            "help": "TRL's mixture key: hold out this share (a float in (0, 1)) or number of rows of the train data as "
            "the eval split (datasets' train_test_split, seeded with the run's seed), instead of dataset_test_split."
        },
    )
    lora_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "With use_peft: put LoRA adapters on these decoder layers only (PEFT's layers_to_transform, "
            "counted from 0). Adapters on the top layers only skip the backward pass through the layers below "
            "them: about half the step time on CPU with the top half. None: every layer."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correctness", "format"],
        metadata={
            "help": "GRPO reward functions: built-in names (see tokenweave.rewards) or 'package.module:function'."
        },
    )

    option_ranges: ClassVar[dict] = {"task_noise_share": UNIT}  # tokenweave.checks reads them
    option_rules: ClassVar[dict] = {"task_noise_kinds": _check_noise_kinds}

    def __post_init__(self):
        check_options(self)
        for index, mixed in enumerate(self.datasets or []):
            if not isinstance(mixed, dict) or "path" not in mixed or set(mixed) - MIXTURE_KEYS:
                raise ConfigError(f"datasets[{index}] must be a mapping with a path and TRL's DatasetConfig keys only "
                                  f"({', '.join(sorted(MIXTURE_KEYS))}), got {mixed!r}.")
        if self.test_split_size is not None and not (0 < self.test_split_size < 1 or self.test_split_size >= 1 and
                                                     float(self.test_split_size).is_integer()):
            raise ConfigError(f"test_split_size must be a share in (0, 1) or a whole number of rows, got "
                              f"{self.test_split_size!r}.")

    @property
    def data_name(self) -> str:
        """What the run trains on, as its cards and its errors name it: the mixture's paths, or ``dataset_name``."""
        return ", ".join(mixed["path"] for mixed in self.datasets) if self.datasets else self.dataset_name

    @property
    def is_streaming(self) -> bool:
        """Whether the train data is streamed (``streaming`` with a mixture, ``dataset_streaming`` without)."""
        return self.streaming if self.datasets else self.dataset_streaming


def config_keys(*dataclass_types) -> set[str]:
    """The keys a config file of ``dataclass_types`` may set: their fields (those ``TrlParser`` parses) and ``env``
    (environment variables that ``TrlParser`` sets)."""
    return {item.name for dataclass_type in dataclass_types for item in fields(dataclass_type) if item.init} | {"env"}


RENAMED_KEYS = {
    "token_weight_control": "signal_control (shuffle or inverse, for every token signal)",
    "token_weight_control_seed": "signal_control_seed",
    "attention_credit_control": "signal_control (shuffle or inverse, for every token signal; 'random' is 'shuffle')",
    "attention_credit_control_seed": "signal_control_seed",
}
"""Keys of earlier versions: their new name, said instead of a guess."""


def did_you_mean(unknown: list[str], known: set[str]) -> str:
    """`` Did you mean: 'lerning_rate' -> 'learning_rate'?`` for the unknown names close to a known one (or ""); a
    renamed key (:data:`RENAMED_KEYS`) gets its new name."""
    guesses = [f"{name!r} -> {RENAMED_KEYS[name]}" if name in RENAMED_KEYS else f"{name!r} -> {close[0]!r}"
               for name in unknown if name in RENAMED_KEYS
               or (close := difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75))]
    return f" Did you mean: {', '.join(guesses)}?" if guesses else ""


def _requested_method(argv: list[str], config: dict) -> str:
    """``method`` from the command line, else from the YAML config: it decides which parser to build."""
    for index, arg in enumerate(argv):
        if arg == "--method" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    if config.get("method") is None:
        if {"-h", "--help"} & set(argv):
            print(f"usage: tokenweave train --config FILE.yaml [--method {{{','.join(sorted(METHODS))}}}] "
                  "[--key value ...]\n\nThe options are the fields of the method's config, with their defaults: give "
                  "--config or --method with --help to list them.")
            sys.exit(0)
        raise ValueError(f"No method given: set `method:` in the config or pass --method, one of {sorted(METHODS)}.")
    return config["method"]


def run_option_names(argv: list[str]) -> set[str]:
    """The option names of the run that the command line ``argv`` asks for (its method's dataclasses): what stays a
    training option when it is also an ``accelerate launch`` flag (``gradient_accumulation_steps``)."""
    method = _requested_method(argv, config_file_of(argv))
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {sorted(METHODS)}.")
    return config_keys(RunArguments, METHODS[method][1], ModelConfig)


@contextmanager
def planned_world_size(processes: int):
    """Within the block, every TRL config sees a world of ``processes`` processes (``TrainingArguments.world_size``):
    how a launcher checks the run its workers will parse, whose batch checks (GRPO's generation batch, divisible by
    ``num_generations``) count the processes, while itself being one process with no process group."""
    original = TrainingArguments.world_size
    TrainingArguments.world_size = property(lambda self: processes)
    try:
        yield
    finally:
        TrainingArguments.world_size = original


def parse_run_config(argv: list[str] | None = None):
    """Parse ``--config file.yaml [--key value ...]`` into ``(run_args, training_args, model_args)``.

    Raises ``ValueError`` naming the offending key for an unknown config key or command-line flag, and
    for an unknown method.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_file_of(argv)
    method = _requested_method(argv, config)
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {sorted(METHODS)}.")
    dataclass_types = (RunArguments, METHODS[method][1], ModelConfig)
    known = config_keys(*dataclass_types)
    _, config = launch_settings_from_config(config, known)  # the launcher's keys (tokenweave.launch), not the run's
    unknown_keys = sorted(set(config) - known)
    if unknown_keys:
        raise ValueError(
            f"Unknown config key(s) {unknown_keys} for method {method!r}: not a field of RunArguments, "
            f"{METHODS[method][1].__name__} or ModelConfig.{did_you_mean(unknown_keys, known)}"
        )
    run_args, training_args, model_args, _, remaining = TrlParser(
        dataclass_types, prog="tokenweave train"
    ).parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)  # _: launch keys
    if remaining:
        flags = [arg.removeprefix("--").split("=", 1)[0] for arg in remaining if arg.startswith("--")]
        raise ValueError(
            f"Unknown command-line argument(s) {remaining} for method {method!r}: not a field of RunArguments, "
            f"{METHODS[method][1].__name__} or ModelConfig.{did_you_mean(flags, known)}"
        )
    check_report_to(training_args.report_to)
    if run_args.is_streaming and training_args.max_steps <= 0:
        raise ConfigError("A streamed dataset has no length: set max_steps (the steps to train) with "
                          "streaming / dataset_streaming.")
    return run_args, training_args, model_args


def given_run_config(argv: list[str], *configs) -> dict:
    """The run config that ``argv`` (``--config file.yaml [--key value ...]``) gave: the file's keys and the
    command-line flags, each with its parsed value from ``configs`` (the dataclasses :func:`parse_run_config`
    returned), so that ``tokenweave train --config <this, as YAML>`` reproduces the run. Fields left at their
    defaults (and those TRL derives from others) are not in it."""
    values = {item.name: getattr(config, item.name) for config in reversed(configs) for item in fields(config)
              if item.init}
    given = [key for key in config_file_of(argv) if key != "env"]
    for arg in argv:
        name = arg.removeprefix("--").split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None
        if name is None or name == "config":
            continue
        if name not in values and name.startswith("no_") and name[3:] in values:
            name = name[3:]
        prefixed = [key for key in values if key.startswith(name)]
        given.append(name if name in values else prefixed[0] if len(prefixed) == 1 else name)
    return {key: _plain(values[key]) for key in dict.fromkeys(given) if key in values}


def _plain(value):
    """A config value as YAML writes and reads it back (enums by their value)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def load_run_config(path: str | Path):
    """The run config in the YAML file ``path``, as :func:`parse_run_config` returns it (no overrides)."""
    return parse_run_config(["--config", str(path)])
