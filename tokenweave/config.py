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

import sys
from dataclasses import dataclass, field

import yaml
from trl import ModelConfig, TrlParser

from .trainers import METHODS


@dataclass
class RunArguments:
    """What a run trains and on which data. The method's own options live in its TRL config."""

    method: str | None = field(
        default=None, metadata={"help": f"Which trainer to run: one of {sorted(METHODS)}.", "choices": sorted(METHODS)}
    )
    dataset_name: str = field(
        default="arithmetic",
        metadata={
            "help": "A built-in task ('arithmetic'), a local dataset (a save_to_disk directory, or a "
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
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correctness", "format"],
        metadata={
            "help": "GRPO reward functions: built-in names (see tokenweave.rewards) or 'package.module:function'."
        },
    )


def _read_yaml_config(argv: list[str]) -> dict:
    """The mapping in the ``--config`` file named on the command line (empty without one)."""
    if "--config" not in argv:
        return {}
    config_path = argv[argv.index("--config") + 1]
    try:
        with open(config_path) as handle:
            config = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"Config file {config_path!r} does not exist.") from None
    if not isinstance(config, dict):
        raise ValueError(f"Config file {config_path!r} must contain a YAML mapping.")
    return config


def _requested_method(argv: list[str], config: dict) -> str:
    """``method`` from the command line, else from the YAML config: it decides which parser to build."""
    for index, arg in enumerate(argv):
        if arg == "--method" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    if config.get("method") is None:
        raise ValueError(f"No method given: set `method:` in the config or pass --method, one of {sorted(METHODS)}.")
    return config["method"]


def parse_run_config(argv: list[str] | None = None):
    """Parse ``--config file.yaml [--key value ...]`` into ``(run_args, training_args, model_args)``.

    Raises ``ValueError`` naming the offending key for an unknown config key or command-line flag, and
    for an unknown method.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = _read_yaml_config(argv)
    method = _requested_method(argv, config)
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {sorted(METHODS)}.")
    parser = TrlParser((RunArguments, METHODS[method][1], ModelConfig))
    known_keys = {action.dest for action in parser._actions} | {"env"}
    unknown_keys = sorted(set(config) - known_keys)
    if unknown_keys:
        raise ValueError(
            f"Unknown config key(s) {unknown_keys} for method {method!r}: not a field of RunArguments, "
            f"{METHODS[method][1].__name__} or ModelConfig."
        )
    run_args, training_args, model_args = parser.parse_args_and_config(argv)
    return run_args, training_args, model_args
