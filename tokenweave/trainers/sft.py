"""TokenSFTTrainer: TRL's SFTTrainer with token signals, the home of token-weighted fine-tuning.

Its loss is TRL 1.16's SFT loss, computed in one labelled place (:meth:`TokenSFTLoss._compute_token_loss`, the
mirror of ``SFTTrainer.compute_loss``'s fused-head path) on TRL's fused LM head (per-token log-probs and entropies, no
``[B, T, V]`` logits), with a weight on every label token from the token signals
(:func:`~tokenweave.losses.sft.token_weighted_nll`) and TRL's normaliser, ``num_items_in_batch`` (in
:class:`TokenSFTLoss`, after the non-finite guard among the trainer's bases). With no signal it is
TRL's loss, gradients and metrics exactly (``tests/test_sft_trainer.py`` checks it against ``SFTTrainer``, with and
without gradient accumulation, padded and padding-free). TRL's other loss paths (``compute_loss_func``, label
smoothing, Ulysses sequence parallelism) are TRL's, untouched, and take no token signal.

What a signal may read besides the log-probs, entropies and its columns (``TokenBatch``): the frozen models' log-probs
(and their final hidden states), the policy's final hidden states kept from its forward with the LM heads, for
full-vocabulary math in chunks (``needs_hidden_states``: EAFT's top-20 entropy, ASFT's KL), the batch's model inputs
(ssToken's attention forward), and, for a selection over a whole optimizer step, every micro-batch of the step before
the first one's forward (``prepare_window``, from :meth:`TokenSFTTrainer.get_batch_samples`: Rho-1's
``global_batch``). ``token_weight_normalizer: micro_batch`` replaces TRL's normaliser with each micro-batch's weighted
mean (the released codes' choice; it changes with how a batch is split).

A signal's per-token dataset columns hold one value per token TRL labels (``labels != -100``), before truncation
(:mod:`tokenweave.data.token_columns`). So that truncation cuts them as it cuts the labels, the dataset is prepared by
TRL without truncation, the signals' columns are added and checked, and then truncated with the labels
(:meth:`TokenSFTTrainer._truncate`, the mirror of TRL's truncation step). Packing would drop the columns: refused.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ..checks import ConfigError, check_options
from ..losses.sft import micro_batch_normalizer, token_weighted_nll
from ..models import check_lm_heads, final_hidden_states
from .dft import DftSignal  # noqa: F401  (registers the dft signal, which has no fields of its own)
from .asft import AsftConfig
from .card import ModelCardMixin
from .checkpointing import CheckpointingMixin
from .collators import ROW_KEY
from .finite import FiniteTrainingMixin
from .eaft import EaftConfig
from .frozen import FrozenForwards, FrozenModelsConfig, HiddenStates
from .host import SignalHostMixin, signal_dataset_columns, uses_row_identity
from .profit import ProfitConfig
from .rho1 import Rho1Config
from .signals import TokenBatch, TokenSignalConfig, active_signal_classes, resolve_token_signals
from .sstoken import SsTokenConfig
from .token_cleaning import TokenCleaningConfig
from .weight_rules import WeightRulesConfig
from .weights import WeightsSFTConfig


@dataclass
class TokenSFTConfig(Rho1Config, SsTokenConfig, TokenCleaningConfig, EaftConfig, AsftConfig, ProfitConfig,
                     WeightRulesConfig, WeightsSFTConfig, TokenSignalConfig, FrozenModelsConfig, SFTConfig):
    """TRL's ``SFTConfig`` plus the token signals (``token_signals``: the SFT family, ``dft``, ``eaft``, ``asft``,
    ``profit``, ``rho1``, ``token_cleaning``, ``sstoken``, ``weights``, ``weight_rules``, or any registered that
    supports SFT; each method's fields come from its mixin), their frozen models, the random control and the loss's
    normaliser (``token_weight_normalizer``)."""

    trainer_kind: ClassVar[str] = "sft"

    token_weight_normalizer: str = field(
        default="num_items_in_batch",
        metadata={"help": "The SFT loss's normaliser with token signals: 'num_items_in_batch', TRL's (the label tokens "
                  "of the optimizer step on every process: a run does not change with how its batch is split); "
                  "'micro_batch', the weighted mean of each micro-batch, Σ w·ℓ / Σ w (the released codes of ssToken, "
                  "TokenCleaning and TL-Training, and ProFit's recounted normaliser: it changes with the split).",
                  "choices": ["num_items_in_batch", "micro_batch"]},
    )

    def __post_init__(self):
        check_options(self)  # types, choices and ranges
        super().__post_init__()
        self.resolve_frozen_models()
        resolve_token_signals(self)
        signals = active_signal_classes(self)
        others = sorted({name for signal in signals for name in signal.provides} - {"token_weights", "token_loss"})
        if others:
            raise ConfigError(f"token_signals {self.token_signals} give {others}: the SFT loss takes token weights "
                              "and added per-token terms only.")
        if (self.packing or self.eval_packing) and (signal_dataset_columns(self) or uses_row_identity(self)):
            raise ConfigError(f"packing joins examples and drops every column but the ids and labels: token_signals "
                              f"{self.token_signals} read per-token columns (and the random control each row's "
                              "identity). Use padding_free: true instead.")
        if self.token_weight_normalizer == "micro_batch" and not any(signal.weighs_tokens for signal in signals):
            raise ConfigError("token_weight_normalizer micro_batch divides by the token weights' sum: it needs a token "
                              f"signal that weighs tokens, and token_signals is {self.token_signals}.")
        if signals and self.label_smoothing_factor != 0 and self.loss_type == "nll":
            raise ConfigError(f"token_signals {self.token_signals} weigh TRL's fused-head SFT loss, which "
                              "label_smoothing_factor replaces.")
        if (self.dataset_kwargs or {}).get("skip_prepare_dataset") and signal_dataset_columns(self):
            raise ConfigError(f"token_signals {self.token_signals} read per-token columns, which the dataset "
                              "preparation adds: not with dataset_kwargs skip_prepare_dataset.")


class PackedRows:
    """A padding-free batch's one packed row of ``[1, L-1, ...]`` per-token values (TRL's fused head: entry j is about
    token j + 1) as ``[E, T]``, one row per example (entry c about the example's token c + 1, as in a padded batch),
    and back. From TRL's ``position_ids`` (each example's positions start at 0). The entries about an example's first
    token (predicted from the previous example's last one: TRL masks its label) have no place and are left out, and
    :meth:`pack` gives them 0."""

    def __init__(self, position_ids: torch.Tensor):
        positions = position_ids[0]
        self.example = (positions == 0).cumsum(0)[1:] - 1  # the example of each predicted token j + 1
        self.column = positions[1:] - 1  # its column in the example's row (-1: its first token)
        self.kept = self.column >= 0
        self.shape = (int(self.example[-1]) + 1, int(positions.max()))

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        rows = values.new_zeros(self.shape + values.shape[2:])
        rows[self.example[self.kept], self.column[self.kept]] = values[0][self.kept]
        return rows

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        packed = rows.new_zeros(self.kept.shape)
        packed[self.kept] = rows[self.example[self.kept], self.column[self.kept]]
        return packed.unsqueeze(0)


class TokenSFTLoss:
    """The loss of :class:`TokenSFTTrainer` (the module docstring): a mixin after the non-finite guard in its bases,
    so that the guard's ``compute_loss`` wraps this one, as it wraps TRL's in every trainer."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.mirrors_trl_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        return self._compute_token_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_token_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The SFT loss with the signals' token weights: **the mirror of TRL 1.16's ``SFTTrainer.compute_loss``**
        (``trl/trainer/sft_trainer.py``, lines 1560-1675), its fused-head path, the only TRL code this trainer
        re-implements (TRL has no smaller hook: its per-token loss is inline). ``tests/test_sft_trainer.py`` checks it
        against TRL's on loss, gradients and logged metrics. Block by block (TRL 1.16 lines)::

            1561-1569  mode, use_cache, MoE router logits        same
            1611       fused-head forward                        same, without the signals' batch keys (and the
                                                                 final hidden states kept for a signal that
                                                                 needs_hidden_states)
            1612-1618  per-token loss, DFT, / num_items_in_batch  token_weighted_nll, with the signals' token
                                                                 weights and added terms (_token_inputs);
                                                                 token_weight_normalizer 'micro_batch': / Σ w of
                                                                 the micro-batch and the accumulation steps
            1619-1629  MoE aux loss, × processes (average_tokens   same
                       _across_devices)
            1639-1663  metrics: entropy, mean_token_accuracy,      same; plus weights/mean (the mean token weight)
                       num_tokens, aux_loss                        when a signal weighs the tokens
            1665-1675  return_outputs: a second forward           same
        """
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        signal_inputs, outputs, hidden = self._forward_for_signals(model, inputs)
        logits_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        token_weights, token_loss = None, None
        if self.signals:
            token_weights, token_loss = self._token_inputs(model, inputs, signal_inputs, outputs, hidden)
        if self.signals and self.args.token_weight_normalizer == "micro_batch":
            loss = token_weighted_nll(outputs.log_probs, micro_batch_normalizer(outputs.label_mask, token_weights),
                                      token_weights, dft=self.args.loss_type == "dft", token_loss=token_loss)
            if num_items_in_batch is not None:  # the Trainer leaves the average over the accumulation steps to us
                loss = loss / self.current_gradient_accumulation_steps
        else:
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = token_weighted_nll(outputs.log_probs, num_tokens, token_weights, dft=self.args.loss_type == "dft",
                                      token_loss=token_loss)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        self._log_sft_metrics(mode, inputs, outputs, token_weights)
        if return_outputs:  # TRL's deprecated path for compute_metrics: it needs the logits
            warnings.warn("`return_outputs=True`, and the logits it passes to `compute_metrics` and "
                          "`preprocess_logits_for_metrics`, are deprecated and will be removed in v2.0.0. The fused LM "
                          "head does not build the logits, so they are recomputed with an extra forward pass.",
                          FutureWarning, stacklevel=3)
            with torch.no_grad():
                outputs = model(**logits_inputs)
            return loss, outputs
        return loss

    def _forward_for_signals(self, model, inputs: dict) -> tuple[dict, object, torch.Tensor | None]:
        """TRL's fused-head forward of a batch (``inputs`` without the signals' batch keys, which are popped: they are
        never model inputs): ``(the signals' batch entries, the outputs, the policy's final hidden states [B, L, H]
        kept for a signal that needs_hidden_states, else None)``."""
        signal_inputs = {key: inputs.pop(key) for key in self.signal_batch_keys if key in inputs}
        with final_hidden_states(model, enabled=self.signals_need_hidden_states) as hidden:
            outputs = model(**inputs, fused_lm_head=True)
        return signal_inputs, outputs, hidden[0] if hidden else None

    def _token_inputs(self, model, inputs, signal_inputs, outputs, hidden) -> tuple[torch.Tensor | None, ...]:
        """The signals' token weights and added per-token loss terms ``[B, L-1]`` (or None) for this batch
        (:meth:`_token_batch`; a padding-free batch's are packed back into its one row)."""
        batch, rows = self._token_batch(model, inputs, signal_inputs, outputs, hidden)
        token_weights, others = self.signal_token_inputs(batch)
        token_loss = others.get("token_loss")
        if rows is None:
            return token_weights, token_loss
        return tuple(None if values is None else rows.pack(values) for values in (token_weights, token_loss))

    def _token_batch(self, model, inputs, signal_inputs, outputs, policy_hidden) -> tuple[TokenBatch, PackedRows | None]:
        """The batch as the signals see it, a :class:`TokenBatch` of the label tokens (TRL's ``label_mask``), one
        row per example (a padding-free batch, one packed row, is unpacked into its examples: :class:`PackedRows`,
        returned to pack the signals' values back), the signals' columns shifted like the log-probs, the frozen
        models' log-probs (and hidden states) of the same labels, and, for a signal that ``needs_hidden_states``,
        the policy's final hidden states (``policy_hidden`` ``[B, L, H]``, kept from its forward)."""
        model_inputs = {key: value for key, value in inputs.items() if key != "output_router_logits"}
        rows = PackedRows(inputs["position_ids"]) if "attention_mask" not in inputs else None
        unpack = rows.unpack if rows is not None else (lambda values: values)

        def forward(frozen_model) -> torch.Tensor:
            return unpack(frozen_model(**model_inputs, fused_lm_head=True).log_probs)

        def hidden_forward(frozen_model) -> tuple[torch.Tensor, torch.Tensor]:
            with final_hidden_states(frozen_model) as captured:
                frozen_outputs = frozen_model(**model_inputs, fused_lm_head=True)
            return unpack(frozen_outputs.log_probs), unpack(captured[0][:, :-1])  # position t predicts token t + 1

        frozen = FrozenForwards(self.frozen_models, forward, hidden_forward=hidden_forward,
                                hidden_first=self.signals_need_hidden_states)
        mask = unpack(outputs.label_mask)
        hidden = None
        if policy_hidden is not None:
            hidden = HiddenStates(unpack(policy_hidden[:, :-1]), model, frozen, mask, self.accelerator)
        identity = signal_inputs.get(ROW_KEY)
        batch = TokenBatch("sft", unpack(outputs.log_probs), mask, unpack(outputs.entropy.detach()), None,
                           {key: unpack(value) for key, value in self.batch_columns(signal_inputs, 1).items()},
                           frozen, self.model.training, row_keys=None if identity is None else identity.unsqueeze(1),
                           inputs=model_inputs if rows is None else None, hidden=hidden)
        return batch, rows

    def _log_sft_metrics(self, mode, inputs, outputs, token_weights) -> None:
        """TRL 1.16's SFT metrics (sft_trainer.py lines 1639-1663), and ``weights/mean`` with token weights."""
        metrics = self._metrics[mode]
        num_valid = self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        entropy_sum = self.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
        num_correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if token_weights is not None:
            weight_sum = self.accelerator.gather_for_metrics((token_weights.detach() * outputs.label_mask).sum()).sum()
            metrics["weights/mean"].append((weight_sum / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                local_num_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                num_tokens_in_batch = self.accelerator.gather_for_metrics(local_num_tokens).sum().item()
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._total_train_tokens += num_tokens_in_batch // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())


class TokenSFTTrainer(SignalHostMixin, FiniteTrainingMixin, ModelCardMixin, CheckpointingMixin, TokenSFTLoss,
                      SFTTrainer):
    """TRL's ``SFTTrainer`` with the token signals of :class:`TokenSFTConfig` (module docstring); given a plain
    ``SFTConfig`` it has no signals, and its loss is still computed by :meth:`_compute_token_loss`."""

    trainer_kind = "sft"
    _args_position = 1
    trainer_metric_prefixes = ("weights/",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        sequence_parallel = bool(parallelism is not None and parallelism.sp_backend == "deepspeed"
                                 and parallelism.sp_enabled)
        self.mirrors_trl_loss = not (self.compute_loss_func is not None or sequence_parallel or (
            self.label_smoother is not None and self.args.loss_type == "nll"))
        """Whether the loss is :meth:`_compute_token_loss` (TRL's fused-head path) rather than TRL's own."""
        if self.signals and not self.mirrors_trl_loss:  # the config refuses label smoothing before any model loads
            raise ValueError(f"token_signals {list(self.signals)} weigh TRL's fused-head SFT loss: not with "
                             "compute_loss_func or sequence parallelism.")
        needing = [name for name, signal in self.signals.items() if signal.needs_hidden_states]
        self.signals_need_hidden_states = bool(needing)
        """Whether the policy's forward keeps its final hidden states for the signals (``TokenBatch.hidden``)."""
        if needing:  # the policy's head and the frozen models' heads are applied directly
            frozen = list(self.frozen_models.loaded.values()) if self.frozen_models is not None else []
            check_lm_heads([self.model, *frozen], f"token_signals {needing}")

    @torch.no_grad()
    def signal_weights(self, inputs: dict) -> torch.Tensor | None:
        """The token weights ``[B, L-1]`` (entry j about token j + 1; 0 where it has no label) the loss would put on a
        collated batch's label tokens, the random control applied, from a forward without gradient in evaluation mode
        (None without a weighing signal): what the heatmap and the benchmarks show. A ``global_batch`` selection takes
        the batch as its step."""
        inputs = self._prepare_inputs(dict(inputs)) | {"use_cache": False}
        with evaluation_mode(self.model):
            signal_inputs, outputs, hidden = self._forward_for_signals(self.model, inputs)
            return self._token_inputs(self.model, inputs, signal_inputs, outputs, hidden)[0]

    # -- the optimizer step's micro-batches --------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimizer step (and ``num_items_in_batch``); then each signal with
        :attr:`~tokenweave.trainers.signals.TokenSignal.window_columns` sees them all (``prepare_window``), before
        the first one's forward."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        windowed = [signal for signal in self.signals.values() if signal.window_columns]
        if batches and windowed:
            window = SFTStepWindow(self, batches)
            with evaluation_mode(self.model):  # scores without dropout, and no draw from the training's RNG
                for signal in windowed:
                    signal.prepare_window(window)
        return batches, num_items_in_batch

    # -- data --------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation; with token signals' columns, TRL's without truncation or shuffling, then the columns
        (:meth:`prepare_signal_columns`), truncated with the labels (:meth:`_truncate`), then shuffled as TRL does."""
        if not (signal_dataset_columns(args) or uses_row_identity(args)):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        untruncated = copy.copy(args)
        untruncated.max_length, untruncated.shuffle_dataset = None, False
        dataset = super()._prepare_dataset(dataset, processing_class, untruncated, packing, formatting_func,
                                           dataset_name)
        dataset = self.prepare_signal_columns(dataset, processing_class, args, dataset_name)
        dataset = self._truncate(dataset, args, dataset_name)
        return dataset.shuffle(seed=args.seed) if args.shuffle_dataset else dataset

    def _truncate(self, dataset, args, dataset_name):
        """TRL 1.16's truncation step (``SFTTrainer._prepare_dataset``, sft_trainer.py lines 1436-1463): ids and
        labels cut to ``max_length`` (``keep_start`` / ``keep_end``), then the examples left with no label dropped;
        here the signals' columns (one value per labelled token) are cut with them."""
        if args.max_length is None:
            return dataset
        if args.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"Unsupported truncation mode: {args.truncation_mode}, expected 'keep_start' or "
                             "'keep_end'")
        keep_start = args.truncation_mode == "keep_start"
        columns = [names[0] for names in signal_dataset_columns(args).values()]

        def truncate(example):
            labels = example["labels"]
            window = slice(None, args.max_length) if keep_start else slice(-args.max_length, None)
            kept = labels[window]
            before = 0 if keep_start else sum(label != -100 for label in labels[: len(labels) - len(kept)])
            count = sum(label != -100 for label in kept)
            return {"input_ids": example["input_ids"][window], "labels": kept,
                    **{column: example[column][before : before + count] for column in columns}}

        map_kwargs = {}
        if isinstance(dataset, Dataset):
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Truncating {dataset_name} dataset"}
        dataset = dataset.map(truncate, **map_kwargs)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Dropping fully masked examples from {dataset_name} dataset"
        return dataset.filter(lambda example: any(label != -100 for label in example["labels"]), **map_kwargs)

    def _set_signature_columns_if_needed(self):
        """Keep the token signals' columns when ``remove_unused_columns`` drops the others."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += self.signal_dataset_column_names()


class SFTStepWindow:
    """The micro-batches of one optimizer step on this process, for the signals' ``prepare_window``
    (:class:`~tokenweave.trainers.signals.StepWindow`): their :class:`TokenBatch` from a forward of the policy without
    gradient, in evaluation mode (the frozen models' log-probs computed when a signal asks), and the per-token values
    the signals give them, laid out as the collated columns are (one position before the first predicted token)."""

    def __init__(self, trainer: TokenSFTTrainer, batches: list[dict]):
        self.trainer = trainer
        self.batches = batches
        self._token_batches: list[TokenBatch] | None = None
        self._rows: list[PackedRows | None] = []

    def token_batches(self) -> list[TokenBatch]:
        if self._token_batches is None:
            trainer, self._token_batches = self.trainer, []
            with torch.no_grad():
                for batch in self.batches:
                    inputs = trainer._prepare_inputs(dict(batch)) | {"use_cache": False}
                    signal_inputs, outputs, hidden = trainer._forward_for_signals(trainer.model, inputs)
                    token_batch, rows = trainer._token_batch(trainer.model, inputs, signal_inputs, outputs, hidden)
                    self._token_batches.append(token_batch)
                    self._rows.append(rows)
        return self._token_batches

    def set_column(self, index: int, key: str, values: torch.Tensor) -> None:
        rows = self._rows[index]
        packed = values if rows is None else rows.pack(values)
        self.batches[index][key] = torch.nn.functional.pad(packed.detach(), (1, 0))


@contextlib.contextmanager
def evaluation_mode(model):
    """``model`` in evaluation mode (no dropout) inside the block, then back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
