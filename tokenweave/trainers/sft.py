"""TokenSFTTrainer: TRL's SFTTrainer with token signals, the home of token-weighted fine-tuning.

Its loss is TRL 1.16's SFT loss, computed in one labelled place (:meth:`TokenSFTLoss._compute_token_loss`, the
mirror of ``SFTTrainer.compute_loss``'s fused-head path) on TRL's fused LM head (per-token log-probs and entropies, no
``[B, T, V]`` logits), with a weight on every label token from the token signals
(:func:`~tokenweave.losses.sft.token_weighted_nll`) and TRL's normaliser, ``num_items_in_batch`` (in
:class:`TokenSFTLoss`, after the non-finite guard among the trainer's bases). With no signal it is
TRL's loss, gradients and metrics exactly (``tests/test_sft_trainer.py`` checks it against ``SFTTrainer``, with and
without gradient accumulation, padded and padding-free). TRL's other loss paths (``compute_loss_func``, label
smoothing, Ulysses sequence parallelism) are TRL's, untouched, and take no token signal.

A signal's per-token dataset columns hold one value per token TRL labels (``labels != -100``), before truncation
(:mod:`tokenweave.data.token_columns`). So that truncation cuts them as it cuts the labels, the dataset is prepared by
TRL without truncation, the signals' columns are added and checked, and then truncated with the labels
(:meth:`TokenSFTTrainer._truncate`, the mirror of TRL's truncation step). Packing would drop the columns: refused.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ..checks import ConfigError, check_options
from ..losses.sft import token_weighted_nll
from .card import ModelCardMixin
from .checkpointing import CheckpointingMixin
from .collators import ROW_KEY
from .finite import FiniteTrainingMixin
from .frozen import FrozenForwards, FrozenModelsConfig
from .host import SignalHostMixin, signal_dataset_columns, uses_row_identity
from .signals import TokenBatch, TokenSignalConfig, active_signal_classes, resolve_token_signals
from .weight_rules import WeightRulesConfig
from .weights import WeightsSFTConfig


@dataclass
class TokenSFTConfig(WeightRulesConfig, WeightsSFTConfig, TokenSignalConfig, FrozenModelsConfig, SFTConfig):
    """TRL's ``SFTConfig`` plus the token signals (``token_signals``: ``weights``, ``weight_rules``, any registered
    that supports SFT), their frozen models and the random control."""

    trainer_kind: ClassVar[str] = "sft"

    def __post_init__(self):
        check_options(self)  # types, choices and ranges
        super().__post_init__()
        self.resolve_frozen_models()
        resolve_token_signals(self)
        signals = active_signal_classes(self)
        others = sorted({name for signal in signals for name in signal.provides} - {"token_weights"})
        if others:
            raise ConfigError(f"token_signals {self.token_signals} give {others}: the SFT loss takes token weights "
                              "only.")
        if (self.packing or self.eval_packing) and (signal_dataset_columns(self) or uses_row_identity(self)):
            raise ConfigError(f"packing joins examples and drops every column but the ids and labels: token_signals "
                              f"{self.token_signals} read per-token columns (and the random control each row's "
                              "identity). Use padding_free: true instead.")
        if signals and self.label_smoothing_factor != 0 and self.loss_type == "nll":
            raise ConfigError(f"token_signals {self.token_signals} weigh TRL's fused-head SFT loss, which "
                              "label_smoothing_factor replaces.")
        if (self.dataset_kwargs or {}).get("skip_prepare_dataset") and signal_dataset_columns(self):
            raise ConfigError(f"token_signals {self.token_signals} read per-token columns, which the dataset "
                              "preparation adds: not with dataset_kwargs skip_prepare_dataset.")


class PackedRows:
    """A padding-free batch's one packed row of ``[1, L-1]`` per-token values (TRL's fused head: entry j is about
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
        rows = values.new_zeros(self.shape)
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
            1611       fused-head forward                        same, without the signals' batch keys
            1612-1618  per-token loss, DFT, / num_items_in_batch  token_weighted_nll, with the signals' token
                                                                 weights (_token_inputs)
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
        signal_inputs = {key: inputs.pop(key) for key in self.signal_batch_keys if key in inputs}
        logits_inputs = {key: value for key, value in inputs.items() if key != "labels"}

        outputs = model(**inputs, fused_lm_head=True)
        token_weights = self._token_inputs(inputs, signal_inputs, outputs) if self.signals else None
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = token_weighted_nll(outputs.log_probs, num_tokens, token_weights, dft=self.args.loss_type == "dft")
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

    def _token_inputs(self, inputs, signal_inputs, outputs) -> torch.Tensor | None:
        """The signals' token weights ``[B, L-1]`` for this batch. They see it as a :class:`TokenBatch` of the label
        tokens (TRL's ``label_mask``), one row per example (a padding-free batch, one packed row, is unpacked into
        its examples and the weights packed back: :class:`PackedRows`), the signals' columns shifted like the
        log-probs, the frozen models' log-probs of the same labels."""
        model_inputs = {key: value for key, value in inputs.items() if key != "output_router_logits"}
        rows = PackedRows(inputs["position_ids"]) if "attention_mask" not in inputs else None
        unpack = rows.unpack if rows is not None else (lambda values: values)

        def forward(frozen_model) -> torch.Tensor:
            return unpack(frozen_model(**model_inputs, fused_lm_head=True).log_probs)

        identity = signal_inputs.get(ROW_KEY)
        batch = TokenBatch("sft", unpack(outputs.log_probs), unpack(outputs.label_mask), unpack(outputs.entropy), None,
                           {key: unpack(value) for key, value in self.batch_columns(signal_inputs, 1).items()},
                           FrozenForwards(self.frozen_models, forward), self.model.training,
                           row_keys=None if identity is None else identity.unsqueeze(1))
        token_weights, _ = self.signal_token_inputs(batch)
        return token_weights if rows is None or token_weights is None else rows.pack(token_weights)

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
