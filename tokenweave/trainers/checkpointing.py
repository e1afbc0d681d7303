"""Activation checkpointing with PEFT under DeepSpeed ZeRO-3: the reentrant guard, made to take effect.

PEFT under ZeRO-3 needs reentrant checkpointing (DeepSpeed PR 8130), so TRL 1.16's SFT, DPO and GRPO trainers force
``use_reentrant=True`` there. They write it to ``args.gradient_checkpointing_kwargs`` in their ``__init__``; but
transformers 5 has made that name a deprecated alias, resolved in ``TrainingArguments.__post_init__``, and its
``Trainer`` reads only ``activation_checkpointing_kwargs``. With nothing set by the user, TRL's write lands in a new
dict that nothing reads, and the run checkpoints non-reentrantly (seen under ``accelerate launch`` with
``cpu_zero3``: ``activation_checkpointing_kwargs`` stayed None). :class:`CheckpointingMixin` carries TRL's value over.
"""

from __future__ import annotations


def follow_trl_checkpointing_kwargs(args) -> None:
    """Make ``args.activation_checkpointing_kwargs`` (what transformers reads) the ``gradient_checkpointing_kwargs``
    that TRL wrote after ``__post_init__`` had resolved the two names into one dict (module docstring)."""
    written = args.gradient_checkpointing_kwargs
    if written is not None and written is not args.activation_checkpointing_kwargs:
        args.activation_checkpointing_kwargs = written


class CheckpointingMixin:
    """For a TRL trainer subclass: after TRL's ``__init__``, :func:`follow_trl_checkpointing_kwargs`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        follow_trl_checkpointing_kwargs(self.args)
