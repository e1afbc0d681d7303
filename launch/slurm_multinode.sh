#!/bin/bash
#SBATCH --job-name=tokenweave
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#
# Multi-node training under SLURM with DeepSpeed ZeRO-3: one `accelerate launch` per node (one task per node, hence
# --ntasks-per-node=1), each starting a process per GPU of its node (launch/multinode_zero3.yaml).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: CONFIG=configs/<run>.yaml sbatch [--nodes N] [--gpus-per-node G] launch/slurm_multinode.sh [--key value ...]

Runs `python -m tokenweave.train --config "$CONFIG" [--key value ...]` on every GPU of the job's nodes under
`accelerate launch` with DeepSpeed ZeRO-3. Submit from the repository root: sbatch runs a copy of this script, so
paths are taken from the directory sbatch was run in. Arguments after the script go to tokenweave.train.

environment (default):
  CONFIG             the run config (required)
  ACCELERATE_CONFIG  the accelerate config ($SLURM_SUBMIT_DIR/launch/multinode_zero3.yaml); its num_machines,
                     num_processes, machine_rank and main_process_ip are replaced by the job's
  GPUS_PER_NODE      processes per node ($SLURM_GPUS_ON_NODE, else 8)
  MAIN_PROCESS_IP    address of machine 0 (the first host of the job's node list)
  MAIN_PROCESS_PORT  its port (29500)
  DRY_RUN            1: print the command instead of running it (0)
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi
if [[ -z "${CONFIG:-}" || -z "${SLURM_JOB_NODELIST:-}" ]]; then
    usage >&2
    echo "error: set CONFIG, and run this script with sbatch (SLURM_JOB_NODELIST is not set otherwise)" >&2
    exit 2
fi

ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-${SLURM_SUBMIT_DIR:-$PWD}/launch/multinode_zero3.yaml}"
if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
    echo "error: no accelerate config $ACCELERATE_CONFIG: submit from the repository root or set ACCELERATE_CONFIG" >&2
    exit 2
fi
NUM_NODES="${SLURM_NNODES:?SLURM_NNODES is not set}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
if [[ -z "${MAIN_PROCESS_IP:-}" ]]; then
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MAIN_PROCESS_IP="${hosts[0]:?scontrol listed no hosts for $SLURM_JOB_NODELIST}"
fi

# srun starts one task per node. Each node's machine rank is its SLURM_NODEID (0 .. nodes - 1; with one task per node
# the same as SLURM_PROCID), which only that task knows: hence `bash -c` with the variable in single quotes.
command=(
    srun --nodes "$NUM_NODES" --ntasks-per-node 1
    bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-launch
    --config_file "$ACCELERATE_CONFIG"
    --num_machines "$NUM_NODES"
    --num_processes "$((NUM_NODES * GPUS_PER_NODE))"
    --main_process_ip "$MAIN_PROCESS_IP"
    --main_process_port "$MAIN_PROCESS_PORT"
    -m tokenweave.train --config "$CONFIG" "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
else
    exec "${command[@]}"
fi
