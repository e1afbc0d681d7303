"""The launch scripts of ``launch/``, which need a SLURM cluster or GPUs to run for real: their bash syntax, and the
command each one builds, printed with ``DRY_RUN=1`` (or run by fake ``srun`` / ``accelerate`` commands) under the
variables that SLURM or the user would set."""

import os
import shlex
import subprocess

import pytest

from .conftest import LAUNCH

SLURM_SCRIPT = LAUNCH / "slurm_multinode.sh"
TORCHRUN_SCRIPT = LAUNCH / "torchrun.sh"

# what sbatch sets for a job on two nodes of 4 GPUs each, submitted from the repository root
SLURM_JOB = {
    "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_SUBMIT_DIR": str(LAUNCH.parent),
}
FAKE_COMMANDS = {
    # the job's hosts, as `scontrol show hostnames` expands its node list
    "scontrol": '[[ "$*" == "show hostnames gpu-node-[07-08]" ]] && printf "gpu-node-07\\ngpu-node-08\\n"',
    # `srun --nodes N --ntasks-per-node 1 COMMAND...`: COMMAND once per node, as SLURM runs it there
    "srun": 'nodes=$2; shift 4; for ((node = 0; node < nodes; node++)); do SLURM_NODEID=$node "$@"; done',
    "accelerate": 'printf "%q " accelerate "$@"; echo',
}
RUN_ARGS = ["--max_steps", "3", "--output_dir", "runs/a run"]  # a space, to check the quoting


@pytest.fixture
def fake_bin(tmp_path):
    """A folder of the fake commands above, to put first on PATH."""
    for name, body in FAKE_COMMANDS.items():
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    return tmp_path


def run_script(script, env: dict, fake_bin=None, args=RUN_ARGS) -> subprocess.CompletedProcess:
    """``bash script args`` with ``env`` as its only variables, besides PATH (``fake_bin`` first)."""
    path = os.environ["PATH"] if fake_bin is None else f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", str(script), *args], env={"PATH": path, **env}, capture_output=True, text=True,
                          timeout=30)


def printed_command(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("script", [SLURM_SCRIPT, TORCHRUN_SCRIPT], ids=lambda path: path.name)
def test_the_scripts_parse_and_explain_themselves(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert run_script(script, {}, args=["--help"]).stdout.startswith("usage: CONFIG=configs/<run>.yaml ")
    refused = run_script(script, {})  # no CONFIG
    assert refused.returncode == 2 and "error: set CONFIG" in refused.stderr


def test_slurm_script_launches_accelerate_once_per_node_with_the_jobs_hosts(fake_bin):
    argv = printed_command(run_script(SLURM_SCRIPT, {**SLURM_JOB, "CONFIG": "configs/run.yaml", "DRY_RUN": "1"},
                                      fake_bin))
    assert argv[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "1"]
    assert 'accelerate launch --machine_rank "$SLURM_NODEID"' in value_of(argv, "-c")
    assert value_of(argv, "--config_file") == str(LAUNCH / "multinode_zero3.yaml")
    assert value_of(argv, "--num_machines") == "2" and value_of(argv, "--num_processes") == "8"
    assert value_of(argv, "--main_process_ip") == "gpu-node-07" and value_of(argv, "--main_process_port") == "29500"
    assert argv[argv.index("-m"):] == ["-m", "tokenweave.train", "--config", "configs/run.yaml", *RUN_ARGS]


def test_slurm_script_gives_each_node_its_machine_rank(fake_bin):
    """Run for real with the fake srun and accelerate: the rank is read on each node."""
    result = run_script(SLURM_SCRIPT, {**SLURM_JOB, "CONFIG": "configs/run.yaml", "MAIN_PROCESS_PORT": "29555"},
                        fake_bin)
    assert result.returncode == 0, result.stderr
    nodes = [shlex.split(line) for line in result.stdout.splitlines()]
    assert [value_of(argv, "--machine_rank") for argv in nodes] == ["0", "1"]
    for argv in nodes:
        assert argv[:2] == ["accelerate", "launch"] and value_of(argv, "--main_process_port") == "29555"
        assert argv[-len(RUN_ARGS):] == RUN_ARGS


def test_slurm_script_refuses_to_run_outside_a_job():
    result = run_script(SLURM_SCRIPT, {"CONFIG": "configs/run.yaml", "DRY_RUN": "1"})
    assert result.returncode == 2 and "run this script with sbatch" in result.stderr


def test_torchrun_script_builds_a_multi_node_rendezvous_with_zero3():
    env = {"CONFIG": "configs/run.yaml", "NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_ADDR": "10.1.2.3",
           "ZERO_STAGE": "3", "DRY_RUN": "1"}
    argv = printed_command(run_script(TORCHRUN_SCRIPT, env))
    torchrun = argv.index("torchrun")
    assert argv[:torchrun] == ["env", "ACCELERATE_USE_DEEPSPEED=true", "ACCELERATE_DEEPSPEED_ZERO_STAGE=3",
                               "ACCELERATE_DEEPSPEED_ZERO3_INIT=true", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL=true"]
    assert value_of(argv, "--nnodes") == "2" and value_of(argv, "--nproc_per_node") == "8"
    assert value_of(argv, "--rdzv_backend") == "c10d" and value_of(argv, "--rdzv_endpoint") == "10.1.2.3:29500"
    assert argv[argv.index("-m"):] == ["-m", "tokenweave.train", "--config", "configs/run.yaml", *RUN_ARGS]


def test_torchrun_script_defaults_to_one_machine_without_deepspeed():
    argv = printed_command(run_script(TORCHRUN_SCRIPT, {"CONFIG": "configs/run.yaml", "DRY_RUN": "1"}))
    assert argv[0] == "torchrun" and value_of(argv, "--nnodes") == "1" and value_of(argv, "--nproc_per_node") == "gpu"
    assert value_of(argv, "--rdzv_endpoint") == "localhost:29500"
    refused = run_script(TORCHRUN_SCRIPT, {"CONFIG": "configs/run.yaml", "ZERO_STAGE": "1", "DRY_RUN": "1"})
    assert refused.returncode == 2 and "ZERO_STAGE must be 2, 3 or empty" in refused.stderr
