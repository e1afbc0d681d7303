"""Process invariance of every registered policy loss, launched by ``tests/test_grpo_distributed.py``: 2 processes ×
batch 4 = batch 8 on one process::

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo_invariance_probe.py --model_dir DIR --output grads.pt

Every rank builds the same tiny model (from ``--model_dir``) and the same generation batch of 8 hand-made, off-policy
completions (:func:`make_batch`, unequal lengths, so a per-process token mean would differ from the global one),
keeps its half (rows ``4r .. 4r + 3``, as TRL splits a generation batch over processes), runs the trainer's
``_compute_loss`` + backward on it, then averages the gradients over processes as DDP does (gloo all-reduce / world
size). ``num_items_in_batch`` is the generation batch's global token count on every rank, as TRL's
``_generate_and_score_completions`` gathers it. Rank 0 writes, per loss, the mean of the ranks' losses (what Trainer
logs), each rank's own loss and the averaged gradients. The test computes the single-process results with
:func:`loss_and_grads` on the same batch and compares.

For hapo, each rank adds the batch column ``entropy_signal`` to its half as ``_generate_and_score_completions`` does
(:meth:`TokenGRPOTrainer._generation_entropy_signal`: its own entropies, statistics gathered over both ranks); the
single-process side computes it on the whole batch.
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

# A generation batch of 8 completions (2 prompts × 4); TRL's split of it over 2 processes gives rows 0-3 and 4-7,
# whose token counts differ (21 vs 18).
LENGTHS = [6, 3, 5, 1, 6, 2, 4, 6]
PROMPT_LENGTH = 5
NUM_PROCESSES = 2
HAPO_OFF = dict(hapo_adaptive_temperature=False)  # sampling is not exercised: the batch is made by hand


def digit_reward(completions, **kwargs):
    """Unused by the probes (the batch is hand-made); GRPOTrainer needs a reward function."""
    return [0.0 for _ in completions]


def make_trainer(model_dir: str, output_dir: str, policy_loss: str, **overrides):
    """A TokenGRPOTrainer on the tiny model as test_grpo_trainer.make_trainer builds it (batch 8 unless overridden)."""
    from tokenweave.data.arithmetic import load_arithmetic
    from tokenweave.trainers import TokenGRPOConfig, TokenGRPOTrainer

    kwargs = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=max(LENGTHS),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        policy_loss=policy_loss,
        **HAPO_OFF,
    )
    config = TokenGRPOConfig(**(kwargs | overrides))
    dataset = load_arithmetic("train", "prompt", 16)
    trainer = TokenGRPOTrainer(model=model_dir, reward_funcs=[digit_reward], args=config, train_dataset=dataset)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps  # set by Trainer when training
    return trainer


def token_logps_and_entropies(trainer, batch):
    """The policy's per-token log-probs and entropies ``[B, T]`` of a batch's completions, without gradient."""
    with torch.no_grad():
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            batch["completion_ids"].size(1),
            compute_entropy=True,
        )
    return logps, entropies


def make_batch(trainer, seed: int = 0, log_ratio_std: float = 0.3) -> dict:
    """The generation batch of 8 (deterministic given the model's weights), off-policy: old log-probs are the
    model's shifted by N(0, 0.3²), so ratios leave the clip ranges."""
    generator = torch.Generator().manual_seed(seed)
    n, width = len(LENGTHS), max(LENGTHS)
    pad = trainer.processing_class.pad_token_id
    prompt_mask = (torch.arange(PROMPT_LENGTH) >= torch.tensor([0, 2] * (n // 2)).unsqueeze(1)).long()  # left pad
    completion_mask = (torch.arange(width) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    batch = {
        "prompt_ids": torch.randint(4, 100, (n, PROMPT_LENGTH), generator=generator).masked_fill(prompt_mask == 0, pad),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(4, 100, (n, width), generator=generator).masked_fill(completion_mask == 0, pad),
        "completion_mask": completion_mask,
        "advantages": torch.randn(n, generator=generator),
    }
    batch["num_items_in_batch"] = batch["completion_mask"].sum()  # TRL: the global count of the generation batch
    logps, _ = token_logps_and_entropies(trainer, batch)
    batch["old_per_token_logps"] = logps + log_ratio_std * torch.randn(logps.shape, generator=generator)
    batch["ref_per_token_logps"] = logps + log_ratio_std * torch.randn(logps.shape, generator=generator)
    return batch


def process_slice(batch: dict, rank: int, num_processes: int = NUM_PROCESSES) -> dict:
    """Process ``rank``'s rows of the generation batch, completions trimmed to its own longest one (TRL pads each
    process's completions to the local maximum); ``num_items_in_batch`` stays the global count."""
    rows = len(batch["advantages"]) // num_processes
    local = {key: value[rank * rows:(rank + 1) * rows] for key, value in batch.items() if key != "num_items_in_batch"}
    width = int(local["completion_mask"].sum(-1).max())
    for key in ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps"):
        local[key] = local[key][:, :width]
    local["num_items_in_batch"] = batch["num_items_in_batch"]
    return local


def loss_and_grads(trainer, batches: list[dict]) -> tuple[float, list[torch.Tensor]]:
    """Σ of the micro-batch losses (as Trainer accumulates them), and the accumulated gradients."""
    trainer.model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        total += loss.item()
    return total, [param.grad.detach().clone() for param in trainer.model.parameters()]


def invariance(args) -> None:
    import torch.distributed as dist

    from tokenweave.losses.policy import POLICY_LOSSES

    results = {}
    for policy_loss in sorted(POLICY_LOSSES):
        # One process's view: a generation batch of 4 per process, one update per generation (GA 1).
        trainer = make_trainer(args.model_dir, args.output_dir, policy_loss, per_device_train_batch_size=4)
        world_size, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
        assert world_size == NUM_PROCESSES and dist.is_initialized() and dist.get_backend() == "gloo"
        local = process_slice(make_batch(trainer), rank, world_size)
        if trainer.entropy_signal_from_generation:  # hapo: ĥ with the statistics of both ranks' tokens
            local["entropy_signal"] = trainer._generation_entropy_signal(local)[1]
        local_loss, grads = loss_and_grads(trainer, [local])
        local_losses = [torch.zeros((), dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(local_losses, torch.tensor(local_loss, dtype=torch.float64))
        for grad in grads:  # DDP: gradients averaged over processes
            dist.all_reduce(grad)
            grad /= world_size
        results[policy_loss] = {
            "loss": sum(local_losses).item() / world_size,  # what Trainer logs: the mean over processes
            "grads": grads,
            "local_losses": [loss.item() for loss in local_losses],
        }
        del trainer
        gc.collect()
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
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tokenweave from this checkout
    main(sys.argv[1:])
