"""Non-finite values never pass silently: the rules every tokenweave trainer follows (SFT, DPO, GRPO).

======================  ==============================================================================================
value                   rule
======================  ==============================================================================================
reward                  NaN (or None) from a reward function is "no reward from it" (TRL's rule: the functions'
                        weighted ``nansum``; a completion with no reward at all gets advantage 0); ±inf is made NaN
                        too, so it falls under the same rule, and counted: ``rewards/non_finite`` (all processes)
token-signal output     a NaN or ±inf in what a token signal returns (advantages, weights, ...), in any trainer,
                        stops the run: :class:`NonFiniteError` naming the signal and the column (``trainers.host``)
loss                    a non-finite loss on any process stops the run before its backward pass (so before any
                        optimizer step): :class:`NonFiniteError` with the step and the processes
gradient norm           with fp16 loss scaling (accelerate's ``GradScaler``, or DeepSpeed's fp16 loss scale) a
                        non-finite gradient norm is the scaler's overflow signal: the scaler skips that optimizer
                        step and lowers its scale, which is normal, so the run goes on and counts it: the metric
                        ``skipped_steps`` (the steps skipped since the previous log) in every training log.
                        Anywhere else (fp32, bf16, a model loaded in float16 and trained without a scaler) it stops
                        the run before the optimizer step (under DeepSpeed, which steps inside the backward pass,
                        right after it, before the weights are logged or saved)
======================  ==============================================================================================

Stopping raises out of ``trainer.train()``: nothing after it runs, so no non-finite loss is logged (transformers'
``logging_nan_inf_filter`` would log the running mean instead) and no model with non-finite weights is saved. The
error gives the step as the log numbers it (:func:`logged_step`). The checks are collective (a flag summed over
processes), so every process stops together. Data is checked before any of this: each token signal's per-token
values (cDPO's scores and weights, a weight column) when the dataset is loaded (the signals' ``check_dataset``).
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(FloatingPointError):
    """A NaN or infinity where training cannot go on (module docstring)."""


def any_non_finite(trainer, value: torch.Tensor) -> int:
    """The number of processes whose ``value`` holds a NaN or ±inf (a collective: every process must call it)."""
    flag = (~torch.isfinite(value.detach())).any().float().reshape(1)
    return int(trainer.accelerator.reduce(flag.to(trainer.accelerator.device), reduction="sum").item())


def logged_step(trainer) -> int:
    """The step the log gives what the trainer computes now: in training, the optimizer step under way
    (``state.global_step`` counts the finished ones, and the log numbers a step once it is done, from 1); in
    evaluation, the last finished step, whose number the evaluation's log carries."""
    return trainer.state.global_step + (1 if trainer.model.training else 0)


class FiniteTrainingMixin:
    """The loss and gradient-norm rules (module docstring), for a transformers ``Trainer`` subclass: listed first
    among its bases, so its ``compute_loss`` wraps the trainer's own."""

    _steps_skipped_since_log = 0
    """Optimizer steps the loss scaler skipped (gradient overflow) since the last training log."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        processes = any_non_finite(self, loss)
        if processes:
            raise NonFiniteError(
                f"The loss is not finite ({loss.detach().float().mean().item()} here) at step {logged_step(self)} on "
                f"{processes} of {self.accelerator.num_processes} process(es): stopped before its backward pass; "
                "nothing was saved. Check the inputs of the loss (rewards, advantages, token weights, learning rate)."
            )
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm
        if value is None or math.isfinite(value):
            return grad_norm
        if self._loss_scaler_skips_step():
            self._steps_skipped_since_log += 1
            return grad_norm
        raise NonFiniteError(
            f"The gradient norm is {value} at step {logged_step(self)} (the loss was finite, no loss scaler skips "
            "the step): stopped before the optimizer step, nothing was saved."
        )

    def _loss_scaler_skips_step(self) -> bool:
        """Whether a loss scaler skips this optimizer step, whose gradient norm is not finite: accelerate's
        ``GradScaler`` (fp16 mixed precision), which skips a step whose unscaled gradients hold an inf or a NaN, or
        DeepSpeed's fp16 loss scale, which has already skipped it (DeepSpeed steps inside the backward pass)."""
        if self._has_grad_scaler():
            return True
        return self.is_deepspeed_enabled and self.accelerator.optimizer_step_was_skipped

    def _has_grad_scaler(self) -> bool:
        """Whether accelerate's ``GradScaler`` scales the loss (one built disabled, ``GradScalerKwargs(enabled=False)``,
        skips no step)."""
        scaler = self.accelerator.scaler
        return scaler is not None and scaler.is_enabled()

    def _scales_loss(self) -> bool:
        """Whether the run has a loss scaler: accelerate's ``GradScaler``, or DeepSpeed with fp16."""
        return self._has_grad_scaler() or (self.is_deepspeed_enabled and self.args.fp16)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The trainer's log; with a loss scaler, each training log also gives ``skipped_steps``: the optimizer steps
        the scaler skipped since the previous training log (their ``grad_norm`` is logged as the inf it was)."""
        if "loss" in logs and self._scales_loss():
            logs = {**logs, "skipped_steps": float(self._steps_skipped_since_log)}
            self._steps_skipped_since_log = 0
        super().log(logs, *args, **kwargs)
