"""Process invariance of every registered policy loss, launched by ``tests/distributed/test_grpo.py``: 2 processes ×
batch 4 = batch 8 on one process::

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/grpo_invariance_probe.py --model_dir DIR --output grads.pt

Every rank builds the same tiny model (from ``--model_dir``) and the same generation batch of 8 hand-made, off-policy
completions (``tests/grpo_harness.py``: ``make_batch``, unequal lengths, so a per-process token mean would differ
from the global one), keeps its half (``process_slice``: rows ``4r .. 4r + 3``, as TRL splits a generation batch over
processes), runs the trainer's ``compute_loss`` + backward on it, then averages the gradients over processes as DDP
does (gloo all-reduce / world size). ``num_items_in_batch`` is the generation batch's global token count on every
rank, as TRL's ``_generate_and_score_completions`` gathers it. Rank 0 writes, per loss, the mean of the ranks' losses
(what Trainer logs), each rank's own loss and the averaged gradients. The test computes the single-process results
with the harness's ``loss_and_grads`` on the same batch and compares.

For hapo, each rank adds the batch column ``entropy_signal`` to its half as ``_generate_and_score_completions`` does
(``with_generation_signals``: the HAPO signal's statistics of both ranks' entropies); the single-process side
computes it on the whole batch.

And Rank-GRPO's per-rank advantages when a prompt's group spans the processes: 8 hand-written answers to one request
(``rank_generation``), 4 on each rank, through the rank_grpo signal's ``after_generation`` (its rewards gathered over
processes); rank 0 writes both ranks' advantages under :data:`RANK_ADVANTAGES`. And attention credit's advantages
(A · γ) of each rank's half of the hand-made batch, under :data:`ATTENTION_ADVANTAGES`. And RLSD: each rank adds its
half's teacher columns (``after_generation``: the frozen teacher's log-probs of its own rows) and runs the loss,
gradients averaged, under :data:`RLSD_UPDATE`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

NUM_PROCESSES = 2
HAPO_OFF = dict(hapo_adaptive_temperature=False)  # sampling is not exercised: the batch is made by hand
RANK_ADVANTAGES = "rank_grpo advantages"  # the results' entry of the Rank-GRPO group split over the processes
ATTENTION_ADVANTAGES = "attention_credit advantages"  # and of attention credit on the two halves of the batch
RLSD_UPDATE = "rlsd update"  # and RLSD's loss and averaged gradients


def invariance(args) -> None:
    import torch.distributed as dist

    from tokenweave.losses.policy import POLICY_LOSSES
    from tests.grpo_harness import (
        ATTENTION_CREDIT, attention_credit_advantages, loss_and_grads, make_batch, make_trainer, process_slice,
        rank_advantages, rlsd_generation_columns, rlsd_trainer, with_generation_signals,
    )

    def averaged_update(trainer, local: dict) -> dict:
        """The loss of this rank's half and the gradients averaged over the ranks, as DDP averages them."""
        local_loss, grads = loss_and_grads(trainer, [local])
        local_losses = [torch.zeros((), dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(local_losses, torch.tensor(local_loss, dtype=torch.float64))
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world_size
        return {
            "loss": sum(local_losses).item() / world_size,  # what Trainer logs: the mean over processes
            "grads": grads,
            "local_losses": [loss.item() for loss in local_losses],
        }

    results = {}
    world_size = rank = None
    for policy_loss in sorted(POLICY_LOSSES):
        # One process's view: a generation batch of 4 per process, one update per generation (GA 1).
        trainer = make_trainer(
            args.model_dir, args.output_dir, policy_loss=policy_loss, per_device_train_batch_size=4, **HAPO_OFF
        )
        world_size, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
        assert world_size == NUM_PROCESSES and dist.is_initialized() and dist.get_backend() == "gloo"
        # hapo: ĥ with the statistics of both ranks' tokens (a collective)
        local = with_generation_signals(trainer, process_slice(make_batch(trainer), rank, world_size))
        results[policy_loss] = averaged_update(trainer, local)
        del trainer
        gc.collect()
    # Rank-GRPO: one group of 8 completions split over the 2 processes (4 each); the per-rank advantages of each
    # process's rows, gathered to rank 0 (the test compares them with one process holding the whole group)
    trainer = make_trainer(args.model_dir, args.output_dir, policy_loss="rank_grpo", per_device_train_batch_size=4,
                           num_generations=8, rank_list_length=3, rank_catalog="recommendation")
    local = rank_advantages(trainer, slice(4 * rank, 4 * rank + 4))
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    results[RANK_ADVANTAGES] = gathered
    # attention credit: γ of each process's half of the hand-made batch (head groups over both processes)
    trainer = make_trainer(args.model_dir, args.output_dir, policy_loss="dapo", per_device_train_batch_size=4,
                           **ATTENTION_CREDIT)
    local = attention_credit_advantages(trainer, process_slice(make_batch(trainer), rank, world_size))
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    results[ATTENTION_ADVANTAGES] = gathered
    # RLSD: each rank's half with the teacher's log-probs of its own rows
    trainer = rlsd_trainer(args.model_dir, args.output_dir, per_device_train_batch_size=4)
    local = process_slice(make_batch(trainer), rank, world_size)
    local |= rlsd_generation_columns(trainer, local, slice(4 * rank, 4 * rank + 4))
    results[RLSD_UPDATE] = averaged_update(trainer, local)
    if rank == 0:
        torch.save(results, args.output)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--output_dir", default=None, help="the trainers' output_dir (nothing is saved there)")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or str(Path(args.output).parent / "trainer")
    invariance(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tokenweave and tests from this checkout
    main(sys.argv[1:])
