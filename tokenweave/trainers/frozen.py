"""Frozen models by name, for the token signals of any trainer: the reference, the history model and teachers.

=============  =====================================================================================================
name           the model
=============  =====================================================================================================
``reference``  TRL's reference when the trainer has one (DPO's ``ref_model``, which ``reference_model_path``
               becomes in DPO; GRPO's with ``beta`` > 0); else ``reference_model_path``; else, with PEFT, the
               policy with its adapter off (or switched to TRL's frozen ``"ref"`` adapter); else the policy's
               initial weights, loaded from its path. Exactly TRL's choice in ``DPOTrainer._compute_loss`` (TRL 1.16,
               dpo_trainer.py lines 1327-1338) when no path is given.
``history``    the policy some steps ago: the policy's initial weights (with PEFT and ``history_sync_steps`` 0, the
               policy with its adapter off), and, every ``history_sync_steps`` optimizer steps, θ_h ← (1 − α)·θ_h +
               α·θ with α = ``history_mixup_alpha`` (1: a snapshot; < 1: an EMA; TRL's ``ref_model_sync_steps`` and
               ``ref_model_mixup_alpha`` for its reference). θ is the policy's effective weight: with LoRA, W + ΔW of
               each adapted layer. Saved with each checkpoint (``frozen_models.pt``) and restored on resume.
teachers       ``teacher_model_paths``: name → model path.
=============  =====================================================================================================

Each model is loaded once, when the trainer is built, and shared by every signal that names it; no gradient, dropout
off, TRL's fused LM head (per-token log-probs without ``[B, T, V]`` logits; GRPO's at its sampling temperature), in
``frozen_models_dtype`` (None: the policy's), prepared as TRL prepares DPO's reference (``prepare_deepspeed``: sharded
under ZeRO-3, whole on every process otherwise). A signal reads one through :class:`FrozenForwards`, which runs a
model's forward over the micro-batch when a signal first asks for it. Under ZeRO-3 a forward (and the history
update) is a collective: every process must ask for the same models, whatever its data.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from accelerate.utils import is_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.models.utils import disable_gradient_checkpointing, prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import (
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
    get_config_model_id,
    use_adapter,
)

from ..checks import Range
from ..models import causal_lm, resolve_model
from ..models.heads import HeadFn, head_calls_are_collective, lm_head_functions

FROZEN_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FrozenModelsConfig:
    """The frozen models' fields of the three trainers' configs (a mixin; module docstring)."""

    option_ranges: ClassVar[dict] = {"history_sync_steps": Range(0), "history_mixup_alpha": Range(0, 1, low_open=True)}

    reference_model_path: str | None = field(
        default=None,
        metadata={"help": "The frozen reference of the token signals that read one: a model path or a built-in name. "
                  "None: TRL's reference (DPO's ref_model, GRPO's with beta > 0), else the policy with its adapter "
                  "off (PEFT), else the policy's initial weights."},
    )
    history_sync_steps: int = field(
        default=0,
        metadata={"help": "The history model (of the signals that read one) takes the policy's weights every this "
                  "many optimizer steps (with history_mixup_alpha). 0: never, it stays the policy's initial weights "
                  "(ssToken's released code: the base model)."},
    )
    history_mixup_alpha: float = field(
        default=1.0,
        metadata={"help": "At each history update θ_h ← (1 − α)·θ_h + α·θ: 1 a snapshot of the policy, < 1 an EMA "
                  "(as TRL's ref_model_mixup_alpha)."},
    )
    teacher_model_paths: dict | str | None = field(
        default=None,
        metadata={"help": "Frozen teachers of the token signals, by name: {name: model path or built-in name} (a "
                  "mapping in YAML, JSON on the command line)."},
    )
    frozen_models_dtype: str | None = field(
        default=None,
        metadata={"help": "The dtype the frozen models are loaded in. None: the policy's.",
                  "choices": [None, *FROZEN_DTYPES]},
    )

    def resolve_frozen_models(self) -> None:
        """The command line's JSON for ``teacher_model_paths``, and its names checked."""
        if isinstance(self.teacher_model_paths, str):
            self.teacher_model_paths = json.loads(self.teacher_model_paths)
        reserved = {"reference", "history"} & set(self.teacher_model_paths or {})
        if reserved:
            raise ValueError(f"teacher_model_paths: {sorted(reserved)} name(s) the trainer's own frozen models.")


class FrozenModels:
    """The frozen models a trainer's signals name (module docstring), loaded when it is built."""

    def __init__(self, trainer, names: set[str]):
        self.trainer = trainer
        args = trainer.args
        self.sync_steps = getattr(args, "history_sync_steps", 0)
        self.alpha = getattr(args, "history_mixup_alpha", 1.0)
        self.loaded: dict[str, nn.Module] = {}
        teachers = getattr(args, "teacher_model_paths", None) or {}
        for name in sorted(names):
            path = teachers.get(name)
            if name == "reference":
                if getattr(trainer, "ref_model", None) is not None:
                    continue  # TRL's reference (DPO's reference_model_path is loaded as it)
                path = getattr(args, "reference_model_path", None)
                if path is None and self._policy_is_peft:
                    continue  # the policy with its adapter off
            if name == "history" and self._policy_is_peft and self.sync_steps == 0:
                continue  # the initial policy: the policy with its adapter off
            self.loaded[name] = self._load(path)
        if "history" in self.loaded and self.sync_steps:
            list(_trained_weights(causal_lm(trainer.model)))  # refuses an adapter it cannot follow, before training
            trainer.add_callback(HistorySync(self))

    @property
    def _policy_is_peft(self) -> bool:
        return is_peft_model(self.trainer.accelerator.unwrap_model(self.trainer.model))

    def _load(self, path: str | None) -> nn.Module:
        """A frozen model from ``path`` (None: the policy's initial weights, from the policy's path), as TRL loads
        and prepares DPO's reference (``DPOTrainer.__init__``)."""
        trainer, args = self.trainer, self.trainer.args
        policy = causal_lm(trainer.model)
        if path is None:
            path = get_config_model_id(policy.config)
            if not path:
                raise ValueError("A frozen model from the policy's initial weights needs the policy's path (its "
                                 "config's _name_or_path is empty): give reference_model_path.")
        init_kwargs = dict(args.model_init_kwargs or {})
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            init_kwargs["device_map"] = None
        dtype = getattr(args, "frozen_models_dtype", None)
        init_kwargs["dtype"] = getattr(torch, dtype) if dtype else policy.dtype
        init_kwargs.setdefault("attn_implementation", policy.config._attn_implementation)
        model = create_model_from_path(resolve_model(path), **init_kwargs)
        disable_dropout_in_model(model)
        model.requires_grad_(False)
        model.eval()
        add_fused_lm_head(model, temperature=getattr(args, "temperature", 1.0))
        if trainer.is_deepspeed_enabled:
            return prepare_deepspeed(model, trainer.accelerator)
        if trainer.is_fsdp_enabled:
            return prepare_fsdp(model, trainer.accelerator)
        return trainer.accelerator.prepare_model(model, evaluation_mode=True)

    @contextlib.contextmanager
    def model(self, name: str) -> Iterator[nn.Module]:
        """The frozen model ``name``, to call with TRL's fused head, under ``no_grad`` (module docstring)."""
        trainer = self.trainer
        with torch.no_grad():
            if name == "reference" and getattr(trainer, "ref_model", None) is not None:
                yield trainer.ref_model
            elif name in self.loaded:
                yield self.loaded[name]
            elif name in ("reference", "history"):  # the policy with its adapter off (or on TRL's "ref" adapter)
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                adapter = "ref" if name == "reference" and "ref" in unwrapped.peft_config else None
                with disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs), \
                        use_adapter(unwrapped, adapter_name=adapter):
                    yield trainer.model
            else:
                raise KeyError(f"no frozen model {name!r}: the signals asked for {sorted(self.loaded)}")

    # -- the history model ----------------------------------------------------------------------------------------

    def sync_history(self) -> None:
        """θ_h ← (1 − α)·θ_h + α·θ for every weight the policy trains (a collective under ZeRO-3)."""
        targets = dict(causal_lm(self.loaded["history"]).named_parameters(remove_duplicate=False))
        done = set()  # a tied weight (embeddings and LM head) is updated once
        for module, values in _trained_weights(causal_lm(self.trainer.model)):
            names = [name for name in values if id(targets[name]) not in done]
            done.update(id(targets[name]) for name in names)
            with _gathered([*module.parameters(), *(targets[name] for name in names)], modify=True):
                for name, value in _effective_values(module, values).items():
                    if name in names:
                        targets[name].data.mul_(1 - self.alpha).add_(value.to(targets[name].dtype), alpha=self.alpha)

    def state_dict(self) -> dict[str, Tensor]:
        """The history model's trained weights (what :meth:`sync_history` wrote; a collective under ZeRO-3)."""
        if "history" not in self.loaded or not self.sync_steps:
            return {}
        targets = dict(causal_lm(self.loaded["history"]).named_parameters(remove_duplicate=False))
        state = {}
        for _, values in _trained_weights(causal_lm(self.trainer.model)):
            for name in values:
                with _gathered([targets[name]]):
                    state[name] = targets[name].detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (a collective under ZeRO-3)."""
        if not state:
            return
        targets = dict(causal_lm(self.loaded["history"]).named_parameters(remove_duplicate=False))
        for name, value in state.items():
            with _gathered([targets[name]], modify=True):
                targets[name].data.copy_(value.to(targets[name].device, targets[name].dtype))


class HistorySync(TrainerCallback):
    """Updates the history model every ``history_sync_steps`` optimizer steps (:meth:`FrozenModels.sync_history`)."""

    def __init__(self, frozen: FrozenModels):
        self.frozen = frozen

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.frozen.sync_steps == 0:
            self.frozen.sync_history()


class FrozenForwards:
    """The frozen models' per-token log-probs of one micro-batch, each computed when first asked for
    (``TokenBatch.frozen``). ``forward(model)`` runs one model over the micro-batch and returns ``[R, T]`` aligned
    with the batch's mask; ``known`` holds what the trainer already computed (DPO's reference). ``hidden_forward(model)``
    (SFT) returns ``(log-probs [R, T], final hidden states [R, T, H])`` of the same positions, for :meth:`hidden`;
    ``hidden_first``: :meth:`logps` goes through it too (when a signal reads hidden states, so that another signal's
    log-probs of the same model cost no second forward); ``known_hidden``: hidden states the trainer already has, with
    their model (DPO's reference, kept from the loss's own forward)."""

    def __init__(self, models: FrozenModels | None, forward: Callable[[nn.Module], Tensor],
                 known: dict[str, Tensor] | None = None,
                 hidden_forward: Callable[[nn.Module], tuple[Tensor, Tensor]] | None = None, hidden_first: bool = False,
                 known_hidden: dict[str, tuple[Tensor, nn.Module]] | None = None):
        self._models = models
        self._forward = forward
        self._hidden_forward = hidden_forward
        self._hidden_first = hidden_first
        self._cache = dict(known or {})
        self._hidden: dict[str, tuple[Tensor, HeadFn]] = {}
        self._known_hidden = dict(known_hidden or {})

    def _model(self, name: str):
        if self._models is None:
            raise KeyError(f"no frozen model {name!r}: no token signal of this run named it")
        return self._models.model(name)

    def logps(self, name: str) -> Tensor:
        """log π_name of the batch's tokens ``[R, T]`` (no gradient)."""
        if name not in self._cache and self._hidden_first:  # one forward, whichever a signal asks for first
            self.hidden(name)
        if name not in self._cache:
            with self._model(name) as model:
                self._cache[name] = self._forward(model).detach()
        return self._cache[name]

    def hidden(self, name: str) -> tuple[Tensor, HeadFn]:
        """The frozen model's final hidden states at the batch's positions ``[R, T, H]`` (no gradient) and its LM
        head (:func:`~tokenweave.models.lm_head_functions`); its log-probs come with them."""
        if name not in self._hidden and name in self._known_hidden:
            states, model = self._known_hidden.pop(name)
            self._hidden[name] = (states.detach(), lm_head_functions([model])[0])
        if name not in self._hidden:
            if self._hidden_forward is None:
                raise KeyError("this trainer gives its signals no hidden states")
            with self._model(name) as model:
                logps, hidden = self._hidden_forward(model)
                head = lm_head_functions([model])[0]
            self._cache.setdefault(name, logps.detach())
            self._hidden[name] = (hidden.detach(), head)
        return self._hidden[name]


class HiddenStates:
    """SFT and DPO: the final hidden states (what the LM head reads) at a batch's positions ``[R, T, H]`` and the LM
    heads, of the policy (with its graph) and of the frozen models (``TokenBatch.hidden``), for signals whose math
    needs the whole next-token distribution (EAFT's top-k entropy, ASFT's KL to the reference, AlignDistil's teachers).
    They apply the heads a chunk of
    positions at a time (:func:`~tokenweave.tokens.chunked.map_masked_chunks`), never ``[B, T, V]`` logits; under
    DeepSpeed ZeRO-3 a module head is a collective, so they pad to :meth:`num_chunks` chunks."""

    def __init__(self, policy_hidden: Tensor, policy_model: nn.Module, frozen: FrozenForwards, mask: Tensor,
                 accelerator):
        self._policy_hidden = policy_hidden
        self._policy_model = policy_model
        self._policy_head: HeadFn | None = None
        self._frozen = frozen
        self._mask = mask
        self._accelerator = accelerator

    def policy(self) -> tuple[Tensor, HeadFn]:
        """The policy's hidden states (with gradient) and LM head."""
        if self._policy_head is None:
            self._policy_head = lm_head_functions([self._policy_model])[0]
        return self._policy_hidden, self._policy_head

    def frozen(self, name: str) -> tuple[Tensor, HeadFn]:
        """Frozen model ``name``'s hidden states (no gradient) and LM head."""
        return self._frozen.hidden(name)

    def num_chunks(self, chunk_size: int, heads: Sequence[HeadFn]) -> int | None:
        """The number of chunks of ``chunk_size`` masked positions every process must run when calling ``heads``
        is a collective (the largest over processes), else None."""
        if not head_calls_are_collective(heads):
            return None
        local = torch.ceil(self._mask.sum() / chunk_size).long().reshape(1)
        return int(self._accelerator.gather(local).max())


# -- the policy's weights, module by module ----------------------------------------------------------------------

def _trained_weights(model: nn.Module) -> Iterator[tuple[nn.Module, dict[str, str]]]:
    """``(module, {history parameter name: the module's own name for it})`` for each module of the causal LM
    ``model`` whose weights the policy trains: LoRA layers (their base layer's weight and bias, with the adapter's
    ΔW), PEFT's ``modules_to_save`` (the active copy), and every trainable parameter of a plain module."""
    handled: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in handled):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, BaseTunerLayer):
            variants = [adapter for adapter in module.active_adapters if adapter in getattr(module, "lora_variant", {})
                        or getattr(module, "lora_bias", {}).get(adapter)]
            if not hasattr(module, "get_delta_weight") or variants:
                raise NotImplementedError(f"a history model of {name}'s {type(module).__name__} adapter: only plain "
                                          "LoRA (W + ΔW), not DoRA or other LoRA variants, nor lora_bias.")
            base = module.get_base_layer()
            handled.append(prefix)
            yield module, {f"{prefix}{key}": key for key, _ in base.named_parameters(recurse=False)}
        elif isinstance(module, AuxiliaryTrainingWrapper):
            handled.append(prefix)
            yield module, {f"{prefix}{key}": key for key, _ in module.original_module.named_parameters()}
        else:
            names = {f"{prefix}{key}": key for key, param in module.named_parameters(recurse=False)
                     if param.requires_grad}
            if names:
                yield module, names


def _effective_values(module: nn.Module, names: dict[str, str]) -> dict[str, Tensor]:
    """The policy's effective value of each of ``names`` (history name → the module's name) in ``module``."""
    if isinstance(module, BaseTunerLayer):
        base = module.get_base_layer()
        values = {target: getattr(base, key).detach() for target, key in names.items()}
        if not module.disable_adapters and not module.merged:
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters
                        if adapter in module.scaling)
            weight = next(target for target, key in names.items() if key == "weight")
            values[weight] = values[weight] + delta
        return values
    if isinstance(module, AuxiliaryTrainingWrapper):
        active = [adapter for adapter in module.active_adapters if adapter in module.modules_to_save]
        source = module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
        own = dict(source.named_parameters())
        return {target: own[key].detach() for target, key in names.items()}
    return {target: getattr(module, key).detach() for target, key in names.items()}


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, ``params`` gathered whole on every process (written back from process 0's values
    when ``modify``: every process computes the same ones); elsewhere nothing to do."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed  # only under ZeRO-3, where DeepSpeed is installed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield

