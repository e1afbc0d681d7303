"""GRPO's rollout hooks of a token signal: what ``TokenGRPOTrainer`` shows a signal of TRL's generation step.

Only GRPO samples, so only it calls these hooks of a :class:`~tokenweave.trainers.signals.TokenSignal`, for each
signal that is on::

    hook                                 called in (TRL hook)                     a signal returns
    needs_generation_entropies(training) _generate_and_score_completions, first   True: keep π_old's token entropies
                                                                                  (Generation.old_policy_entropies)
    sample(generate, training)           _generate_single_turn                    generate()'s result, generated its
                                                                                  way (e.g. with a logits processor)
    after_generation(generation)         _generate_and_score_completions, after   per-token columns [B, ...] merged
                                         TRL's                                    into the batch: "advantages"
                                                                                  replaces TRL's ([B] or [B, T]);
                                                                                  others are the signal's own

Columns added after generation survive TRL's buffering, shuffling and splitting into micro-batches (they index dim
0), so a ``[B, T]`` column reaches ``token_inputs`` (``TokenBatch.columns``) aligned with the micro-batch's
completion tokens. How the methods use them:

- HAPO (:mod:`.hapo`): entropy statistics after generation, an adaptive-temperature ``sample``, token-level
  advantages, ĥ as the loss's ``entropy_signal``; its sampler statistics are its state.
- Rank-GRPO (:mod:`.rank`): after generation, the completions decoded and scored per rank by its own gain
  functions (TRL's reward functions return one scalar per completion; ``Generation.inputs`` gives the rows'
  columns), span ids ``[B, T]`` (rank of each token) and per-rank advantages ``[B, T]`` as ``"advantages"``;
  ``token_inputs`` passes the span ids to the registered ``rank_grpo`` loss (the span-mean importance ratio).
- Attention-derived credit (:mod:`.attention`): after generation, one extra no-grad forward with attention weights
  (the policy at that point is π_old), then ``"advantages"`` = the current advantages · γ ``[B, T]``.
- RLSD (:mod:`.rlsd`): after generation, one extra no-grad forward of the teacher (the frozen history model, or the
  policy) over teacher prompt + completion gives its log-probs ``[B, T]``, kept with the sign of the advantages;
  ``token_inputs`` turns them into the advantage factor, against the student's log-probs of the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.models.utils import disable_gradient_checkpointing

ROW_KEYS = "signal_row_keys"
"""The generation batch's column of each completion's identity (``TokenGRPOTrainer.generation_row_keys``): the random
control's seeds (``trainers.host``), added when the control shuffles."""

# Marks padding when per-token values of different lengths are gathered across processes (entropies are >= 0).
_GATHER_PAD = -1e9


def gather_values(accelerator, local: torch.Tensor) -> torch.Tensor:
    """1-D tensors of different lengths from every process, concatenated (as TRL's ``get_high_entropy_mask``)."""
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=_GATHER_PAD))
    return gathered[gathered != _GATHER_PAD]


def loss_sees_generation_batch(batch: dict, training: bool, steps_per_generation: int) -> bool:
    """Whether the loss's own forward is π_old's forward over this process's whole generation batch.

    True when TRL computed no old log-probs (on-policy: the loss's policy is the sampling policy) and each process's
    generation batch is one micro-batch (``steps_per_generation`` 1 in training; evaluation scores a generation
    batch at once). A signal may then compute its generation-batch statistics in ``token_inputs`` from the loss's
    entropies, instead of asking for them at generation (which would cost one more forward).
    """
    return batch.get("old_per_token_logps") is None and (not training or steps_per_generation == 1)


@dataclass
class Generation:
    """What ``after_generation`` sees: TRL's generation batch (with the columns of earlier signals) and its context."""

    trainer: Any
    """The ``TokenGRPOTrainer``."""
    output: dict
    training: bool
    captured: list[tuple[torch.Tensor, torch.Tensor]]
    """(log-probs, entropies) of the policy's forwards during TRL's generation step (when some signal asked)."""
    inputs: list[dict]
    """TRL's inputs of this process's generation batch: one dataset row (its columns) per completion."""

    @property
    def completion_mask(self) -> torch.Tensor:
        """``[B, T]`` the completion tokens that enter the loss (TRL's ``completion_mask · tool_mask``)."""
        return self.output["completion_mask"] * self.output.get("tool_mask", 1)

    @property
    def rewards_per_func(self) -> torch.Tensor:
        """``[N, F]`` TRL's rewards of the generation batch, gathered over processes (NaN: a function did not score)."""
        return self.trainer.rewards_per_func

    @property
    def row_keys(self) -> torch.Tensor | None:
        """``[B, k]`` each completion's identity for the random control (``TokenGRPOTrainer.generation_row_keys``;
        None when the control draws no permutation)."""
        return self.output.get(ROW_KEYS)

    @property
    def loss_sees_generation_batch(self) -> bool:
        """:func:`loss_sees_generation_batch` for this batch."""
        return loss_sees_generation_batch(self.output, self.training, self.trainer.args.steps_per_generation)

    def old_policy_entropies(self) -> torch.Tensor:
        """Token entropies ``[B, T]`` of this process's completions under the policy that sampled them (at T_base).

        From TRL's old-log-prob forward when it ran one (the captured forward whose log-probs TRL kept as
        ``old_per_token_logps``; needs ``needs_generation_entropies``), else from one no-grad forward.
        """
        old_logps = self.output.get("old_per_token_logps")
        entropies = next((entropies for logps, entropies in self.captured if logps is old_logps), None)
        if entropies is not None:
            return entropies
        trainer = self.trainer
        args = trainer.args
        batch_size = args.per_device_train_batch_size if trainer.model.training else args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(trainer.model, args.gradient_checkpointing_kwargs):
            _, entropies, _ = trainer.completion_logps_and_entropies(
                trainer.model, self.output, batch_size=batch_size, compute_entropy=True
            )
        return entropies
