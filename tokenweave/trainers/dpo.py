"""TokenDPOTrainer: TRL's DPOTrainer plus the registered token-level preference losses cDPO, TDPO1 and TDPO2.

A run picks its loss with TRL's own ``loss_type`` field, so one YAML key selects any DPO variant::

    loss_type: sigmoid   # or ipo, hinge, ...: TRL's DPOTrainer, unchanged
    loss_type: cdpo      # token-weighted DPO (critical tokens, arXiv 2411.19943)
    loss_type: tdpo1     # TDPO1 (arXiv 2404.11999)
    loss_type: tdpo2     # TDPO2, with tdpo_alpha

A token-level loss is any name of the preference-loss registry (:mod:`tokenweave.losses.preference`), and must
be the only entry of ``loss_type``. It replaces ``DPOTrainer._compute_loss`` by
``TokenDPOTrainer._compute_token_loss``, the one labelled mirror of TRL 1.16's (its docstring maps it block by
block, and a test compares it with TRL's sigmoid loss on loss, gradients and metrics); every other part of
TRL's trainer (reference model or disabled PEFT adapter, fused LM head, dataset tokenisation, truncation,
logging) is reused as it is. The math lives in the losses layer; this file only gathers the inputs a registered
loss names in its ``needs``:

* always: per-token log-probs of the policy and the reference for the labelled tokens, from TRL's fused LM
  head (``model(..., labels=..., fused_lm_head=True).log_probs``), exactly as TRL computes them, as
  ``TokenPairs``;
* ``token_weights`` (cDPO): one weight per completion token, from dataset columns aligned to the completion
  tokens (:func:`tokenweave.data.token_columns.completion_token_weights`), carried through the collator; with
  ``token_weight_control: shuffle`` (the random-signal control) each row's weights are permuted over its completion
  tokens first (:func:`tokenweave.tokens.controls.shuffle_within_mask`);
* ``sequential_kl`` (TDPO): the final hidden states of both models, captured during the same forwards
  (:func:`tokenweave.models.final_hidden_states`), turned into full-vocabulary KL chunk by chunk
  (``chunked_sequential_kl``) by the LM heads (:func:`tokenweave.models.lm_head_functions`: under DeepSpeed
  ZeRO-3, a frozen head is gathered once per step).

The batch is TRL's: ``[prompt+chosen ; prompt+rejected]`` (``2B`` rows, right-padded). The
fused head returns ``log_probs[:, t] = log p(input_ids[:, t+1])``, computed from the hidden state at
position ``t``; everything per token is therefore shifted by one (``completion_mask[:, 1:]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import Tensor, nn
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad, use_adapter

from ..checks import check_options
from .card import ModelCardMixin
from .checkpointing import CheckpointingMixin
from .finite import FiniteTrainingMixin
from ..data.token_columns import completion_token_weights
from ..losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLossConfig,
    PreferenceLossOutput,
    TokenPairs,
    chunked_sequential_kl,
    critical_token_weights,
    get_preference_loss,
)
from ..models import (
    causal_lm,
    check_direct_head_calls,
    final_hidden_states,
    head_calls_are_collective,
    lm_head_functions,
)
from ..tokens.controls import row_generator, shuffle_within_mask

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

    token_weight_control: str = field(
        default="none",
        metadata={
            "help": "cDPO: 'shuffle' is the random-signal control: each completion keeps its own weights, assigned "
            "to a random permutation of its tokens (seeded per row by token_weight_control_seed), so the loss sees "
            "the same weight mass on tokens chosen by chance. 'none': the weights as they are.",
            "choices": ["none", "shuffle"],
        },
    )
    token_weight_control_seed: int | None = field(
        default=None, metadata={"help": "Seed of the 'shuffle' control's permutations (None: `seed`)."}
    )

    def __post_init__(self):
        check_options(self)  # types, choices and ranges
        super().__post_init__()  # turns a single loss_type string into a list
        if self.token_weight_control != "none" and not (
            self.token_loss_type and "token_weights" in get_preference_loss(self.token_loss_type).needs
        ):
            raise ValueError(
                f"token_weight_control {self.token_weight_control!r} shuffles per-token weights: it needs a loss "
                f"that uses them (loss_type 'cdpo'), not {self.loss_type}."
            )
        token_losses = [name for name in self.loss_type if name in PREFERENCE_LOSSES]
        if token_losses:
            if len(self.loss_type) != 1 or self.loss_weights is not None:
                raise ValueError(
                    f"loss_type {self.loss_type}: a token-level loss ({', '.join(PREFERENCE_LOSSES)}) must be the "
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

    @property
    def token_loss_type(self) -> str | None:
        """The token-level loss in ``loss_type`` (a registered preference loss: ``cdpo``, ``tdpo1``, ``tdpo2``), or
        None for TRL's losses."""
        return self.loss_type[0] if self.loss_type[0] in PREFERENCE_LOSSES else None


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


class TokenDPOTrainer(FiniteTrainingMixin, ModelCardMixin, CheckpointingMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with the registered preference losses of :class:`TokenDPOConfig`.

    With a TRL ``loss_type`` nothing changes. With ``cdpo``, ``tdpo1`` or ``tdpo2`` (any name registered with
    :func:`~tokenweave.losses.preference.register_preference_loss`), ``_compute_loss`` is replaced by
    :meth:`_compute_token_loss`, the one place that mirrors TRL's; the reference is whatever TRL would use
    (``ref_model``, a copy loaded from the policy's path, or the policy with its PEFT adapter disabled). The loss
    is a per-batch mean, as DPOTrainer's (``loss_is_scaled_for_ga = False``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_loss_type = getattr(self.args, "token_loss_type", None)
        self.preference_loss = None
        if self.token_loss_type is None:
            if any(name in PREFERENCE_LOSSES for name in self.args.loss_type):
                config_name = type(self.args).__name__
                raise TypeError(f"loss_type {self.args.loss_type} needs a TokenDPOConfig, not a {config_name}.")
            return
        if self._is_vision_dataset:
            raise NotImplementedError(f"loss_type {self.token_loss_type!r} does not support vision datasets yet.")
        self.preference_loss = get_preference_loss(self.token_loss_type)
        self.preference_loss_config = PreferenceLossConfig(
            beta=self.beta, label_smoothing=self.label_smoothing, tdpo_alpha=self.args.tdpo_alpha
        )
        # DPOTrainer builds its default collator once it has resolved the tokenizer and the pad token; for cDPO
        # that collator is swapped for the weight-carrying one. A collator passed by the user is kept as it is.
        if "token_weights" in self.preference_loss.needs and type(self.data_collator) is DataCollatorForPreference:
            collator = self.data_collator
            self.data_collator = DataCollatorForTokenWeightedPreference(
                **{field.name: getattr(collator, field.name) for field in dataclasses.fields(collator)},
                chosen_weights_key=self.args.chosen_weights_column,
                rejected_weights_key=self.args.rejected_weights_column,
            )
        if "sequential_kl" in self.preference_loss.needs:
            self._check_lm_heads()

    # -- data -----------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenisation, then, for cDPO, per-token weights checked against the tokenised completions."""
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        loss_name = getattr(args, "token_loss_type", None)
        if loss_name is None or "token_weights" not in get_preference_loss(loss_name).needs:
            return dataset
        map_kwargs = {"with_indices": True}
        if isinstance(dataset, Dataset):  # checked now, before training (an IterableDataset: as it is read)
            map_kwargs |= {"num_proc": args.dataset_num_proc, "desc": f"Aligning token weights of {dataset_name}"}
        scores_to_weights = functools.partial(
            _critical_weights,
            weight_chosen=args.cdpo_weight_chosen,
            eos_token_id=getattr(processing_class, "tokenizer", processing_class).eos_token_id,
        )
        weights_columns = (args.chosen_weights_column, args.rejected_weights_column)
        dataset = dataset.map(
            completion_token_weights,
            fn_kwargs={
                "weights_columns": weights_columns,
                "scores_columns": (args.chosen_scores_column, args.rejected_scores_column),
                "scores_to_weights": scores_to_weights,
                "dataset_name": dataset_name,
            },
            **map_kwargs,
        )
        if args.token_weight_control == "shuffle":
            seed = args.seed if args.token_weight_control_seed is None else args.token_weight_control_seed
            if isinstance(dataset, Dataset):
                map_kwargs["desc"] = f"Shuffling token weights of {dataset_name} (random-signal control)"
            dataset = dataset.map(
                _shuffled_weights, fn_kwargs={"columns": weights_columns, "seed": seed}, **map_kwargs
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        """Keep the cDPO weights columns when ``remove_unused_columns`` drops the others."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            if self.preference_loss is not None and "token_weights" in self.preference_loss.needs:
                self._signature_columns += [self.args.chosen_weights_column, self.args.rejected_weights_column]

    # -- loss: the mirror of TRL's DPOTrainer._compute_loss (down to _global_masked_mean) ---------------

    def _compute_loss(self, model, inputs, return_outputs):
        if self.preference_loss is None:
            return super()._compute_loss(model, inputs, return_outputs)
        return self._compute_token_loss(model, inputs, return_outputs)

    def _compute_token_loss(self, model, inputs, return_outputs):
        """A registered preference loss on one ``[chosen ; rejected]`` batch: **the mirror of TRL 1.16's
        ``DPOTrainer._compute_loss``** (``trl/trainer/dpo_trainer.py``, lines 1285-1612), the only TRL code this
        trainer re-implements (TRL offers no smaller hook). ``test_dpo_trainer.py`` checks it against TRL's
        ``loss_type="sigmoid"`` on loss, gradients and logged metrics. Block by block (TRL 1.16 lines)::

            1286-1299  model kwargs, labels, policy forward     same; the final hidden state is captured too when
                                                                the loss needs sequential_kl
            1300-1316  per-token log-probs [:, -seq_len:]       same, kept per token (no ld_alpha)
            1318-1347  reference forward (_reference_model)     same, kept per token (no precompute_ref_log_probs)
            1349-1528  log-ratios, f-divergence, loss_type      the registered loss on TokenPairs and the inputs it
                       loop                                     needs (_preference_loss_inputs); mean over pairs
            1530-1533  MoE aux loss                             same
            1535-1601  metrics (_log_dpo_metrics)               same names and computation; rewards are the loss's
                                                                own; plus kl/* and weights/* (_log_loss_inputs)
            1603-1612  return_outputs: a second forward         same, without TRL's FutureWarning

        ``_reference_model`` and ``_log_dpo_metrics`` below are part of this mirror.

        Per-token tensors are ``[2B, L-1]`` over next-token positions: entry ``t`` is about
        ``input_ids[:, t+1]``. ``chosen_*``/``rejected_*`` are their two halves.
        """
        mode = "train" if self.model.training else "eval"
        capture_hidden = "sequential_kl" in self.preference_loss.needs
        model_kwargs = {key: value for key, value in inputs.items() if key not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        ref_model_kwargs = {key: value for key, value in model_kwargs.items() if key != "output_router_logits"}
        completion_mask = inputs["completion_mask"]
        mask = completion_mask[:, 1:]
        seq_len = mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)

        with final_hidden_states(model, enabled=capture_hidden) as policy_hidden:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        with self._reference_model() as ref_model:
            with final_hidden_states(ref_model, enabled=capture_hidden) as ref_hidden:
                ref_outputs = ref_model(**ref_model_kwargs, labels=labels, fused_lm_head=True)
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens, as TRL does.
        logps = outputs.log_probs[:, -seq_len:]
        ref_logps = ref_outputs.log_probs[:, -seq_len:]
        pairs = TokenPairs(*logps.chunk(2), *ref_logps.chunk(2), *mask.chunk(2))
        hidden = None
        if capture_hidden:  # the hidden state at position t predicts token t+1: the positions of `logps`
            hidden = tuple(states[0][:, -(seq_len + 1) : -1] for states in (policy_hidden, ref_hidden))
        loss_inputs = self._preference_loss_inputs(inputs, mask, (model, ref_model), hidden)
        result = self.preference_loss.fn(pairs, self.preference_loss_config, **loss_inputs)

        loss = result.losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_dpo_metrics(mode, inputs, outputs, mask, logps, result)
        self._log_loss_inputs(mode, mask, loss_inputs)

        if return_outputs:  # TRL's deprecated path for compute_metrics: it needs the logits
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        """The reference, as ``DPOTrainer._compute_loss`` gets it (TRL 1.16 lines 1327-1338), under ``no_grad``.

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

    def _log_dpo_metrics(
        self,
        mode: str,
        inputs: dict[str, Tensor],
        outputs,
        mask: Tensor,
        logps: Tensor,
        result: PreferenceLossOutput,
    ) -> None:
        """The metrics of TRL 1.16's DPOTrainer (``_compute_loss``, lines 1535-1601), with the same names, over the
        completion tokens of all processes: ``entropy``, ``num_tokens``, ``logits/chosen``, ``logits/rejected``
        (mean of the fused head's per-position mean logit), ``mean_token_accuracy`` (chosen tokens that are the
        policy's top-1), ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``.

        The rewards are the loss's own: cDPO's unweighted ``β·Σ(lp − ref)`` (TRL's), TDPO's ``β·(Σ(lp − ref) +
        SeqKL)`` (the TDPO code's).
        """
        metrics = self._metrics[mode]
        seq_len = mask.size(1)
        metrics["entropy"].append(self._global_masked_mean(outputs.entropy[:, -seq_len:].detach(), mask))
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.chunk(2)
        chosen_mean_logits, rejected_mean_logits = outputs.mean_logits[:, -seq_len:].chunk(2)
        metrics["logits/chosen"].append(self._global_masked_mean(chosen_mean_logits.detach(), chosen_mask))
        metrics["logits/rejected"].append(self._global_masked_mean(rejected_mean_logits.detach(), rejected_mask))
        chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2)
        metrics["mean_token_accuracy"].append(self._global_masked_mean(chosen_is_top1, chosen_mask))

        chosen_rewards = self.accelerator.gather(result.chosen_rewards)
        rejected_rewards = self.accelerator.gather(result.rejected_rewards)
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        chosen_logps, rejected_logps = self.accelerator.gather((logps.detach() * mask).sum(-1).chunk(2))
        metrics["logps/chosen"].append(chosen_logps.mean().item())
        metrics["logps/rejected"].append(rejected_logps.mean().item())

    def _global_masked_mean(self, values: Tensor, mask: Tensor) -> float:
        """``Σ values[mask] / Σ mask`` over all processes (TRL's weighted average of per-token metrics); 0 when
        no process has a masked position."""
        total = self.accelerator.gather_for_metrics(values[mask.bool()].sum()).sum()
        count = self.accelerator.gather_for_metrics(mask.sum()).sum()
        return (total / count).item() if count > 0 else 0.0

    # -- the inputs a registered loss needs -------------------------------------------------------------

    def _preference_loss_inputs(
        self,
        inputs: dict[str, Tensor],
        mask: Tensor,
        models: tuple[nn.Module, nn.Module],
        hidden: tuple[Tensor, Tensor] | None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """The extra inputs the loss needs (``PreferenceLoss.needs``), each a ``(chosen, rejected)`` pair:

        * ``token_weights``: the collated cDPO weights ``[2B, L]``, shifted like ``mask`` (``[:, 1:]``);
        * ``sequential_kl``: ``SeqKL = Σ_t KL(π_ref ‖ π_θ)`` (``[B]`` per side), by ``chunked_sequential_kl`` from
          ``hidden`` (the policy's and the reference's final hidden states at the positions of ``mask``) and the
          two models' LM heads (:func:`tokenweave.models.lm_head_functions`: under ZeRO-3 a frozen head is gathered
          once per step; module heads are then called as many times on every process).
        """
        needs = self.preference_loss.needs
        loss_inputs = {}
        if "token_weights" in needs:
            if TOKEN_WEIGHTS_KEY not in inputs:
                raise ValueError(
                    f"loss_type {self.token_loss_type!r} needs per-token weights in the batch ({TOKEN_WEIGHTS_KEY!r}); "
                    "a custom data collator must add them, like DataCollatorForTokenWeightedPreference."
                )
            loss_inputs["token_weights"] = inputs[TOKEN_WEIGHTS_KEY][:, 1:].chunk(2)
        if "sequential_kl" in needs:
            heads = lm_head_functions(models)
            num_chunks = self._num_kl_chunks(mask) if head_calls_are_collective(heads) else None
            per_token_kl = chunked_sequential_kl(
                *hidden, *heads, mask, chunk_size=self.args.tdpo_kl_chunk_size, num_chunks=num_chunks
            )
            loss_inputs["sequential_kl"] = per_token_kl.sum(-1).chunk(2)
        return loss_inputs

    def _num_kl_chunks(self, mask: Tensor) -> int:
        """The largest number of KL chunks over processes (see ``chunked_sequential_kl``): with module heads under
        ZeRO-3, each head call gathers the head's shards, so every process must call it as many times."""
        local = torch.ceil(mask.sum() / self.args.tdpo_kl_chunk_size).long().reshape(1)
        return int(self.accelerator.gather(local).max())

    def _log_loss_inputs(self, mode: str, mask: Tensor, loss_inputs: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Metrics of the loss's extra inputs, over all processes.

        ``kl/chosen``/``kl/rejected`` (TDPO): the batch means of ``SeqKL = Σ_t KL(π_ref ‖ π_θ)``.
        ``weights/chosen``/``weights/rejected`` (cDPO): the mean token weights over completion tokens: 1 and 1 for
        unit weights, below 1 where critical tokens are down-weighted.
        """
        metrics = self._metrics[mode]
        if "sequential_kl" in loss_inputs:
            chosen_kl, rejected_kl = self.accelerator.gather(tuple(kl.detach() for kl in loss_inputs["sequential_kl"]))
            metrics["kl/chosen"].append(chosen_kl.mean().item())
            metrics["kl/rejected"].append(rejected_kl.mean().item())
        if "token_weights" in loss_inputs:
            for side, weights, side_mask in zip(("chosen", "rejected"), loss_inputs["token_weights"], mask.chunk(2)):
                metrics[f"weights/{side}"].append(self._global_masked_mean(weights, side_mask))

    def _check_lm_heads(self) -> None:
        """A loss that needs ``sequential_kl`` calls the LM heads directly: refuse heads whose logits would differ
        from the model's (:func:`tokenweave.models.check_direct_head_calls`), and heads with a PEFT adapter, since
        the reference's logits are computed with the same head module."""
        models = [self.model] if self.ref_model is None else [self.model, self.ref_model]
        for model in models:
            check_direct_head_calls(model, f"loss_type {self.token_loss_type!r}")
            if isinstance(causal_lm(model).get_output_embeddings(), (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                raise NotImplementedError(
                    f"loss_type {self.token_loss_type!r} needs an LM head without a PEFT adapter or "
                    "modules_to_save: its reference logits are computed with the same head module."
                )


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


def _shuffled_weights(example: dict, index: int, *, columns: tuple[str, str], seed: int) -> dict[str, list[float]]:
    """The random-signal control of one example: each side's weights permuted over its completion tokens
    (:func:`~tokenweave.tokens.controls.shuffle_within_mask`), seeded by ``(seed, row, side)``."""
    shuffled = {}
    for side, column in enumerate(columns):
        weights = torch.tensor(example[column], dtype=torch.float32).unsqueeze(0)
        generator = row_generator(seed, index, side)
        shuffled[column] = shuffle_within_mask(weights, torch.ones_like(weights), generator).squeeze(0).tolist()
    return shuffled
