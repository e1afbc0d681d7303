#!/bin/bash
# Training under torchrun instead of `accelerate launch`, on one machine or several (run the same command on each,
# with the same MASTER_ADDR: torchrun's c10d rendezvous hands out the machine ranks).
#
# DeepSpeed under torchrun: the processes are plain torchrun workers, and accelerate's Accelerator (which the TRL
# trainer builds) reads its distributed set-up from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR, ...) and DeepSpeed's from ACCELERATE_* variables, the ones `accelerate launch` exports from a config:
#   - ACCELERATE_USE_DEEPSPEED=true with ACCELERATE_DEEPSPEED_ZERO_STAGE=<stage> (and the other ACCELERATE_DEEPSPEED_*
#     variables), as launch/zero2.yaml and launch/zero3.yaml give them: what ZERO_STAGE=2 or 3 sets here;
#   - or ACCELERATE_USE_DEEPSPEED=true with ACCELERATE_DEEPSPEED_CONFIG_FILE=<ds_config.json>, a DeepSpeed JSON config
#     (export both before running this script).
# Both are what `accelerate launch` sets, for GPUs as for CPU (checked with 2 CPU processes of a use_cpu: true run: a
# DeepSpeedEngine of the given stage). transformers' own way, the run config's `deepspeed:` key
# (TrainingArguments.deepspeed: a DeepSpeed JSON file or dict), is for GPUs only: with use_cpu: true transformers
# sets up a plain CPU process group, and each process's DeepSpeed engine then counts a world of one and fails.
# Without any of these, the run is plain DistributedDataParallel.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: CONFIG=configs/<run>.yaml launch/torchrun.sh [--key value ...]

Runs `python -m tokenweave.train --config "$CONFIG" [--key value ...]` under torchrun: NPROC_PER_NODE processes on
each of NNODES machines. Several machines: run the same command on each one. Arguments after the script go to
tokenweave.train.

environment (default):
  CONFIG          the run config (required)
  NNODES          machines (1)
  NPROC_PER_NODE  processes per machine: a number, gpu or cpu (gpu: one per GPU)
  MASTER_ADDR     address of the rendezvous, one of the machines (localhost)
  MASTER_PORT     its port (29500)
  RDZV_ID         the run's rendezvous id, the same on every machine (tokenweave)
  ZERO_STAGE      2 or 3: DeepSpeed ZeRO-2 / ZeRO-3 as launch/zero2.yaml, launch/zero3.yaml set them up; empty:
                  no DeepSpeed unless the run config has a deepspeed: key (empty)
  DRY_RUN         1: print the command instead of running it (0)
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi
if [[ -z "${CONFIG:-}" ]]; then
    usage >&2
    echo "error: set CONFIG" >&2
    exit 2
fi

NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-gpu}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-tokenweave}"
ZERO_STAGE="${ZERO_STAGE:-}"

# The variables `accelerate launch` exports for launch/zero2.yaml and launch/zero3.yaml (accelerate.utils.launch).
case "$ZERO_STAGE" in
    "") deepspeed_env=() ;;
    2) deepspeed_env=(ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=2) ;;
    3) deepspeed_env=(ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=3 ACCELERATE_DEEPSPEED_ZERO3_INIT=true
                      ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL=true) ;;
    *) echo "error: ZERO_STAGE must be 2, 3 or empty, not $ZERO_STAGE" >&2; exit 2 ;;
esac

command=(
    torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID"
    -m tokenweave.train --config "$CONFIG" "$@"
)
if (( ${#deepspeed_env[@]} )); then
    command=(env "${deepspeed_env[@]}" "${command[@]}")
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
else
    exec "${command[@]}"
fi
