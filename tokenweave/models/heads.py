"""LM heads and final hidden states of causal LMs, for code that applies the LM head itself.

TDPO's full-vocabulary KL (:mod:`tokenweave.trainers.dpo`) and the critical-token scores
(:mod:`tokenweave.inference.scoring`) never build ``[B, T, V]`` logits: they take the backbone's final hidden
states (``[B, T, H]``, after the final norm: what the LM head reads) and apply the LM head to a chunk of positions
at a time (:func:`tokenweave.tokens.chunked.map_masked_chunks`). This module is the plumbing they share:

* :func:`causal_lm`: the transformers causal LM inside a model's wrappers (DDP, DeepSpeed, PEFT).
* :func:`final_hidden_states`: capture the backbone's ``last_hidden_state`` during a forward of the whole model
  (TRL's fused-LM-head forward returns no hidden states), with its graph.
* :func:`lm_head_functions`: the LM heads as functions ``[..., H] → [..., V]``; under DeepSpeed ZeRO-3 a frozen
  head is gathered once into a plain ``F.linear``.
* :func:`check_direct_head_calls`: refuse models whose logits are not ``lm_head(hidden)`` (soft-capping,
  scaling), and heads that :func:`lm_head_functions` cannot gather; :func:`check_lm_heads`: that, for a policy and
  its frozen models, plus one vocabulary and no PEFT adapter on a head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel, is_peft_model
from torch import Tensor, nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

HeadFn = Callable[[Tensor], Tensor]
"""An LM head as a function: hidden states ``[..., H]`` to logits ``[..., V]``."""

# Config attributes with which transformers/TRL rescale or soft-cap the logits after the LM head (see
# trl.trainer.utils.add_fused_lm_head). Code that calls the LM head directly (TDPO's KL, critical-token
# scores) would skip them, so it refuses such models.
LOGIT_TRANSFORM_ATTRIBUTES = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a model's wrappers (DDP, DeepSpeed, PEFT): the module TRL patches with
    its fused head, which owns the backbone (``.base_model``) and the LM head (``get_output_embeddings()``).

    With PEFT, the adapter that is active is the one the caller activated.
    """
    model = extract_model_from_parallel(model)  # what Accelerator.unwrap_model does
    return model.get_base_model() if is_peft_model(model) else model


@contextlib.contextmanager
def final_hidden_states(model: nn.Module, enabled: bool = True) -> Iterator[list[Tensor]]:
    """Collect the backbone's ``last_hidden_state`` (``[B, L, H]``) during forwards of ``model``, into the yielded
    list (one entry per forward); with ``enabled=False``, the list stays empty and nothing is hooked.

    A forward hook on ``causal_lm(model).base_model`` gets them from the forward the caller runs anyway (TRL's
    fused-head forward runs the backbone and then the head, and returns no hidden states), with their graph,
    through every wrapper (DDP, DeepSpeed, PEFT).
    """
    captured: list[Tensor] = []
    if not enabled:
        yield captured
        return
    handle = causal_lm(model).base_model.register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state)
    )
    try:
        yield captured
    finally:
        handle.remove()


def lm_head_functions(models: Sequence[nn.Module]) -> tuple[HeadFn, ...]:
    """The LM heads of ``models``, as functions ``[..., H]`` → ``[..., V]`` logits (in the head's dtype).

    A head is its module, except a *frozen* head (no parameter requires grad) under DeepSpeed ZeRO-3: the base
    model's head under PEFT, often tied to the frozen embedding. Code that recomputes a head call in the backward
    (``torch.utils.checkpoint``, as TDPO's chunked KL does) would find its weight released there: ZeRO-3 does not
    keep a frozen module's weight gathered, and the recomputed chunk sees the empty shard (a ``CheckpointError``:
    saved ``[V, H]``, recomputed ``[0]``). Such a head is gathered once per call of this function
    (``deepspeed.zero.GatheredParameters``, a collective every process must make) into a full detached copy,
    applied as ``F.linear(h, W, b)``: no hook, no collective, no gradient, which a frozen weight does not need
    (gradients still reach the hidden states, hence the LoRA weights). A head shared by several models is
    gathered once. A trainable head (full fine-tuning) stays its module: DeepSpeed's hooks gather it in the
    backward and reduce its gradient; every call of it is then a collective (:func:`head_calls_are_collective`).
    """
    heads = [causal_lm(model).get_output_embeddings() for model in models]
    if not is_deepspeed_zero3_enabled():
        return tuple(heads)
    import deepspeed  # only under ZeRO-3, where DeepSpeed is installed

    gathered: dict[int, HeadFn] = {}
    for head in heads:
        if id(head) in gathered or any(param.requires_grad for param in head.parameters()):
            continue
        with deepspeed.zero.GatheredParameters(list(head.parameters())):
            weight = head.weight.detach().clone()
            bias = None if head.bias is None else head.bias.detach().clone()
        gathered[id(head)] = _linear_head(weight, bias)
    return tuple(gathered.get(id(head), head) for head in heads)


def head_calls_are_collective(heads: Sequence[HeadFn]) -> bool:
    """Whether calling these heads gathers sharded weights (a module head under DeepSpeed ZeRO-3): then every
    process must call them the same number of times, whatever its data."""
    return is_deepspeed_zero3_enabled() and any(isinstance(head, nn.Module) for head in heads)


def check_direct_head_calls(model: nn.Module, user: str) -> None:
    """Refuse a model whose logits :func:`lm_head_functions` would not reproduce; ``user`` names the caller in
    the error (e.g. ``"loss_type 'tdpo2'"``).

    ``NotImplementedError`` when its config transforms the head's logits (:data:`LOGIT_TRANSFORM_ATTRIBUTES`), or,
    under DeepSpeed ZeRO-3, when its head is frozen and not an ``nn.Linear`` (it could not be applied as
    ``F.linear``).
    """
    model = causal_lm(model)
    transforms = [
        name for name in LOGIT_TRANSFORM_ATTRIBUTES if getattr(model.config.get_text_config(), name, None) is not None
    ]
    if transforms:
        raise NotImplementedError(
            f"{user} calls the LM head directly and does not support models that transform its logits "
            f"({', '.join(transforms)}) yet."
        )
    head = model.get_output_embeddings()
    frozen = not any(param.requires_grad for param in head.parameters())
    if is_deepspeed_zero3_enabled() and frozen and not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"{user} under DeepSpeed ZeRO-3 needs a frozen LM head that is an nn.Linear (it is gathered once and "
            f"applied as F.linear), not a {type(head).__name__}."
        )


def _linear_head(weight: Tensor, bias: Tensor | None) -> HeadFn:
    """An LM head as a function of fixed tensors: ``h ↦ F.linear(h, weight, bias)``."""

    def head(hidden: Tensor) -> Tensor:
        return F.linear(hidden, weight, bias)

    return head


def check_lm_heads(models: Sequence[nn.Module], user: str) -> None:
    """Refuse what code that applies the LM heads of ``models`` (a policy and its frozen models) itself cannot do:
    logits that are not ``lm_head(hidden)`` (:func:`check_direct_head_calls`), a head with a PEFT adapter or
    ``modules_to_save`` (a frozen model read with the policy's adapter off goes through the same head module, after
    the adapter is back on), and models of different vocabularies."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    for model in models:
        check_direct_head_calls(model, user)
        if isinstance(causal_lm(model).get_output_embeddings(), (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            raise NotImplementedError(f"{user} apply the LM head directly: not with a PEFT adapter or "
                                      "modules_to_save on the head.")
    vocabularies = {causal_lm(model).config.get_text_config().vocab_size for model in models}
    if len(vocabularies) > 1:
        raise ValueError(f"{user} compare the models' next-token distributions: their vocabularies differ "
                         f"({sorted(vocabularies)} tokens).")
