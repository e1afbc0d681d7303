"""Launching several processes as ``trl`` does: ``tokenweave train --config run.yaml --accelerate_config zero3
--num_processes 8`` re-runs the command through ``accelerate launch`` (in this process, which becomes the launcher).

``--accelerate_config`` takes a path, or a name: first the configs of the repository's ``launch/`` folder (installed
as the package ``tokenweave.launch_configs``: :func:`accelerate_configs_dir`), then those TRL ships
(``trl/accelerate_configs/``, found by TRL's own resolver), so every name ``trl <command> --accelerate_config`` takes
works here too:

==================  ===========================================================================================
name                what it launches
==================  ===========================================================================================
ddp                 data parallelism, one machine, 8 GPUs, bf16 (TRL's ``multi_gpu`` is the same)
zero2, zero3        DeepSpeed ZeRO-2 / ZeRO-3, one machine, 8 GPUs, bf16 (ZeRO-3 gathers the 16-bit model on save)
zero3_offload       ZeRO-3 with optimizer state and parameters in CPU memory
fsdp2               PyTorch FSDP2 (``fully_shard``), one machine, 8 GPUs, bf16
multinode_zero3     ZeRO-3 on two machines of 8 GPUs (``--machine_rank``, ``--main_process_ip`` on each; on SLURM,
                    ``launch/slurm_multinode.sh`` sets them)
cpu_ddp, cpu_zero2, CPU variants with 2 processes (no GPU), for tests and laptops; run configs with
cpu_zero3           ``use_cpu: true`` and ``bf16: false``
multi_gpu, zero1,   TRL's: data parallelism; ZeRO-1; FSDP1; one process (``zero2``, ``zero3`` and ``fsdp2`` are
fsdp1, single_gpu   tokenweave's above, which set what TRL's set)
==================  ===========================================================================================

FSDP has no CPU variant: accelerate (1.15) turns FSDP on only for accelerator devices, and a ``use_cpu`` run under
an FSDP config would silently be plain data parallelism, so :func:`tokenweave.train.build_trainer` refuses it.

Every other ``accelerate launch`` flag is passed to it, as ``trl`` passes them (``--num_processes``,
``--mixed_precision bf16``, ``--main_process_port``, ...), except a flag that is also one of the command's own options
(``--gradient_accumulation_steps`` and ``--debug`` are training options): TRL's CLI parses the command line and the
config with the training script's parser first and gives ``accelerate launch`` only what that parser left, and the
functions here take the command's option names (``training_options``) to split the same way. The run's YAML config may
set the same flags as keys (``accelerate_config: zero3``, ``num_processes: 8``: TRL hands the keys its dataclasses do
not have to ``accelerate launch``); a flag on the command line overrides its key. ``--config_file`` (accelerate's
name) is taken as ``--accelerate_config``. Without any launch flag or key the command runs in this one process (which
may itself be a process of ``accelerate launch -m tokenweave.train ...``: there the config's launch keys are the
launcher's business and are left alone). ``tokenweave critical`` takes the same flags for its training steps
(:mod:`tokenweave.pipelines.critical`).

This module imports neither torch nor TRL: accelerate's launch parser (which imports torch) and TRL's resolver are
imported by the functions that need them, when called.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Collection
from functools import cache
from importlib.resources import files
from pathlib import Path

from .preflight import config_file_of, read_config_file

CONFIG_SETTING = "accelerate_config"
"""The launch setting that names the accelerate config (TRL's flag); accelerate's own ``--config_file`` is read as
this one."""
SET_BY_TOKENWEAVE = frozenset({"help", "module", "no_python"})
"""``accelerate launch`` flags that are not passed through: what runs (``-m <module>``) is tokenweave's to say."""
TRL_CONFIG_KEYS = frozenset({"env"})
"""YAML keys that ``TrlParser`` reads itself (environment variables), whatever ``accelerate launch`` calls so."""


def accelerate_configs_dir() -> Path:
    """The folder of the shipped accelerate configs: the repository's ``launch/``. pyproject.toml and setup.py map it
    to the package ``tokenweave.launch_configs``, so a wheel install has it as ``tokenweave/launch_configs/`` and an
    editable install imports it from ``launch/``; a checkout that is on ``sys.path`` but not installed has no such
    package, and the folder is then ``launch/`` next to the ``tokenweave`` folder."""
    try:
        return Path(str(files("tokenweave.launch_configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "launch"


def accelerate_config_names() -> list[str]:
    """The names of tokenweave's own accelerate configs (``launch/``), which ``--accelerate_config`` looks up first."""
    return sorted(path.stem for path in accelerate_configs_dir().glob("*.yaml"))


def trl_accelerate_config_names() -> list[str]:
    """The names of the accelerate configs TRL ships, which ``--accelerate_config`` looks up after tokenweave's."""
    return sorted(entry.name.removesuffix(".yaml") for entry in files("trl.accelerate_configs").iterdir()
                  if entry.name.endswith(".yaml"))


def resolve_accelerate_config(name_or_path: str) -> Path:
    """The accelerate config file ``--accelerate_config name_or_path`` means: tokenweave's config of that name, else
    what TRL's resolver makes of it (an existing file, or a config TRL ships); otherwise a ``ValueError`` listing the
    names of both."""
    shipped = accelerate_configs_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    try:
        resolved = resolve_accelerate_config_argument(["--accelerate_config", name_or_path])
    except ValueError:
        raise ValueError(
            f"--accelerate_config {name_or_path!r} is neither a file nor one of tokenweave's configs "
            f"({', '.join(accelerate_config_names())}, in {accelerate_configs_dir()}) or TRL's "
            f"({', '.join(trl_accelerate_config_names())}): give one of these names or the path of an accelerate "
            "config YAML."
        ) from None
    return Path(resolved[resolved.index("--config_file") + 1])


def planned_processes(launch: dict) -> int:
    """How many processes the launch settings ``launch`` start: ``num_processes``, else its accelerate config's (or
    accelerate's default config's) ``num_processes``, else 1."""
    if launch.get("num_processes"):
        return int(launch["num_processes"])
    config = launch.get(CONFIG_SETTING)
    if config is None:
        from accelerate.commands.config import default_config_file

        config = default_config_file if Path(default_config_file).is_file() else None
    else:
        config = resolve_accelerate_config(str(config))
    return int(read_config_file(config).get("num_processes") or 1) if config else 1


def launch_arguments_parser() -> argparse.ArgumentParser:
    """The help of the launch flags of ``tokenweave train`` and ``tokenweave critical`` (the most used ones; the
    others are ``accelerate launch``'s, passed through: module docstring)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    group = parser.add_argument_group(
        "launching several processes (as `trl` and `accelerate launch`)",
        "Any other `accelerate launch` flag (`accelerate launch --help`) is passed to it, unless the run's config has "
        "an option of that name (--gradient_accumulation_steps, --debug). A config may set these as keys too "
        "(accelerate_config: zero3); a flag overrides its key.",
    )
    group.add_argument("--accelerate_config", metavar="NAME_OR_PATH",
                       help=f"accelerate config to launch with: a path, one of tokenweave's "
                            f"({', '.join(accelerate_config_names())}) or one of TRL's "
                            f"({', '.join(trl_accelerate_config_names())})")
    group.add_argument("--num_processes", type=int, help="processes in all (default: the accelerate config's)")
    group.add_argument("--num_machines", type=int, help="machines (default: the accelerate config's)")
    group.add_argument("--machine_rank", type=int, help="this machine's rank, on multi-machine launches")
    group.add_argument("--main_process_ip", help="address of machine 0, on multi-machine launches")
    group.add_argument("--main_process_port", type=int, help="port of machine 0, on multi-machine launches")
    return parser


def option_name(flag_or_key: str) -> str:
    """``mixed_precision`` for ``--mixed-precision``, ``--mixed_precision`` or the YAML key ``mixed_precision``."""
    return flag_or_key.removeprefix("--").replace("-", "_")


@cache
def accelerate_launch_options() -> dict[str, argparse.Action]:
    """``accelerate launch``'s flags by :func:`option_name` of their long form, read from accelerate's own parser
    (without those tokenweave sets: :data:`SET_BY_TOKENWEAVE`)."""
    from accelerate.commands.launch import launch_command_parser

    options = {}
    for action in launch_command_parser()._actions:
        long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if long_flags and option_name(long_flags[0]) not in SET_BY_TOKENWEAVE:
            options.update(dict.fromkeys(map(option_name, long_flags), action))
    return options


def pass_through_options(training_options: Collection[str]) -> dict[str, argparse.Action]:
    """The ``accelerate launch`` flags a command passes through: all but its own options ``training_options``."""
    own = {option_name(name) for name in training_options}
    return {name: action for name, action in accelerate_launch_options().items() if name not in own}


def canonical_name(action: argparse.Action) -> str:
    """The name a launch setting is kept under: its flag's first long form (``mixed_precision``)."""
    return option_name(next(flag for flag in action.option_strings if flag.startswith("--")))


def split_launch_arguments(argv: list[str], training_options: Collection[str] = ()) -> tuple[dict, list[str]]:
    """``(the launch flags given, the other arguments)`` of a ``tokenweave train`` / ``critical`` command line: the
    launch flags are ``--accelerate_config`` (or ``--config_file``) and the ``accelerate launch`` flags that are not
    among the command's own options ``training_options`` (TRL's rule: module docstring). Values are converted as
    ``accelerate launch`` converts them; a switch (``--multi_gpu``) is True, a repeatable flag (``--env``) a list.
    ``--env`` is accelerate's here even where ``env`` is a config key: ``TrlParser`` reads ``env`` from the config
    file only, and ``trl`` passes ``--env`` to ``accelerate launch``."""
    options = pass_through_options(set(training_options) - TRL_CONFIG_KEYS)
    launch, rest = {}, []
    tokens = iter(argv)
    for token in tokens:
        flag, has_value, value = token.partition("=")
        name = option_name(flag) if flag.startswith("--") else None
        if name in (CONFIG_SETTING, "config_file"):
            launch[CONFIG_SETTING] = value if has_value else flag_value(flag, tokens)
        elif name in options:
            action = options[name]
            name = canonical_name(action)
            if action.nargs == 0:
                if has_value:
                    raise ValueError(f"{token}: {flag} is an `accelerate launch` switch and takes no value; give {flag}"
                                     " alone.")
                launch[name] = True
            else:
                typed = converted(flag, action, value if has_value else flag_value(flag, tokens))
                if isinstance(action, argparse._AppendAction):
                    launch.setdefault(name, []).append(typed)
                else:
                    launch[name] = typed
        else:
            rest.append(token)
    return launch, rest


def flag_value(flag: str, tokens) -> str:
    """The value after ``flag`` on the command line (the next token); a ``ValueError`` if there is none."""
    value = next(tokens, None)
    if value is None or value.startswith("--"):
        raise ValueError(f"{flag} needs a value (it is a launch flag): give {flag} VALUE.")
    return value


def converted(flag: str, action: argparse.Action, value: str):
    """``value`` as ``accelerate launch`` converts it for ``flag`` (``int`` for ``--num_processes``)."""
    if action.type is None:
        return value
    try:
        return action.type(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {value!r}: not a valid value for `accelerate launch {flag}` "
                         f"({getattr(action.type, '__name__', 'see accelerate launch --help')}).") from None


def launch_settings_from_config(config: dict, training_options: Collection[str] = ()) -> tuple[dict, dict]:
    """``(the launch settings of a run config, the config without them)``: the YAML keys ``accelerate_config`` (or
    ``config_file``) and those named as an ``accelerate launch`` flag that is not one of the run's options
    ``training_options``, as TRL hands a config's leftover keys to ``accelerate launch``; ``env`` stays TRL's. A
    switch's key takes true or false (false: not given), a repeatable flag's key a list; null is not given."""
    options = pass_through_options(training_options)
    launch, rest = {}, {}
    for key, value in config.items():
        name = option_name(key)
        if value is None and (name in (CONFIG_SETTING, "config_file") or name in options):
            continue  # null: not set
        if name in (CONFIG_SETTING, "config_file"):
            launch[CONFIG_SETTING] = value
        elif name in options and name not in TRL_CONFIG_KEYS:
            action = options[name]
            if action.nargs == 0:
                if not isinstance(value, bool):
                    raise ValueError(f"Config key {key}: {value!r}: `accelerate launch --{name}` is a switch; set "
                                     "true or false.")
                if value:
                    launch[canonical_name(action)] = True
            elif isinstance(action, argparse._AppendAction):
                launch[canonical_name(action)] = value if isinstance(value, list) else [value]
            else:
                launch[canonical_name(action)] = str(value).lower() if isinstance(value, bool) else value
        else:
            rest[key] = value
    return launch, rest


def launch_settings(argv: list[str], training_options: Collection[str] = ()) -> tuple[dict, list[str]]:
    """``(the launch settings of a command line, the command line without its launch flags)``: the keys of its
    ``--config`` file (:func:`launch_settings_from_config`) overridden by its flags (:func:`split_launch_arguments`)."""
    from_config, _ = launch_settings_from_config(config_file_of(argv), training_options)
    from_command_line, rest = split_launch_arguments(argv, training_options)
    return {**from_config, **from_command_line}, rest


def launch_argv(launch: dict) -> list[str]:
    """The command-line flags of the launch settings ``launch`` (as :func:`launch_settings` returns them): a switch
    alone, a repeatable flag once per value."""
    argv = []
    for name, value in launch.items():
        if value is True:
            argv.append(f"--{name}")
        else:
            values = value if isinstance(value, list) else [value]
            argv += [part for item in values for part in (f"--{name}", str(item))]
    return argv


def run_launched(module: str, argv: list[str], launch: dict) -> None:
    """``python -m <module> <argv> <launch flags>`` in a process of its own (a module whose main calls
    :func:`relaunch`, so it runs under ``accelerate launch``); ``RuntimeError`` if it fails."""
    command = [sys.executable, "-m", module, *argv, *launch_argv(launch)]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"The launched command {' '.join(command)} failed (its output is above).")


def relaunch(module: str, argv: list[str], training_options: Collection[str] = ()) -> bool:
    """Run ``python -m <module> <argv without the launch flags>`` under ``accelerate launch`` if ``argv`` or its
    ``--config`` file has launch settings (:func:`launch_settings`; ``training_options``: the module's own options,
    which stay in ``argv``), and return True once it has finished; False (nothing done) without them. In a process a
    launcher started (``LOCAL_RANK`` is set) the config's launch keys are left to that launcher, and launch flags on
    the command line are refused."""
    from_command_line, rest = split_launch_arguments(argv, training_options)
    if "LOCAL_RANK" in os.environ:
        if from_command_line:
            raise ValueError(
                f"{sorted(from_command_line)} given to a process that a launcher already started (LOCAL_RANK is set): "
                "give them to one of the two, not both."
            )
        return False
    from_config, _ = launch_settings_from_config(config_file_of(argv), training_options)
    launch = {**from_config, **from_command_line}
    if not launch:
        return False
    from accelerate.commands.launch import launch_command, launch_command_parser

    accelerate_args = []
    if CONFIG_SETTING in launch:
        accelerate_args += ["--config_file", str(resolve_accelerate_config(str(launch.pop(CONFIG_SETTING))))]
    accelerate_args += launch_argv(launch)
    launch_command(launch_command_parser().parse_args([*accelerate_args, "--module", module, *rest]))
    return True
