"""TokenDPOTrainer: TRL's DPOTrainer plus the token-level preference losses cDPO, TDPO1 and TDPO2.

A run picks its loss with TRL's own ``loss_type`` field, so one YAML key selects any DPO variant::

    loss_type: sigmoid   # or ipo, hinge, ...: TRL's DPOTrainer, unchanged
    loss_type: cdpo      # token-weighted DPO (critical tokens, arXiv 2411.19943)
    loss_type: tdpo1     # TDPO1 (arXiv 2404.11999)
    loss_type: tdpo2     # TDPO2, with tdpo_alpha

A token-level loss must be the only entry of ``loss_type``. It replaces ``DPOTrainer._compute_loss``;
every other part of TRL's trainer (reference model or disabled PEFT adapter, fused LM head, dataset
tokenisation, truncation, logging) is reused as it is. The math lives in
:mod:`tokenweave.losses.preference`; this file only gathers its inputs:

* per-token log-probs of the policy and the reference for the labelled tokens, from TRL's fused LM
  head (``model(..., labels=..., fused_lm_head=True).log_probs``), exactly as TRL computes them;
* cDPO: one weight per completion token, from dataset columns, carried through the collator;
* TDPO: the final hidden states of both models, captured by a forward hook on the backbone during the
  same forward, turned into full-vocabulary KL chunk by chunk (``chunked_sequential_kl``) by the LM
  heads (under DeepSpeed ZeRO-3, a frozen head is gathered once per step: see ``_kl_heads``).

The batch is TRL's: ``[prompt+chosen ; prompt+rejected]`` (``2B`` rows, right-padded). The
fused head returns ``log_probs[:, t] = log p(input_ids[:, t+1])``, computed from the hidden state at
position ``t``; everything per token is therefore shifted by one (``completion_mask[:, 1:]``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import Tensor, nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad, use_adapter

from ..data.token_columns import completion_token_weights
from ..losses.preference import (
    PreferenceLossOutput,
    chunked_sequential_kl,
    critical_token_weights,
    tdpo_loss,
    token_weighted_dpo_loss,
)
from ..models import LOGIT_TRANSFORM_ATTRIBUTES

TOKEN_LOSS_TYPES = ("cdpo", "tdpo1", "tdpo2")

# The batch key of the collated cDPO weights, [2B, L] like input_ids.
TOKEN_WEIGHTS_KEY = "token_weights"
# Batch keys that are not model inputs.
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", TOKEN_WEIGHTS_KEY}


@dataclass
class TokenDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus the options of the token-level losses ``cdpo``, ``tdpo1`` and ``tdpo2``.

    The loss is chosen with TRL's ``loss_type``. TRL's loss types keep their meaning; a token-level
    one must be used alone (no ``loss_weights``), without ``precompute_ref_log_probs`` (it stores
    sequence sums only, and these losses need per-token reference quantities), ``ld_alpha`` or
    ``use_weighting``.

    cDPO needs per-token weights in the dataset: either ``chosen_weights``/``rejected_weights`` (the
    weights themselves) or ``chosen_scores``/``rejected_scores`` (critical-token scores ``s_t``, turned
    into weights with :func:`~tokenweave.losses.preference.critical_token_weights`); the column names are
    configurable below. Each value is a list with one float per token of the completion *as DPOTrainer
    tokenises it* (``chosen_ids``/``rejected_ids``: the tokens of ``prompt + completion`` after the
    tokenised prompt, template tokens and EOS included). Weights columns win when both kinds are
    present. A missing or misaligned row is a ``ValueError`` raised while the dataset is prepared.

    Note: ``cdpo`` here is "Critical Tokens Matter" (Lin et al.), not the conservative DPO of
    Mitchell (2023) that TRL once called cDPO; ``label_smoothing`` still applies to ``cdpo`` as the
    conservative-DPO ε (default 0, as in the critical-token code).
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Type of loss to use: any of TRL's DPO loss types ('sigmoid', 'ipo', 'hinge', ...; several "
            "are combined with `loss_weights`), or one token-level loss, alone: 'cdpo' (token-weighted DPO of "
            "'Critical Tokens Matter', arXiv 2411.19943), 'tdpo1' or 'tdpo2' (Token-level DPO, arXiv 2404.11999)."
        },
    )
    tdpo_alpha: float = field(
        default=0.5,
        metadata={
            "help": "TDPO2's α, the weight of the sequential-KL difference in the margin (paper default 0.5). "
            "Ignored by TDPO1, which has no α."
        },
    )
    tdpo_kl_chunk_size: int = field(
        default=256,
        metadata={
            "help": "TDPO: completion positions per chunk of the full-vocabulary KL. Peak memory is a few "
            "[chunk, vocab] fp32 tensors instead of [2B, T, vocab] logits for both models."
        },
    )
    cdpo_weight_chosen: bool = field(
        default=False,
        metadata={
            "help": "cDPO with score columns: also weight chosen tokens by their score s_t. False (cDPO's "
            "shipped default, only_neg=True) weights only rejected tokens, by 1 − s_t."
        },
    )
    chosen_weights_column: str = field(
        default="chosen_weights",
        metadata={"help": "cDPO: dataset column with one weight per chosen completion token."},
    )
    rejected_weights_column: str = field(
        default="rejected_weights",
        metadata={"help": "cDPO: dataset column with one weight per rejected completion token."},
    )
    chosen_scores_column: str = field(
        default="chosen_scores",
        metadata={
            "help": "cDPO: dataset column with one critical-token score s_t per chosen completion token, used "
            "when the weights columns are absent."
        },
    )
    rejected_scores_column: str = field(
        default="rejected_scores",
        metadata={
            "help": "cDPO: dataset column with one critical-token score s_t per rejected completion token, used "
            "when the weights columns are absent."
        },
    )

    def __post_init__(self):
        super().__post_init__()  # turns a single loss_type string into a list
        token_losses = [name for name in self.loss_type if name in TOKEN_LOSS_TYPES]
        if token_losses:
            if len(self.loss_type) != 1 or self.loss_weights is not None:
                raise ValueError(
                    f"loss_type {self.loss_type}: a token-level loss ({', '.join(TOKEN_LOSS_TYPES)}) must be the "
                    "only loss type, without loss_weights."
                )
            if self.precompute_ref_log_probs:
                raise ValueError(
                    f"loss_type {token_losses[0]!r} cannot use precompute_ref_log_probs: it stores the reference's "
                    "log-probs summed over each sequence, and this loss needs per-token reference quantities "
                    "(TDPO: the reference's full distribution at every position)."
                )
            for option in ("ld_alpha", "use_weighting"):
                if getattr(self, option) not in (None, False):
                    raise ValueError(f"loss_type {token_losses[0]!r} does not support {option}.")
        if self.tdpo_kl_chunk_size < 1:
            raise ValueError(f"tdpo_kl_chunk_size must be at least 1, got {self.tdpo_kl_chunk_size}.")

    @property
    def token_loss_type(self) -> str | None:
        """The token-level loss in ``loss_type`` (``cdpo``, ``tdpo1`` or ``tdpo2``), or None for TRL's losses."""
        return self.loss_type[0] if self.loss_type[0] in TOKEN_LOSS_TYPES else None


@dataclass
class DataCollatorForTokenWeightedPreference(DataCollatorForPreference):
    """TRL's ``DataCollatorForPreference`` that also collates cDPO's per-token weights.

    Each example carries, besides ``prompt_ids``/``chosen_ids``/``rejected_ids``, one weight per
    chosen and per rejected completion token (keys ``chosen_weights_key``, ``rejected_weights_key``).
    The output gains ``token_weights``, a float ``[2B, L]`` tensor aligned with ``input_ids`` and built
    like ``completion_mask``: ``[0]*len(prompt_ids) + weights`` per row, chosen rows then rejected rows,
    truncated by the same ``max_length``/``truncation_mode`` and right-padded with 0.
    """

    chosen_weights_key: str = "chosen_weights"
    rejected_weights_key: str = "rejected_weights"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        rows = [
            [0.0] * len(example["prompt_ids"]) + list(example[key])
            for key in (self.chosen_weights_key, self.rejected_weights_key)
            for example in examples
        ]
        if self.max_length is not None:
            # The parent truncates ids and masks with the same slice (and rejects other modes).
            if self.truncation_mode == "keep_start":
                rows = [row[: self.max_length] for row in rows]
            else:
                rows = [row[-self.max_length :] for row in rows]
        output[TOKEN_WEIGHTS_KEY] = pad(
            [torch.tensor(row, dtype=torch.float32) for row in rows],
            padding_value=0.0,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return output


class TokenDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the token-level losses of :class:`TokenDPOConfig`.

    With a TRL ``loss_type`` nothing changes. With ``cdpo``, ``tdpo1`` or ``tdpo2``, ``_compute_loss``
    is replaced by :meth:`_compute_token_loss`; the reference is whatever TRL would use (``ref_model``,
    a copy loaded from the policy's path, or the policy with its PEFT adapter disabled). The loss is a
    per-batch mean, as DPOTrainer's (``loss_is_scaled_for_ga = False``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_loss_type = getattr(self.args, "token_loss_type", None)
        if self.token_loss_type is None:
            if any(name in TOKEN_LOSS_TYPES for name in self.args.loss_type):
                config_name = type(self.args).__name__
                raise TypeError(f"loss_type {self.args.loss_type} needs a TokenDPOConfig, not a {config_name}.")
            return
        if self._is_vision_dataset:
            raise NotImplementedError(f"loss_type {self.token_loss_type!r} does not support vision datasets yet.")
        # DPOTrainer builds its default collator once it has resolved the tokenizer and the pad token; for cDPO
        # that collator is swapped for the weight-carrying one. A collator passed by the user is kept as it is.
        if self.token_loss_type == "cdpo" and type(self.data_collator) is DataCollatorForPreference:
            collator = self.data_collator
            self.data_collator = DataCollatorForTokenWeightedPreference(
                pad_token_id=collator.pad_token_id,
                max_length=collator.max_length,
                truncation_mode=collator.truncation_mode,
                pad_to_multiple_of=collator.pad_to_multiple_of,
                chosen_weights_key=self.args.chosen_weights_column,
                rejected_weights_key=self.args.rejected_weights_column,
            )
        if self.token_loss_type != "cdpo":
            self._check_lm_heads_for_tdpo()

    # -- data -----------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenisation, then, for cDPO, per-token weights checked against the tokenised completions."""
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if getattr(args, "token_loss_type", None) != "cdpo":
            return dataset
        map_kwargs = {"with_indices": True}
        if isinstance(dataset, Dataset):  # checked now, before training (an IterableDataset: as it is read)
            map_kwargs |= {"num_proc": args.dataset_num_proc, "desc": f"Aligning token weights of {dataset_name}"}
        scores_to_weights = functools.partial(
            _critical_weights,
            weight_chosen=args.cdpo_weight_chosen,
            eos_token_id=getattr(processing_class, "tokenizer", processing_class).eos_token_id,
        )
        return dataset.map(
            completion_token_weights,
            fn_kwargs={
                "weights_columns": (args.chosen_weights_column, args.rejected_weights_column),
                "scores_columns": (args.chosen_scores_column, args.rejected_scores_column),
                "scores_to_weights": scores_to_weights,
                "dataset_name": dataset_name,
            },
            **map_kwargs,
        )

    def _set_signature_columns_if_needed(self):
        """Keep the cDPO weights columns when ``remove_unused_columns`` drops the others."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            if self.token_loss_type == "cdpo":
                self._signature_columns += [self.args.chosen_weights_column, self.args.rejected_weights_column]

    # -- loss -----------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        if self.token_loss_type is None:
            return super()._compute_loss(model, inputs, return_outputs)
        return self._compute_token_loss(model, inputs, return_outputs)

    def _compute_token_loss(self, model, inputs, return_outputs):
        """cDPO / TDPO loss of one ``[chosen ; rejected]`` batch: policy and reference forwards, then the loss.

        Per-token tensors below are ``[2B, L-1]`` over next-token positions: entry ``t`` is about
        ``input_ids[:, t+1]``. ``chosen_*``/``rejected_*`` are their two halves.
        """
        mode = "train" if self.model.training else "eval"
        model_kwargs = {key: value for key, value in inputs.items() if key not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        ref_model_kwargs = {key: value for key, value in model_kwargs.items() if key != "output_router_logits"}
        completion_mask = inputs["completion_mask"]
        mask = completion_mask[:, 1:]
        seq_len = mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        is_tdpo = self.token_loss_type != "cdpo"

        with self._capture_final_hidden_state(model, enabled=is_tdpo) as policy_hidden:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        with self._reference_model() as ref_model:
            with self._capture_final_hidden_state(ref_model, enabled=is_tdpo) as ref_hidden:
                ref_outputs = ref_model(**ref_model_kwargs, labels=labels, fused_lm_head=True)
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens, as TRL does.
        logps = outputs.log_probs[:, -seq_len:]
        ref_logps = ref_outputs.log_probs[:, -seq_len:]

        chosen_logps, rejected_logps = logps.chunk(2)
        ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
        chosen_mask, rejected_mask = mask.chunk(2)
        pair = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_mask, rejected_mask)
        seq_kl = None
        if is_tdpo:
            policy_head, ref_head = self._kl_heads(model, ref_model)
            # Module heads under ZeRO-3 gather their shards at every call: every process must make as many calls.
            module_heads = any(isinstance(head, nn.Module) for head in (policy_head, ref_head))
            num_chunks = self._num_kl_chunks(mask) if module_heads else None
            # The hidden state at position t predicts token t+1: the positions of `logps`.
            per_token_kl = chunked_sequential_kl(
                policy_hidden[0][:, -(seq_len + 1) : -1],
                ref_hidden[0][:, -(seq_len + 1) : -1],
                policy_head,
                ref_head,
                mask,
                chunk_size=self.args.tdpo_kl_chunk_size,
                num_chunks=num_chunks,
            )
            seq_kl = per_token_kl.sum(-1)
            chosen_seq_kl, rejected_seq_kl = seq_kl.chunk(2)
            result = tdpo_loss(
                *pair,
                chosen_seq_kl,
                rejected_seq_kl,
                beta=self.beta,
                alpha=self.args.tdpo_alpha,
                variant=self.token_loss_type,
            )
        else:
            if TOKEN_WEIGHTS_KEY not in inputs:
                raise ValueError(
                    f"loss_type 'cdpo' needs per-token weights in the batch ({TOKEN_WEIGHTS_KEY!r}); a custom data "
                    "collator must add them, like DataCollatorForTokenWeightedPreference."
                )
            token_weights = inputs[TOKEN_WEIGHTS_KEY][:, 1:]
            chosen_weights, rejected_weights = token_weights.chunk(2)
            result = token_weighted_dpo_loss(
                *pair, chosen_weights, rejected_weights, beta=self.beta, label_smoothing=self.label_smoothing
            )

        loss = result.losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_token_loss_metrics(
            mode, inputs, outputs.entropy[:, -seq_len:], mask, logps, result, seq_kl, None if is_tdpo else token_weights
        )

        if return_outputs:  # TRL's deprecated path for compute_metrics: it needs the logits
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        """The reference, as ``DPOTrainer._compute_loss`` gets it, under ``no_grad``.

        The separate ``ref_model``, or, with PEFT and no ``ref_model``, the policy with its adapter
        disabled (or switched to the frozen ``"ref"`` adapter TRL adds when re-training an adapter).
        """
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    yield self.model
            else:
                yield self.ref_model

    def _causal_lm(self, model: nn.Module) -> nn.Module:
        """The transformers causal LM inside a model's wrappers (DDP, DeepSpeed, PEFT): the module TRL patched
        with its fused head, which owns the backbone (``.base_model``) and the LM head."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    @contextlib.contextmanager
    def _capture_final_hidden_state(self, model: nn.Module, enabled: bool) -> Iterator[list[Tensor]]:
        """Collect the backbone's ``last_hidden_state`` (``[2B, L, H]``, after the final norm: what the LM head
        reads) during the forward of ``model``, into the yielded list.

        TRL's fused-head forward runs ``causal_lm.base_model`` and then the head, and returns no hidden
        states; a forward hook on that backbone gets them from the same forward, with their graph, through
        every wrapper (DDP, DeepSpeed, PEFT).
        """
        captured: list[Tensor] = []
        if not enabled:
            yield captured
            return
        handle = self._causal_lm(model).base_model.register_forward_hook(
            lambda module, args, output: captured.append(output.last_hidden_state)
        )
        try:
            yield captured
        finally:
            handle.remove()

    def _kl_heads(self, model: nn.Module, ref_model: nn.Module) -> tuple[Callable[[Tensor], Tensor], ...]:
        """The policy's and the reference's LM heads, as TDPO's KL calls them (``[..., H]`` → ``[..., V]`` logits).

        A head is its module, except a *frozen* head (no parameter requires grad) under DeepSpeed ZeRO-3:
        the base model's head under PEFT, often tied to the frozen embedding. ``chunked_sequential_kl``
        calls the heads again in the backward, to recompute each chunk (``torch.utils.checkpoint``), and
        there ZeRO-3 does not keep a frozen module's weight gathered: the recomputed chunk would see the
        released, empty shard (a ``CheckpointError``: saved ``[V, H]``, recomputed ``[0]``). Such a head is
        gathered once per step (``deepspeed.zero.GatheredParameters``, a collective every process makes
        here, once per step) into a full detached copy, and applied as ``F.linear(h, W, b)``: no hook, no
        collective, and no gradient, which a frozen weight does not need (gradients still reach the hidden
        states, hence the LoRA weights). A trainable head (full fine-tuning) stays its module: DeepSpeed's
        hooks gather it in the backward and reduce its gradient.
        """
        heads = [self._causal_lm(m).get_output_embeddings() for m in (model, ref_model)]
        if not is_deepspeed_zero3_enabled():
            return tuple(heads)
        import deepspeed  # only under ZeRO-3, where DeepSpeed is installed

        gathered: dict[int, Callable[[Tensor], Tensor]] = {}
        for head in heads:
            if id(head) in gathered or any(param.requires_grad for param in head.parameters()):
                continue
            with deepspeed.zero.GatheredParameters(list(head.parameters())):
                weight = head.weight.detach().clone()
                bias = None if head.bias is None else head.bias.detach().clone()
            gathered[id(head)] = _linear_head(weight, bias)
        return tuple(gathered.get(id(head), head) for head in heads)

    def _num_kl_chunks(self, mask: Tensor) -> int | None:
        """Under DeepSpeed ZeRO-3, the largest number of KL chunks over processes (see ``chunked_sequential_kl``):
        each call of an LM head module gathers the head's shards, so every process must call it as many times.
        None elsewhere."""
        if not is_deepspeed_zero3_enabled():
            return None
        local = torch.ceil(mask.sum() / self.args.tdpo_kl_chunk_size).long().reshape(1)
        return int(self.accelerator.gather(local).max())

    def _check_lm_heads_for_tdpo(self) -> None:
        """TDPO calls the LM heads directly: refuse heads whose logits would differ from the model's, and, under
        ZeRO-3, frozen heads that ``_kl_heads`` cannot apply as ``F.linear`` (not an ``nn.Linear``)."""
        models = [self.model] if self.ref_model is None else [self.model, self.ref_model]
        for model in models:
            causal_lm = self._causal_lm(model)
            head = causal_lm.get_output_embeddings()
            frozen = not any(param.requires_grad for param in head.parameters())
            if is_deepspeed_zero3_enabled() and frozen and not isinstance(head, nn.Linear):
                raise NotImplementedError(
                    f"loss_type {self.token_loss_type!r} under DeepSpeed ZeRO-3 needs a frozen LM head that is an "
                    f"nn.Linear (it is gathered once and applied as F.linear), not a {type(head).__name__}."
                )
            text_config = causal_lm.config.get_text_config()
            transforms = [name for name in LOGIT_TRANSFORM_ATTRIBUTES if getattr(text_config, name, None) is not None]
            if transforms:
                raise NotImplementedError(
                    f"loss_type {self.token_loss_type!r} does not support models that transform the LM head's "
                    f"logits ({', '.join(transforms)}) yet."
                )
            if isinstance(head, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                raise NotImplementedError(
                    f"loss_type {self.token_loss_type!r} needs an LM head without a PEFT adapter or "
                    "modules_to_save: its reference logits are computed with the same head module."
                )

    # -- metrics --------------------------------------------------------------------------------------

    def _log_token_loss_metrics(
        self,
        mode: str,
        inputs: dict[str, Tensor],
        entropy: Tensor,
        mask: Tensor,
        logps: Tensor,
        result: PreferenceLossOutput,
        seq_kl: Tensor | None,
        token_weights: Tensor | None = None,
    ) -> None:
        """The metrics DPOTrainer logs for its rewards and log-probs, plus TDPO's sequential KL and cDPO's weights.

        Rewards are the loss's own (cDPO: unweighted ``β·Σ(lp − ref)``; TDPO: ``β·(Σ(lp − ref) + SeqKL)``).
        ``kl/chosen``/``kl/rejected`` are the batch means of ``SeqKL = Σ_t KL(π_ref ‖ π_θ)``.
        ``weights/chosen``/``weights/rejected`` (cDPO) are the mean token weights over completion tokens,
        over all processes: 1 and 1 for unit weights, below 1 where critical tokens are down-weighted.
        """
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        entropy_sum = gather((entropy.detach() * mask).sum()).sum()
        num_completion_tokens = gather(mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / num_completion_tokens).item() if num_completion_tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_rewards = self.accelerator.gather(result.chosen_rewards)
        rejected_rewards = self.accelerator.gather(result.rejected_rewards)
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        chosen_logps, rejected_logps = self.accelerator.gather((logps.detach() * mask).sum(-1).chunk(2))
        metrics["logps/chosen"].append(chosen_logps.mean().item())
        metrics["logps/rejected"].append(rejected_logps.mean().item())
        if seq_kl is not None:
            chosen_kl, rejected_kl = self.accelerator.gather(seq_kl.detach().chunk(2))
            metrics["kl/chosen"].append(chosen_kl.mean().item())
            metrics["kl/rejected"].append(rejected_kl.mean().item())
        if token_weights is not None:
            sides = zip(("chosen", "rejected"), token_weights.chunk(2), mask.chunk(2), strict=True)
            for side, side_weights, side_mask in sides:
                weight_sum = gather((side_weights * side_mask).sum()).sum()
                num_tokens = gather(side_mask.sum()).sum()
                metrics[f"weights/{side}"].append((weight_sum / num_tokens).item() if num_tokens > 0 else 0.0)


def _linear_head(weight: Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """An LM head as a function of fixed tensors: ``h ↦ F.linear(h, weight, bias)``."""

    def head(hidden: Tensor) -> Tensor:
        return F.linear(hidden, weight, bias)

    return head


def _critical_weights(
    chosen_scores: list[float],
    rejected_scores: list[float],
    chosen_ids: list[int],
    rejected_ids: list[int],
    *,
    weight_chosen: bool,
    eos_token_id: int | None,
) -> tuple[list[float], list[float]]:
    """cDPO's weights of one example's completion-token scores (``critical_token_weights``, weight 1 at the
    EOS tokens ``eos_token_id`` of each completion): the ``scores_to_weights`` of ``completion_token_weights``."""
    scores = [torch.tensor(side, dtype=torch.float32).unsqueeze(0) for side in (chosen_scores, rejected_scores)]
    masks = [torch.ones_like(side) for side in scores]
    eos = [None, None]
    if eos_token_id is not None:
        eos = [torch.tensor(ids).unsqueeze(0) == eos_token_id for ids in (chosen_ids, rejected_ids)]
    weights = critical_token_weights(
        *scores, *masks, weight_chosen=weight_chosen, chosen_eos=eos[0], rejected_eos=eos[1]
    )
    return tuple(side.squeeze(0).tolist() for side in weights)
