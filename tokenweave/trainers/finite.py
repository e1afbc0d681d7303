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
gradient norm           a non-finite gradient norm stops the run before the optimizer step (under DeepSpeed, which
                        steps inside the backward pass, right after it, before the weights are logged or saved)
======================  ==============================================================================================

Stopping raises out of ``trainer.train()``: nothing after it runs, so no non-finite loss is logged (transformers'
``logging_nan_inf_filter`` would log the running mean instead) and no model with non-finite weights is saved. The
checks are collective (a flag summed over processes), so every process stops together. Data is checked before any
of this: each token signal's per-token values (cDPO's scores and weights, a weight column) when the dataset is
loaded (the signals' ``check_dataset``).
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


class FiniteTrainingMixin:
    """The loss and gradient-norm rules (module docstring), for a transformers ``Trainer`` subclass: listed first
    among its bases, so its ``compute_loss`` wraps the trainer's own."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        processes = any_non_finite(self, loss)
        if processes:
            raise NonFiniteError(
                f"The loss is not finite ({loss.detach().float().mean().item()} here) at step "
                f"{self.state.global_step} on {processes} of {self.accelerator.num_processes} process(es): stopped "
                "before its backward pass; nothing was saved. Check the inputs of the loss (rewards, advantages, "
                "token weights, learning rate)."
            )
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm
        if value is not None and not math.isfinite(value):
            raise NonFiniteError(
                f"The gradient norm is {value} at step {self.state.global_step} (the loss was finite): stopped "
                "before the optimizer step, nothing was saved."
            )
        return grad_norm
