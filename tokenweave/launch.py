"""Launching several processes as ``trl`` does: ``tokenweave train --config run.yaml --accelerate_config zero3
--num_processes 8`` re-runs the command through ``accelerate launch`` (in this process, which becomes the launcher).

``--accelerate_config`` takes a path, or the name of a config shipped in the repository's ``launch/`` folder (installed
as the package ``tokenweave.launch_configs``: :func:`accelerate_configs_dir`):

==================  ===========================================================================================
name                what it launches
==================  ===========================================================================================
ddp                 data parallelism, one machine, 8 GPUs, bf16
zero2, zero3        DeepSpeed ZeRO-2 / ZeRO-3, one machine, 8 GPUs, bf16 (ZeRO-3 gathers the 16-bit model on save)
zero3_offload       ZeRO-3 with optimizer state and parameters in CPU memory
fsdp2               PyTorch FSDP2 (``fully_shard``), one machine, 8 GPUs, bf16
multinode_zero3     ZeRO-3 on two machines of 8 GPUs (``--machine_rank``, ``--main_process_ip`` on each; on SLURM,
                    ``launch/slurm_multinode.sh`` sets them)
cpu_ddp, cpu_zero2, CPU variants with 2 processes (no GPU), for tests and laptops; run configs with
cpu_zero3           ``use_cpu: true`` and ``bf16: false``
==================  ===========================================================================================

FSDP has no CPU variant: accelerate (1.15) turns FSDP on only for accelerator devices, and a ``use_cpu`` run under
an FSDP config would silently be plain data parallelism, so :func:`tokenweave.train.build_trainer` refuses it.

``--num_processes``, ``--num_machines``, ``--machine_rank``, ``--main_process_ip`` and ``--main_process_port``
override the config's values, as on ``accelerate launch``. Without any of these flags the command runs in this one
process (which may itself be a process of ``accelerate launch -m tokenweave.train ...``). ``tokenweave critical``
takes the same flags for its training steps (:mod:`tokenweave.pipelines.critical`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path


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
    """The names ``--accelerate_config`` accepts besides a path."""
    return sorted(path.stem for path in accelerate_configs_dir().glob("*.yaml"))


def resolve_accelerate_config(name_or_path: str) -> Path:
    """A shipped config by name (``zero3``), else an existing file; otherwise a ``ValueError`` listing the names."""
    shipped = accelerate_configs_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    raise ValueError(
        f"--accelerate_config {name_or_path!r} is neither a file nor a shipped config: "
        f"one of {accelerate_config_names()}, or a path to an accelerate config YAML."
    )


def launch_arguments_parser() -> argparse.ArgumentParser:
    """The launch flags of ``tokenweave train`` and ``tokenweave critical`` (module docstring)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    group = parser.add_argument_group("launching several processes (as `trl` and `accelerate launch`)")
    group.add_argument("--accelerate_config", metavar="NAME_OR_PATH",
                       help=f"accelerate config to launch with: a path or one of {', '.join(accelerate_config_names())}")
    group.add_argument("--num_processes", type=int, help="processes in all (default: the accelerate config's)")
    group.add_argument("--num_machines", type=int, help="machines (default: the accelerate config's)")
    group.add_argument("--machine_rank", type=int, help="this machine's rank, on multi-machine launches")
    group.add_argument("--main_process_ip", help="address of machine 0, on multi-machine launches")
    group.add_argument("--main_process_port", type=int, help="port of machine 0, on multi-machine launches")
    return parser


def split_launch_arguments(argv: list[str]) -> tuple[dict, list[str]]:
    """``(the launch flags given, the other arguments)`` of a ``tokenweave train`` / ``critical`` command line."""
    launch, rest = launch_arguments_parser().parse_known_args(argv)
    return {name: value for name, value in vars(launch).items() if value is not None}, rest


def launch_argv(launch: dict) -> list[str]:
    """The command-line flags of the launch flags ``launch`` (as :func:`split_launch_arguments` returns them)."""
    return [part for name, value in launch.items() for part in (f"--{name}", str(value))]


def run_launched(module: str, argv: list[str], launch: dict) -> None:
    """``python -m <module> <argv> <launch flags>`` in a process of its own (a module whose main calls
    :func:`relaunch`, so it runs under ``accelerate launch``); ``RuntimeError`` if it fails."""
    command = [sys.executable, "-m", module, *argv, *launch_argv(launch)]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"The launched command {' '.join(command)} failed (its output is above).")


def relaunch(module: str, argv: list[str]) -> bool:
    """Run ``python -m <module> <argv without the launch flags>`` under ``accelerate launch`` if ``argv`` has launch
    flags, and return True once it has finished; False (nothing done) without them."""
    launch, rest = split_launch_arguments(argv)
    if not launch:
        return False
    if "LOCAL_RANK" in os.environ:
        raise ValueError(
            f"{sorted(launch)} given to a process that a launcher already started (LOCAL_RANK is set): give them to "
            "one of the two, not both."
        )
    from accelerate.commands.launch import launch_command, launch_command_parser

    accelerate_args = []
    if "accelerate_config" in launch:
        accelerate_args += ["--config_file", str(resolve_accelerate_config(launch.pop("accelerate_config")))]
    accelerate_args += launch_argv(launch)
    launch_command(launch_command_parser().parse_args([*accelerate_args, "--module", module, *rest]))
    return True
