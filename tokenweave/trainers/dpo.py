"""TokenDPOTrainer: TRL's DPOTrainer plus the registered token-level preference losses (cDPO, TDPO1/2, TGDPO, T-REG,
AlignDistil, your own).

A run picks its loss with TRL's own ``loss_type`` field, so one YAML key selects any DPO variant::

    loss_type: sigmoid       # or ipo, hinge, ...: TRL's DPOTrainer, unchanged
    loss_type: cdpo          # token-weighted DPO (critical tokens, arXiv 2411.19943)
    loss_type: tdpo1         # TDPO1 (arXiv 2404.11999)
    loss_type: tdpo2         # TDPO2, with tdpo_alpha
    loss_type: tgdpo         # TGDPO (arXiv 2506.14574): token rewards from a frozen DPO model weight the log-ratios
    loss_type: treg          # T-REG (arXiv 2412.02685): DPO + a token-reward regulariser
    loss_type: aligndistil   # AlignDistil (arXiv 2503.02832): token-level distillation from a DPO and a reverse-DPO model

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
* any other input (``token_weights`` for cDPO, ``token_rewards`` for TGDPO and T-REG, ...): from the token signals
  that provide it (:mod:`.signals`; cDPO's weights: the ``critical_tokens`` signal, which ``loss_type: cdpo`` implies,
  or ``weights`` / ``weight_rules``; the token rewards: the ``tgdpo`` and ``treg`` signals, :mod:`.token_rewards`), on
  the batch's :class:`~tokenweave.trainers.signals.TokenBatch` (rows ``[chosen; rejected]``, shifted like the
  log-probs; the host, :mod:`.host`, applies the random control ``signal_control``; for a signal that
  ``needs_hidden_states``, the policy's and the reference's final hidden states from the same forwards, and the other
  frozen models' on demand, as ``TokenBatch.hidden``), each split into its ``(chosen, rejected)`` pair;
* ``sequential_kl`` (TDPO): the final hidden states of both models, captured during the same forwards
  (:func:`tokenweave.models.final_hidden_states`), turned into full-vocabulary KL chunk by chunk
  (``chunked_sequential_kl``) by the LM heads (:func:`tokenweave.models.lm_head_functions`: under DeepSpeed
  ZeRO-3, a frozen head is gathered once per step).

The batch is TRL's: ``[prompt+chosen ; prompt+rejected]`` (``2B`` rows, right-padded). The
fused head returns ``log_probs[:, t] = log p(input_ids[:, t+1])``, computed from the hidden state at
position ``t``; everything per token is therefore shifted by one (``completion_mask[:, 1:]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import create_model_from_path

from ..checks import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, check_options
from ..losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLossConfig,
    PreferenceLossOutput,
    TokenPairs,
    chunked_sequential_kl,
    get_preference_loss,
    is_preference_loss,
)
from ..models import (
    check_lm_heads,
    final_hidden_states,
    head_calls_are_collective,
    lm_head_functions,
    resolve_model,
)
from .aligndistil import AlignDistilConfig
from .card import ModelCardMixin
from .checkpointing import CheckpointingMixin
from .collators import ROW_KEY
from .critical import CriticalTokensConfig
from .finite import FiniteTrainingMixin
from .frozen import FrozenForwards, FrozenModels, FrozenModelsConfig, HiddenStates
from .host import SignalHostMixin
from .signals import TokenBatch, TokenSignalConfig, active_signal_classes, resolve_token_signals
from .tgdpo import TgdpoConfig
from .token_rewards import TokenRewardsConfig
from .treg import TregConfig
from .weight_rules import WeightRulesConfig
from .weights import WeightsDPOConfig

TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""TRL 1.16's DPO ``loss_type`` values, the branches of ``DPOTrainer._compute_loss``, which TRL checks only at the
first step: a mirror of TRL, checked against TRL's source by ``tests/test_one_line_errors.py``."""

# Batch keys that are not model inputs (besides the token signals' columns).
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
TRAINER_INPUTS = frozenset({"sequential_kl"})
"""The preference-loss inputs the trainer computes itself; the others come from token signals."""


@dataclass
class TokenDPOConfig(AlignDistilConfig, TgdpoConfig, TregConfig, TokenRewardsConfig, CriticalTokensConfig,
                     WeightsDPOConfig, WeightRulesConfig, TokenSignalConfig, FrozenModelsConfig, DPOConfig):
    """TRL's ``DPOConfig`` plus the token-level preference losses (``cdpo``, ``tdpo1``, ``tdpo2``, ``tgdpo``, ``treg``,
    ``aligndistil``, any registered) and the token signals that give them their per-token inputs.

    The loss is chosen with TRL's ``loss_type``. TRL's loss types keep their meaning; a token-level
    one must be used alone (no ``loss_weights``), without ``precompute_ref_log_probs`` (it stores
    sequence sums only, and these losses need per-token reference quantities), ``ld_alpha`` or
    ``use_weighting``. Every input the loss needs besides ``sequential_kl`` (which the trainer computes) must come
    from a token signal that is on (``token_signals``): cDPO's ``token_weights`` from ``critical_tokens`` (on by
    default with ``loss_type: cdpo``), ``weights`` or ``weight_rules``; TGDPO's and T-REG's ``token_rewards`` from the
    ``tgdpo`` and ``treg`` signals (on by default with their loss); each method's own fields are in its mixin.

    cDPO's per-token weights come from the dataset: either ``chosen_weights``/``rejected_weights`` (the
    weights themselves) or ``chosen_scores``/``rejected_scores`` (critical-token scores ``s_t``, turned
    into weights with :func:`~tokenweave.losses.preference.critical_token_weights`); the column names are
    configurable. Each value is a list with one float per token of the completion *as DPOTrainer
    tokenises it* (``chosen_ids``/``rejected_ids``: the tokens of ``prompt + completion`` after the
    tokenised prompt, template tokens and EOS included). Weights columns win when both kinds are
    present. A missing or misaligned row is a ``ValueError`` raised while the dataset is prepared.

    Note: ``cdpo`` here is "Critical Tokens Matter" (Lin et al.), not the conservative DPO of
    Mitchell (2023) that TRL once called cDPO; ``label_smoothing`` still applies to ``cdpo`` as the
    conservative-DPO ε (default 0, as in the critical-token code).
    """

    trainer_kind: ClassVar[str] = "dpo"

    option_ranges: ClassVar[dict] = {"tdpo_alpha": NON_NEGATIVE, "tdpo_kl_chunk_size": AT_LEAST_ONE}

    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Type of loss to use: any of TRL's DPO loss types ('sigmoid', 'ipo', 'hinge', ...; several "
            "are combined with `loss_weights`), or one token-level loss, alone: 'cdpo' (token-weighted DPO of "
            "'Critical Tokens Matter', arXiv 2411.19943), 'tdpo1' or 'tdpo2' (Token-level DPO, arXiv 2404.11999), "
            "'tgdpo' (arXiv 2506.14574), 'treg' (arXiv 2412.02685), 'aligndistil' (arXiv 2503.02832), any "
            "registered with @register_preference_loss, or 'package.module:function' (your own)."
        },
    )
    tdpo_alpha: float = field(
        default=0.5,
        metadata={
            "help": "TDPO2's α, the weight of the sequential-KL difference in the margin (paper default 0.5). "
            "Ignored by TDPO1, which has no α.",
        },
    )
    tdpo_kl_chunk_size: int = field(
        default=256,
        metadata={
            "help": "TDPO: completion positions per chunk of the full-vocabulary KL. Peak memory is a few "
            "[chunk, vocab] fp32 tensors instead of [2B, T, vocab] logits for both models.",
        },
    )

    def __post_init__(self):
        check_options(self)  # types, choices and ranges
        super().__post_init__()  # turns a single loss_type string into a list
        unknown = [name for name in self.loss_type if name not in TRL_DPO_LOSS_TYPES and not is_preference_loss(name)]
        if unknown:
            raise ConfigError(f"Unknown loss_type {unknown}: TRL's DPO losses are {', '.join(TRL_DPO_LOSS_TYPES)}; "
                              f"tokenweave's token-level losses are {', '.join(sorted(PREFERENCE_LOSSES))}, or "
                              "'package.module:function'.")
        self.resolve_frozen_models()
        token_loss = self.token_loss_type
        if token_loss:
            if len(self.loss_type) != 1 or self.loss_weights is not None:
                raise ValueError(
                    f"loss_type {self.loss_type}: a token-level loss (a registered preference loss) must be the "
                    "only loss type, without loss_weights."
                )
            if self.precompute_ref_log_probs:
                raise ValueError(
                    f"loss_type {token_loss!r} cannot use precompute_ref_log_probs: it stores the reference's "
                    "log-probs summed over each sequence, and this loss needs per-token reference quantities "
                    "(TDPO: the reference's full distribution at every position)."
                )
            for option in ("ld_alpha", "use_weighting"):
                if getattr(self, option) not in (None, False):
                    raise ValueError(f"loss_type {token_loss!r} does not support {option}.")
        resolve_token_signals(self)
        provided = {name for signal in active_signal_classes(self) for name in signal.provides}
        if token_loss is None:
            if provided:
                raise ConfigError(f"token_signals {self.token_signals} give per-token loss inputs {sorted(provided)}, "
                                  f"which TRL's loss_type {self.loss_type} does not read: use a token-level loss "
                                  "(cdpo, tgdpo, treg, ...).")
            return
        needs = get_preference_loss(token_loss).needs
        missing, unread = sorted(needs - TRAINER_INPUTS - provided), sorted(provided - needs)
        if missing:
            raise ConfigError(f"loss_type {token_loss!r} needs {missing}, which no token signal that is on gives "
                              f"(token_signals: {self.token_signals}).")
        if unread:
            raise ConfigError(f"token_signals {self.token_signals} give {unread}, which loss_type {token_loss!r} does "
                              "not read.")

    @property
    def token_loss_type(self) -> str | None:
        """The token-level loss in ``loss_type`` (a registered preference loss, or ``package.module:function``), or
        None for TRL's losses."""
        return self.loss_type[0] if is_preference_loss(self.loss_type[0]) else None


class TokenDPOTrainer(SignalHostMixin, FiniteTrainingMixin, ModelCardMixin, CheckpointingMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with the registered preference losses and the token signals of :class:`TokenDPOConfig`.

    With a TRL ``loss_type`` nothing changes. With a token-level loss (``cdpo``, ``tdpo1``, ``tdpo2``, any name
    registered with :func:`~tokenweave.losses.preference.register_preference_loss`), ``_compute_loss`` is replaced by
    :meth:`_compute_token_loss`, the one place that mirrors TRL's; the reference is whatever TRL would use
    (``ref_model``, a copy loaded from the policy's path, or the policy with its PEFT adapter disabled:
    ``trainers.frozen``), or ``reference_model_path``. The loss is a per-batch mean, as DPOTrainer's
    (``loss_is_scaled_for_ga = False``).
    """

    trainer_kind = "dpo"
    _args_position = 2
    trainer_metric_prefixes = ("weights/", "kl/")

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        path = getattr(training_args, "reference_model_path", None)
        if path is not None:  # the reference of the loss and of the signals: TRL prepares it as its ref_model
            if kwargs.get("ref_model") is not None or (len(args) > 1 and args[1] is not None):
                raise ValueError("Give the reference either as ref_model or as reference_model_path, not both.")
            init_kwargs = dict(training_args.model_init_kwargs or {})
            if training_args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                init_kwargs["device_map"] = None
            kwargs["ref_model"] = create_model_from_path(resolve_model(path), **init_kwargs)
        super().__init__(*args, **kwargs)
        self.token_loss_type = getattr(self.args, "token_loss_type", None)
        self.preference_loss = None
        if self.token_loss_type is None:
            if any(is_preference_loss(name) for name in self.args.loss_type):
                config_name = type(self.args).__name__
                raise TypeError(f"loss_type {self.args.loss_type} needs a TokenDPOConfig, not a {config_name}.")
            return
        if self._is_vision_dataset:
            raise NotImplementedError(f"loss_type {self.token_loss_type!r} does not support vision datasets yet.")
        self.preference_loss = get_preference_loss(self.token_loss_type)
        prefix = f"{self.token_loss_type}_"
        self.preference_loss_config = PreferenceLossConfig(
            beta=self.beta, label_smoothing=self.label_smoothing, tdpo_alpha=self.args.tdpo_alpha,
            options={name: value for name, value in vars(self.args).items() if name.startswith(prefix)},
        )
        if self.frozen_models is None:  # the loss's reference, through the frozen models (no signal named one)
            self.frozen_models = FrozenModels(self, {"reference"})
        needing = [name for name, signal in self.signals.items() if signal.needs_hidden_states]
        self.signals_need_hidden_states = bool(needing)
        """Whether the forwards keep their final hidden states for the signals (``TokenBatch.hidden``)."""
        if "sequential_kl" in self.preference_loss.needs:
            self._check_lm_heads(f"loss_type {self.token_loss_type!r}")
        if needing:
            self._check_lm_heads(f"token_signals {needing}")

    # -- data -----------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenisation, then the token signals' per-token columns (:meth:`prepare_signal_columns`)."""
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not getattr(args, "token_signals", None):
            return dataset
        return self.prepare_signal_columns(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        """Keep the token signals' columns when ``remove_unused_columns`` drops the others."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += self.signal_dataset_column_names()

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
            1318-1347  reference forward                        same (the reference chosen as TRL chooses it:
                                                                trainers.frozen), kept per token (no
                                                                precompute_ref_log_probs)
            1349-1528  log-ratios, f-divergence, loss_type      the registered loss on TokenPairs and the inputs it
                       loop                                     needs (the token signals', _preference_loss_inputs);
                                                                mean over pairs
            1530-1533  MoE aux loss                             same
            1535-1601  metrics (_log_dpo_metrics)               same names and computation; rewards are the loss's
                                                                own; plus kl/* and weights/* (_log_loss_inputs)
            1603-1612  return_outputs: a second forward         same, without TRL's FutureWarning

        ``FrozenModels.model("reference")`` (``trainers.frozen``) and ``_log_dpo_metrics`` below are part of this
        mirror.

        Per-token tensors are ``[2B, L-1]`` over next-token positions: entry ``t`` is about
        ``input_ids[:, t+1]``. ``chosen_*``/``rejected_*`` are their two halves.
        """
        mode = "train" if self.model.training else "eval"
        capture_hidden = "sequential_kl" in self.preference_loss.needs or self.signals_need_hidden_states
        model_kwargs = {key: value for key, value in inputs.items()
                        if key not in _NON_MODEL_KEYS and key not in self.signal_batch_keys}
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
        with self.frozen_models.model("reference") as ref_model:
            with final_hidden_states(ref_model, enabled=capture_hidden) as ref_hidden:
                ref_outputs = ref_model(**ref_model_kwargs, labels=labels, fused_lm_head=True)
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens, as TRL does.
        logps = outputs.log_probs[:, -seq_len:]
        ref_logps = ref_outputs.log_probs[:, -seq_len:]
        pairs = TokenPairs(*logps.chunk(2), *ref_logps.chunk(2), *mask.chunk(2))
        hidden = None
        if capture_hidden:  # the hidden state at position t predicts token t+1: the positions of `logps`
            hidden = tuple(states[0][:, -(seq_len + 1) : -1] for states in (policy_hidden, ref_hidden))
        signal_inputs = self._signal_inputs(inputs, outputs, logps, ref_logps, mask, ref_model_kwargs, labels,
                                            (model, ref_model), hidden)
        loss_inputs = self._preference_loss_inputs(signal_inputs, mask, (model, ref_model), hidden)
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

    @torch.no_grad()
    def signal_values(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The per-token inputs the loss gets for a collated batch (the token signals' ``token_weights``,
        ``token_rewards``, ...: each ``[2B, L-1]``, rows ``[chosen; rejected]``, entry t about token t + 1, meaningful
        where ``completion_mask[:, 1:]`` is set), the random control applied, from :meth:`_compute_token_loss` without
        gradient in evaluation mode (its metrics go to the ``eval`` ones): what the heatmap shows."""
        if self.preference_loss is None:
            raise ValueError(f"loss_type {self.args.loss_type} is TRL's: no token-level inputs to show.")
        inputs = self._prepare_inputs(inputs)
        seen: dict[str, Any] = {}
        loss = self.preference_loss

        def capture(pairs, config, **loss_inputs):
            seen.update(loss_inputs)
            return loss.fn(pairs, config, **loss_inputs)

        self.preference_loss = loss._replace(fn=capture)
        training = self.model.training
        self.model.eval()
        try:
            self._compute_token_loss(self.model, inputs, return_outputs=False)
        finally:
            self.preference_loss = loss
            self.model.train(training)
        shape = inputs["completion_mask"][:, 1:].shape
        return {name: torch.cat(value) for name, value in seen.items()
                if isinstance(value, tuple) and torch.cat(value).shape == shape}

    # -- the inputs a registered loss needs -------------------------------------------------------------

    def _signal_inputs(self, inputs, outputs, logps, ref_logps, mask, model_kwargs, labels,
                       models: tuple[nn.Module, nn.Module], hidden: tuple[Tensor, Tensor] | None) -> dict[str, Any]:
        """The token signals' loss inputs for this batch (``token_weights`` the product of theirs, ``[2B, L-1]``): the
        signals see the batch as a :class:`~tokenweave.trainers.signals.TokenBatch`, rows ``[chosen; rejected]``,
        shifted like ``logps``, the reference's log-probs known, each row identified by its dataset row and side;
        for a signal that ``needs_hidden_states``, ``TokenBatch.hidden`` holds the policy's and the reference's final
        hidden states (``hidden``, from the loss's forwards of ``models``) and the other frozen models' on demand."""
        seq_len = mask.size(1)

        def forward(frozen_model) -> Tensor:
            return frozen_model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:]

        def hidden_forward(frozen_model) -> tuple[Tensor, Tensor]:
            with final_hidden_states(frozen_model) as captured:
                frozen_outputs = frozen_model(**model_kwargs, labels=labels, fused_lm_head=True)
            return frozen_outputs.log_probs[:, -seq_len:], captured[0][:, -(seq_len + 1) : -1]

        rows = inputs.get(ROW_KEY)
        row_keys = None if rows is None else torch.stack(
            [rows.repeat(2), torch.arange(2, device=rows.device).repeat_interleave(rows.numel())], dim=1)
        frozen = FrozenForwards(self.frozen_models, forward, {"reference": ref_logps}, hidden_forward=hidden_forward,
                                hidden_first=self.signals_need_hidden_states,
                                known_hidden=None if hidden is None else {"reference": (hidden[1], models[1])})
        token_hidden = None
        if self.signals_need_hidden_states:
            token_hidden = HiddenStates(hidden[0], models[0], frozen, mask, self.accelerator)
        batch = TokenBatch("dpo", logps, mask, outputs.entropy[:, -seq_len:], None, self.batch_columns(inputs, 1),
                           frozen, self.model.training, row_keys=row_keys, hidden=token_hidden)
        token_weights, signal_inputs = self.signal_token_inputs(batch)
        return signal_inputs if token_weights is None else signal_inputs | {"token_weights": token_weights}

    def _preference_loss_inputs(
        self,
        signal_inputs: dict[str, Any],
        mask: Tensor,
        models: tuple[nn.Module, nn.Module],
        hidden: tuple[Tensor, Tensor] | None,
    ) -> dict[str, Any]:
        """The extra inputs the loss needs (``PreferenceLoss.needs``), each a ``(chosen, rejected)`` pair:

        * ``sequential_kl``: ``SeqKL = Σ_t KL(π_ref ‖ π_θ)`` (``[B]`` per side), by ``chunked_sequential_kl`` from
          ``hidden`` (the policy's and the reference's final hidden states at the positions of ``mask``) and the
          two models' LM heads (:func:`tokenweave.models.lm_head_functions`: under ZeRO-3 a frozen head is gathered
          once per step; module heads are then called as many times on every process);
        * any other: the token signals' (``signal_inputs``; a ``[2B, ...]`` tensor split into its chosen and
          rejected halves), e.g. cDPO's ``token_weights``.
        """
        loss_inputs = {}
        for name in self.preference_loss.needs:
            if name == "sequential_kl":
                heads = lm_head_functions(models)
                num_chunks = self._num_kl_chunks(mask) if head_calls_are_collective(heads) else None
                per_token_kl = chunked_sequential_kl(
                    *hidden, *heads, mask, chunk_size=self.args.tdpo_kl_chunk_size, num_chunks=num_chunks
                )
                loss_inputs[name] = per_token_kl.sum(-1).chunk(2)
            else:
                value = signal_inputs[name]
                loss_inputs[name] = value.chunk(2) if isinstance(value, Tensor) else value
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

    def _check_lm_heads(self, user: str) -> None:
        """A loss that needs ``sequential_kl``, or a signal that needs hidden states, calls the LM heads directly
        (:func:`tokenweave.models.check_lm_heads`: refuse heads whose logits would differ from the model's, and heads
        with a PEFT adapter, since the reference's logits are computed with the same head module); ``user`` names
        it."""
        models = [self.model] if self.ref_model is None else [self.model, self.ref_model]
        frozen = list(self.frozen_models.loaded.values()) if self.frozen_models is not None else []
        check_lm_heads([*models, *frozen], user)
