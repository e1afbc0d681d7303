"""The host of the token signals: one mixin, first among the bases of TokenSFTTrainer, TokenDPOTrainer and
TokenGRPOTrainer, that does for every signal what the signal only declares (:mod:`.signals`).

==============================  ===================================================================================
what                            where
==============================  ===================================================================================
signals' ``init_context``       around TRL's ``__init__`` (:meth:`SignalHostMixin.__init__`)
the signals, their frozen       built after TRL's ``__init__``: ``self.signals`` (name → instance, in order),
models                          ``self.frozen_models`` (:class:`~tokenweave.trainers.frozen.FrozenModels`)
per-token dataset columns       SFT and DPO: after TRL's tokenisation, each signal's ``prepare_dataset``, then every
                                declared column checked against the completion tokens (:meth:`prepare_signal_columns`);
                                kept by ``remove_unused_columns`` (:meth:`signal_dataset_column_names`) and collated by
                                :class:`~tokenweave.trainers.collators.TokenColumnsCollator`
the loss inputs                 :meth:`signal_token_inputs`: each signal's ``token_inputs`` on the trainer's
                                :class:`~tokenweave.trainers.signals.TokenBatch`, checked for NaN and infinity, the
                                random control applied to the weights of each signal that weighs tokens, the token
                                weights multiplied
the random control              :meth:`signal_control` (``signal_control``: shuffle, inverse or full; a signal that puts its
                                weights elsewhere than ``token_weights``, as attention credit into the advantages,
                                calls it itself)
state                           ``_save_rng_state`` / ``_load_rng_state``: the signals' states
                                (``token_signals.pt``) and the history model (``frozen_models.pt``), beside TRL's RNG
                                state in each checkpoint; ``_save_checkpoint``: the run's token-metric prefixes
                                (``token_metrics.json``)
==============================  ===================================================================================

The random control's seeds come from ``signal_control_seed`` (None: ``seed``) and each row's identity
(``TokenBatch.row_keys``): in SFT and DPO the example's dataset row (and, in DPO, 0 for the chosen and 1 for the
rejected completion); in GRPO the generation's step and the completion's row in the generation batch over all
processes. So a row's control does not depend on batch order, process count or resumption.
"""

from __future__ import annotations

import functools
import json
import operator
import os
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..run_files import PREFIX_CHECKPOINT_DIR, TOKEN_METRICS_FILE
from ..tokens.controls import inverse_selection, row_generator, shuffle_within_mask
from .collators import ROW_KEY, TokenColumnsCollator
from .finite import NonFiniteError, any_non_finite, logged_step
from .frozen import FrozenModels
from .signals import TokenBatch, active_signal_classes, signals_init_context

SIGNAL_STATE_FILE = "token_signals.pt"
"""The token signals' states in a checkpoint directory (``{name: state_dict}``), saved with the RNG state."""
FROZEN_STATE_FILE = "frozen_models.pt"
"""The history model's trained weights in a checkpoint directory (``FrozenModels.state_dict``)."""


def signal_dataset_columns(args) -> dict[str, tuple[str, ...]]:
    """The per-token dataset columns of a config's signals: batch key → dataset column names."""
    columns: dict[str, tuple[str, ...]] = {}
    for signal in active_signal_classes(args):
        for key, names in signal.columns(args).items():
            if columns.get(key, names) != names:
                raise ValueError(f"two token signals read the batch key {key!r} from different columns: "
                                 f"{columns[key]} and {names}")
            columns[key] = tuple(names)
    return columns


def uses_row_identity(args) -> bool:
    """Whether the random control draws permutations (``shuffle``: each row then carries its identity, :data:`ROW_KEY`,
    its seed); ``inverse`` and ``full`` draw nothing."""
    return getattr(args, "signal_control", "none") == "shuffle"


class SignalHostMixin:
    """The token signals' host (module docstring), for a TRL trainer subclass whose config mixes in
    :class:`~tokenweave.trainers.signals.TokenSignalConfig`; with a plain TRL config there are no signals."""

    trainer_kind: ClassVar[str]
    _args_position: ClassVar[int]
    """Where ``args`` is among the trainer's positional parameters."""
    trainer_metric_prefixes: ClassVar[tuple[str, ...]] = ()
    """The name prefixes of the token-aware metrics the trainer itself logs (its signals add theirs)."""

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[self._args_position] if len(args) > self._args_position else None)
        with signals_init_context(training_args):
            super().__init__(*args, **kwargs)
        classes = active_signal_classes(self.args)
        frozen = {name for signal in classes for name in signal.frozen_models(self.args)}
        self.frozen_models = FrozenModels(self, frozen) if frozen else None
        self.signals = {signal.name: signal(self) for signal in classes}
        self.signal_columns = signal_dataset_columns(self.args)
        """The signals' per-token columns: batch key → dataset column names."""
        if self.trainer_kind != "grpo" and (self.signal_columns or uses_row_identity(self.args)):  # GRPO: sampled
            self.data_collator = TokenColumnsCollator(self.data_collator, self.signal_columns, self.trainer_kind,
                                                      row_index=uses_row_identity(self.args))
        self.signal_window_keys = {key for signal in classes for key in signal.window_columns}
        """Batch keys the signals' ``prepare_window`` adds (SFT)."""
        self.signal_batch_keys = {*self.signal_columns, *self.signal_window_keys, ROW_KEY}
        """Batch keys of the signals' columns (and the rows' identity): never model inputs."""

    @property
    def token_metric_prefixes(self) -> tuple[str, ...]:
        """The name prefixes of this run's token-aware metrics: the trainer's and its signals' (what ``tokenweave
        plot`` shows as token metrics)."""
        prefixes = [*self.trainer_metric_prefixes,
                    *(prefix for signal in self.signals.values() for prefix in signal.metric_prefixes)]
        return tuple(dict.fromkeys(prefixes))

    # -- data (SFT, DPO) -------------------------------------------------------------------------------------------

    def prepare_signal_columns(self, dataset, tokenizer, args, dataset_name: str):
        """After TRL's tokenisation: each signal's ``prepare_dataset``, then every declared column checked against
        the completion tokens (one value each; :func:`~tokenweave.data.token_columns.check_token_columns`), and each
        row's identity when the random control is on."""
        from datasets import Dataset

        from ..data.token_columns import check_token_columns

        for signal in active_signal_classes(args):
            dataset = signal.prepare_dataset(dataset, tokenizer, args, dataset_name)
        columns = signal_dataset_columns(args)
        map_kwargs = {"with_indices": True}
        if isinstance(dataset, Dataset):  # checked now, before training (an IterableDataset: as it is read)
            map_kwargs |= {"num_proc": args.dataset_num_proc, "desc": f"Checking the token columns of {dataset_name}"}
        if columns:
            dataset = dataset.map(check_token_columns, fn_kwargs={
                "columns": columns, "kind": self.trainer_kind, "dataset_name": dataset_name}, **map_kwargs)
        if uses_row_identity(args):
            dataset = dataset.map(lambda example, index: {ROW_KEY: index}, **map_kwargs)
        return dataset

    def signal_dataset_column_names(self) -> list[str]:
        """The dataset columns the signals read (to keep when ``remove_unused_columns`` drops the others)."""
        names = [name for names in signal_dataset_columns(self.args).values() for name in names]
        return names + ([ROW_KEY] if uses_row_identity(self.args) else [])

    def batch_columns(self, inputs: dict[str, Any], shift: int) -> dict[str, Tensor]:
        """The signals' collated columns of a batch, as ``TokenBatch.columns`` (shifted by ``shift`` positions like
        TRL's per-token log-probs); a ``KeyError`` naming a column a custom collator left out."""
        missing = [key for key in self.signal_columns if key not in inputs]
        if missing:
            raise KeyError(f"The batch has no {missing}: a custom data collator must add the token signals' columns, "
                           "like tokenweave.trainers.collators.TokenColumnsCollator.")
        columns = {key: inputs[key][:, shift:] for key in self.signal_columns}
        return columns | {key: inputs[key][:, shift:] for key in self.signal_window_keys if key in inputs}

    # -- the loss inputs -------------------------------------------------------------------------------------------

    def signal_token_inputs(self, batch: TokenBatch) -> tuple[Tensor | None, dict[str, Any]]:
        """``(token weights [R, T] or None, the other loss inputs)`` of the signals for one micro-batch (module
        docstring): the weights of the signals multiplied, 0 outside the loss's tokens. Every process calls it (the
        finiteness check, of the values at the loss's tokens, is a collective)."""
        weights, inputs = [], {}
        for name, signal in self.signals.items():
            given = dict(signal.token_inputs(batch))
            for key, value in given.items():  # a per-token input counts at the tokens of the loss only
                aligned = isinstance(value, Tensor) and value.shape == batch.mask.shape
                self.check_signal_output(name, key, value[batch.mask.bool()] if aligned else value)
            scores = given.pop("token_scores", None)
            if "token_weights" in given:
                signal_weights = given.pop("token_weights")
                if signal.weighs_tokens:
                    signal_weights = self.signal_control(signal_weights, batch.mask, batch.row_keys, scores)
                weights.append(torch.where(batch.mask.bool(), signal_weights, 0.0).to(batch.logps.dtype))
            if "token_loss" in given and "token_loss" in inputs:  # per-token loss terms of several signals add up
                given["token_loss"] = inputs["token_loss"] + given["token_loss"]
            inputs.update(given)
        return (functools.reduce(operator.mul, weights) if weights else None), inputs

    def check_signal_output(self, name: str, key: str, value: Any) -> None:
        """A NaN or infinity in what signal ``name`` returned stops the run (a collective: every process checks)."""
        if isinstance(value, Tensor) and value.is_floating_point() and any_non_finite(self, value):
            raise NonFiniteError(f"The token signal {name!r} returned a NaN or infinity in {key!r} at step "
                                 f"{logged_step(self)}: stopped before training on it.")

    def signal_control(self, weights: Tensor, mask: Tensor, row_keys: Tensor | None,
                       scores: Tensor | None = None) -> Tensor:
        """The random control of a signal's token weights ``[R, T]`` (``signal_control``): 'shuffle', each row's
        weights permuted over its ``mask`` tokens (:func:`~tokenweave.tokens.controls.shuffle_within_mask`); 'inverse',
        the same count of tokens taken from the other end of ``scores``
        (:func:`~tokenweave.tokens.controls.inverse_selection`); 'full', every weight 1 (the full-token baseline);
        'none': ``weights``."""
        control = getattr(self.args, "signal_control", "none")
        if control == "none":
            return weights
        if control == "full":
            return torch.ones_like(weights)
        if control == "inverse":
            if scores is None:
                raise ValueError("signal_control 'inverse' needs the selection's ranking: its signal returns no "
                                 "'token_scores'.")
            return inverse_selection(weights, scores, mask)
        seed = self.args.seed if self.args.signal_control_seed is None else self.args.signal_control_seed
        rows = [shuffle_within_mask(weights[i : i + 1].detach().cpu(), mask[i : i + 1].cpu(),
                                    row_generator(seed, *row_keys[i].tolist()))
                for i in range(weights.size(0))]
        return torch.cat(rows).to(weights.device)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _save_rng_state(self, output_dir: str) -> None:
        """Trainer's RNG state, the signals' states (:data:`SIGNAL_STATE_FILE`) and the history model
        (:data:`FROZEN_STATE_FILE`): what a resumed run needs to continue as this one (the main process writes; the
        states are the same on every process)."""
        super()._save_rng_state(output_dir)
        states = {name: signal.state_dict() for name, signal in self.signals.items()}
        if any(states.values()) and self.args.should_save:
            torch.save(states, os.path.join(output_dir, SIGNAL_STATE_FILE))
        frozen = self.frozen_models.state_dict() if self.frozen_models is not None else {}  # a collective
        if frozen and self.args.should_save:
            torch.save(frozen, os.path.join(output_dir, FROZEN_STATE_FILE))

    def _save_checkpoint(self, model, trial) -> None:
        """TRL's checkpoint, with the run's token-metric prefixes (:data:`TOKEN_METRICS_FILE`, also with
        ``save_only_model``)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            checkpoint = os.path.join(self._get_output_dir(trial=trial), name)
            with open(os.path.join(checkpoint, TOKEN_METRICS_FILE), "w") as file:
                json.dump(list(self.token_metric_prefixes), file)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Trainer's RNG state, and the signals' and the history model's states saved with it (on resume, before
        the first step)."""
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SIGNAL_STATE_FILE)
        if self.signals and os.path.isfile(path):
            for name, state in torch.load(path, map_location="cpu", weights_only=True).items():
                if name in self.signals:
                    self.signals[name].load_state_dict(state)
        path = os.path.join(checkpoint, FROZEN_STATE_FILE)
        if self.frozen_models is not None and os.path.isfile(path):
            self.frozen_models.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
