"""Token-signal components of ``TokenGRPOTrainer``: what a method adds around TRL's GRPO loop, besides its loss.

A method's per-token signal (HAPO's entropy signal, Rank-GRPO's spans, attention-derived credit, critical-token
weights, ...) is a :class:`TokenSignal` registered by name (``@register_token_signal("name")``) and picked in YAML
(``token_signals: [name, ...]``, or ``package.module:Class``; they run in that order, so a later one sees the columns
of an earlier one, after the signals implied by other fields, e.g. ``policy_loss: rank_grpo``). The trainer calls every signal that is on at four points and does nothing for a signal that is off::

    hook                                 called in (TRL hook)                     a signal returns
    configure(args, requested)           TokenGRPOConfig.__post_init__            whether it is on (it resolves and
     (classmethod)                                                                checks its own config fields)
    needs_generation_entropies(training) _generate_and_score_completions, first   True: keep π_old's token entropies
                                                                                  (Generation.old_policy_entropies)
    sample(generate, training)           _generate_single_turn                    generate()'s result, generated its
                                                                                  way (e.g. with a logits processor)
    after_generation(generation)         _generate_and_score_completions, after   per-token columns [B, ...] merged
                                         TRL's                                    into the batch: "advantages"
                                                                                  replaces TRL's ([B] or [B, T]);
                                                                                  others are the signal's own
    loss_kwargs(inputs, forward)         _compute_loss, before the policy loss    keyword arguments of the registered
                                                                                  policy loss; "token_weights"
                                                                                  multiplies TRL's per-token factors
    state_dict() / load_state_dict()     checkpoint save / resume (with the RNG   what must survive a resume
                                         state)

Columns added after generation survive TRL's buffering, shuffling and splitting into micro-batches (they index dim
0), so a ``[B, T]`` column reaches ``loss_kwargs`` aligned with the micro-batch's completion tokens. The methods this
is shaped for, each one more signal:

- HAPO (:mod:`.hapo`): entropy statistics after generation, an adaptive-temperature ``sample``, token-level
  advantages, ĥ as the loss's ``entropy_signal``; its sampler statistics are its state.
- Rank-GRPO (:mod:`.rank`): after generation, the completions decoded and scored per rank by its own gain
  functions (TRL's reward functions return one scalar per completion; ``Generation.inputs`` gives the rows'
  columns), span ids ``[B, T]`` (rank of each token) and per-rank advantages ``[B, T]`` as ``"advantages"``;
  ``loss_kwargs`` passes the span ids to the registered ``rank_grpo`` loss (the span-mean importance ratio).
- Attention-derived credit: after generation, one extra no-grad forward with attention weights (the policy at
  that point is π_old), then ``"advantages"`` = the current advantages · γ ``[B, T]``.
- Critical-token weights: after generation, a weight column; ``loss_kwargs`` returns it as ``token_weights``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from trl.models.utils import disable_gradient_checkpointing

if TYPE_CHECKING:
    from .grpo import TokenGRPOConfig, TokenGRPOTrainer

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
    batch at once). A signal may then compute its generation-batch statistics in ``loss_kwargs`` from the loss's
    entropies, instead of asking for them at generation (which would cost one more forward).
    """
    return batch.get("old_per_token_logps") is None and (not training or steps_per_generation == 1)


@dataclass
class Generation:
    """What ``after_generation`` sees: TRL's generation batch (with the columns of earlier signals) and its context."""

    trainer: TokenGRPOTrainer
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


@dataclass(frozen=True)
class LossForward:
    """What ``loss_kwargs`` sees of the loss's forward: per-token ``[B, T]`` tensors of the micro-batch."""

    logps: torch.Tensor
    """log π_θ of the sampled tokens (with gradient)."""
    old_logps: torch.Tensor
    """log π_old (TRL's ``old_per_token_logps``, or ``logps`` detached on-policy)."""
    entropies: torch.Tensor
    """token entropies of π_θ."""
    mask: torch.Tensor
    """the completion tokens that enter the loss."""
    training: bool
    sees_generation_batch: bool
    """:func:`loss_sees_generation_batch`."""


class TokenSignal:
    """A token-signal component (module docstring). Every hook is optional: the defaults do nothing.

    Built once per trainer, after TRL's ``GRPOTrainer.__init__``, as ``cls(trainer)``; ``self.trainer`` gives the
    accelerator, the config (``trainer.args``) and TRL's metrics (``trainer._metrics[mode][name].append(float)``).
    """

    name: ClassVar[str]

    def __init__(self, trainer: TokenGRPOTrainer):
        self.trainer = trainer

    @classmethod
    def configure(cls, args: TokenGRPOConfig, requested: bool) -> bool:
        """Resolve and check this signal's config fields; whether it is on (``requested``: listed in
        ``token_signals``; a signal may also be implied by other fields, as ``policy_loss: hapo`` implies hapo)."""
        return requested

    def needs_generation_entropies(self, training: bool) -> bool:
        """Whether ``after_generation`` will call ``generation.old_policy_entropies()`` (then TRL's old-log-prob
        forward, when it runs one, also computes the entropies, and no extra forward is needed)."""
        return False

    def sample(self, generate: Callable[[], Any], training: bool) -> Any:
        """TRL's ``_generate_single_turn``: ``generate()`` returns ``(completion_ids, logprobs)``."""
        return generate()

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        """Per-token columns to add to (or replace in) the generation batch."""
        return {}

    def loss_kwargs(self, inputs: dict, forward: LossForward) -> dict[str, Any]:
        """Keyword arguments of the policy loss for this micro-batch (``token_weights``: multiplied in)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State that a resumed run needs (saved with each checkpoint; tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


TOKEN_SIGNALS: dict[str, type[TokenSignal]] = {}


def register_token_signal(name: str) -> Callable[[type[TokenSignal]], type[TokenSignal]]:
    """Class decorator: register a :class:`TokenSignal` under ``name`` (a name can be taken only once)."""

    def decorator(cls: type[TokenSignal]) -> type[TokenSignal]:
        if TOKEN_SIGNALS.get(name, cls) is not cls:
            raise ValueError(f"a token signal is already registered as {name!r}")
        cls.name = name
        TOKEN_SIGNALS[name] = cls
        return cls

    return decorator


def get_token_signal(name: str) -> type[TokenSignal]:
    """The token signal registered as ``name``, or ``package.module:Class`` (the module is imported, which registers
    a decorated class; an undecorated one is registered under this name); ``ValueError`` listing the registered
    names otherwise."""
    if ":" in name:
        module, _, attribute = name.partition(":")
        signal = getattr(importlib.import_module(module), attribute, None)
        if not (isinstance(signal, type) and issubclass(signal, TokenSignal)):
            raise ValueError(f"token signal {name!r} is not a TokenSignal subclass")
        if TOKEN_SIGNALS.get(getattr(signal, "name", None)) is not signal:
            register_token_signal(name)(signal)
        return signal
    try:
        return TOKEN_SIGNALS[name]
    except KeyError:
        raise ValueError(f"unknown token signal {name!r}; registered: {', '.join(sorted(TOKEN_SIGNALS))}") from None
