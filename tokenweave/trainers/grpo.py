"""TokenGRPOTrainer: TRL's GRPOTrainer with the registered policy losses (grpo, dapo, cispo, gspo, hapo, ...) and the
token-signal components (HAPO, ...) picked in the config.

With ``policy_loss`` unset the trainer is TRL's ``GRPOTrainer``, ``loss_type`` and all (a token signal may still
replace the advantages after generation). With ``policy_loss`` set, ``_compute_loss`` takes TRL's per-token log-probs
and entropies, hands them to the registered loss (:mod:`tokenweave.losses.policy`) with TRL's per-token factors
(top-entropy mask, off-policy mask, vLLM importance ratios), the ``token_weights_column`` signal and the token
signals' loss inputs, adds TRL's ``beta`` KL term, and aggregates with ``loss_agg_mode`` and TRL's normalisers
(``losses.policy.trl_aggregate_loss``). The returned loss is already scaled for gradient accumulation
(``loss_is_scaled_for_ga = True``, as TRL's).

Token signals (:mod:`.signals`: the interface; :mod:`.host`: what every trainer does for them; :mod:`.rollout`:
GRPO's rollout hooks) enter at these TRL hooks, and only the signals that are on are called::

    TRL hook                          the trainer                               each signal that is on
    __init__                          the host, around TRL's                     init_context (HAPO's vLLM engine)
    _generate_single_turn             TRL's generation, wrapped                 sample(generate, training)
    _generate_and_score_completions   keeps π_old's entropies out of TRL's       needs_generation_entropies,
                                      old-log-prob forward when a signal asks;  after_generation: batch columns
                                      each row's identity for the random
                                      control (signal_row_keys)
    _compute_loss                     registry loss, token weights, KL,          token_inputs: the loss's inputs
                                      aggregation, metrics
    _save_rng_state / _load_rng_state the host: token_signals.pt,                state_dict / load_state_dict
                                      frozen_models.pt
"""

from __future__ import annotations

import functools
import json
import operator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from trl import GRPOConfig, GRPOTrainer

from ..checks import ConfigError, Range, check_options
from ..losses.policy import (
    LOSS_AGG_MODES,
    POLICY_LOSS_DEFAULTS,
    PolicyLossConfig,
    get_policy_loss,
    importance_ratio,
    nan_extreme,
    trl_aggregate_loss,
)
from ..tokens.quantile import quantile
from .attention import AttentionCreditConfig
from .card import ModelCardMixin
from .checkpointing import CheckpointingMixin
from .finite import FiniteTrainingMixin
from .frozen import FrozenForwards, FrozenModelsConfig
from .hapo import HapoConfig
from .host import SignalHostMixin, uses_row_identity
from .rank import RankGrpoConfig
from .rlsd import RlsdConfig
from .rollout import ROW_KEYS, Generation, gather_values, loss_sees_generation_batch
from .signals import TokenBatch, TokenSignalConfig, active_signal_classes, resolve_token_signals

# Batch keys that ``_get_per_token_logps_and_entropies`` takes besides the token ids (multimodal inputs).
_MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
_ENTROPY_QUANTILES = (0.2, 0.5, 0.8)



TRL_EPSILON = GRPOConfig.__dataclass_fields__["epsilon"].default  # TRL's lower clip range, 0.2

@dataclass
class TokenGRPOConfig(RlsdConfig, AttentionCreditConfig, RankGrpoConfig, HapoConfig, TokenSignalConfig,
                      FrozenModelsConfig, GRPOConfig):
    """TRL's ``GRPOConfig`` plus a policy-loss registry and token signals (each signal's fields come from its config
    mixin: :class:`~tokenweave.trainers.hapo.HapoConfig`, :class:`~tokenweave.trainers.rank.RankGrpoConfig`,
    :class:`~tokenweave.trainers.attention.AttentionCreditConfig`).

    ``policy_loss`` unset: TRL's ``loss_type`` path, unchanged (only a signal's advantages, e.g.
    ``hapo_token_advantage``, may be used with it). ``policy_loss`` set: TRL's clip fields are the loss's
    (``epsilon`` → ε_lo, ``epsilon_high`` → ε_hi or, for cispo, ε_max; ``delta``; ``importance_sampling_level``),
    and the loss's registered defaults (``losses.policy.PolicyLossDefaults``) fill ``loss_agg_mode``, ``epsilon`` and
    ``epsilon_high`` when unset, fix ``importance_sampling_level`` where the loss does, and set ``loss_type`` to the
    TRL loss it extends. ``token_signals`` after ``__post_init__``: the signals that
    are on, in the order they run: first those implied by other fields (``policy_loss: hapo`` implies hapo,
    ``policy_loss: rank_grpo`` rank_grpo: the signals that set the advantages), then those listed, in order.
    """

    trainer_kind: ClassVar[str] = "grpo"

    option_ranges: ClassVar[dict] = {"dual_clip_c": Range(1, low_open=True)}

    policy_loss: str | None = field(
        default=None,
        metadata={
            "help": "A policy loss registered in tokenweave.losses.policy: grpo, dapo, cispo, gspo, hapo, rank_grpo, any "
            "registered with @register_policy_loss, or 'package.module:function' (your own). None: TRL's `loss_type`, "
            "unchanged."
        },
    )
    policy_loss_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the policy loss, for a loss with hyperparameters of its own (a mapping in "
            "YAML, JSON on the command line): policy_loss(..., **policy_loss_kwargs)."
        },
    )
    loss_agg_mode: str | None = field(
        default=None,
        metadata={
            "help": f"How the per-token loss is reduced, one of {list(LOSS_AGG_MODES)}. None: the loss's own "
            "(grpo, gspo: seq-mean-token-mean; dapo, cispo, hapo: token-mean). token-mean divides by the generation "
            "batch's active tokens (TRL's dapo normaliser), so the update does not depend on the split into "
            "micro-batches, accumulation steps and processes."
        },
    )
    token_weights_column: str | None = field(
        default=None,
        metadata={
            "help": "Name of a [B, T] batch tensor (aligned to completion tokens) of per-token weights that multiply "
            "the policy loss, e.g. a signal added to the batch by a subclass's _generate_and_score_completions."
        },
    )
    epsilon: float | None = field(
        default=None,
        metadata={"help": f"TRL's lower clip range ε: the ratio is clipped at 1 − ε. None: the policy loss's registered "
                          f"default (rank_grpo: 0.06), else TRL's {TRL_EPSILON}."},
    )
    dual_clip_c: float | None = field(
        default=None,
        metadata={
            "help": "Dual clip (arXiv 1912.09729) of the clipped losses: for A < 0 the loss is capped at -A·c. "
            "HAPO's recipes: 10. None: off.",
        },
    )

    def __post_init__(self):
        check_options(self)  # types, choices and ranges, before TRL's own __post_init__ divides by batch sizes
        if self.epsilon is None:  # before TRL reads it
            registered = POLICY_LOSS_DEFAULTS[self.policy_loss] if self.policy_loss and get_policy_loss(
                self.policy_loss) else None
            self.epsilon = registered.epsilon if registered and registered.epsilon is not None else TRL_EPSILON
        super().__post_init__()
        self.resolve_frozen_models()
        if self.reference_model_path is not None and self.beta != 0.0:
            raise ValueError("reference_model_path with beta > 0: TRL's KL term keeps its own reference (the "
                             "policy's initial weights), which the token signals then read too; set one of them.")
        if isinstance(self.policy_loss_kwargs, str):  # the command line's JSON
            self.policy_loss_kwargs = json.loads(self.policy_loss_kwargs)
        if self.policy_loss is None:
            needs_loss = ("loss_agg_mode", "token_weights_column", "dual_clip_c", "policy_loss_kwargs")
            given = [name for name in needs_loss if getattr(self, name) not in (None, False)]
            if given:
                raise ValueError(f"{given} need a policy_loss (TRL's loss_type path does not read them).")
        else:
            get_policy_loss(self.policy_loss)  # a ValueError naming the registered losses
            defaults = POLICY_LOSS_DEFAULTS[self.policy_loss]
            if self.loss_agg_mode is None:
                self.loss_agg_mode = defaults.loss_agg_mode
            if self.loss_agg_mode not in LOSS_AGG_MODES:
                raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; expected one of {LOSS_AGG_MODES}")
            if self.epsilon_high is None:
                self.epsilon_high = defaults.epsilon_high
            self.importance_sampling_level = defaults.importance_sampling_level or self.importance_sampling_level
            self.loss_type = defaults.trl_loss_type or self.loss_type
        resolve_token_signals(self)
        weighing = [signal.name for signal in active_signal_classes(self) if "token_weights" in signal.provides]
        if self.policy_loss is None and weighing:
            raise ConfigError(f"token_signals {weighing} weigh the per-token loss: they need a policy_loss (TRL's "
                              "loss_type path takes no token weights).")
        if self.policy_loss is not None:
            self.policy_loss_config()  # validates the loss's fields

    def policy_loss_config(self) -> PolicyLossConfig:
        """The :class:`PolicyLossConfig` of ``policy_loss``, TRL's clip fields mapped as TRL uses them."""
        epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return PolicyLossConfig(
            epsilon_low=self.epsilon,
            epsilon_high=epsilon_high,
            dual_clip_c=self.dual_clip_c,
            delta=self.delta,
            importance_sampling_level=self.importance_sampling_level,
            cispo_epsilon_max=epsilon_high,
            **self.hapo_loss_options(),
        )


class TokenGRPOTrainer(SignalHostMixin, FiniteTrainingMixin, ModelCardMixin, CheckpointingMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the policy losses and token signals of :class:`TokenGRPOConfig` (module docstring).

    Given a plain ``GRPOConfig`` it is TRL's trainer. ``signals``: the token signals that are on, by name. Metrics
    added to TRL's, per logging step: ``entropy/q20``, ``entropy/q50``, ``entropy/q80`` (token-entropy quantiles
    over all processes), the loss's metrics (clip ratios, ``hapo/redistributed_frac``, ...: local token fractions
    averaged over processes; ``*_min`` / ``*_max``: NaN-ignoring min / max over processes, as TRL) and the signals'.
    """

    loss_is_scaled_for_ga = True  # as GRPOTrainer: _compute_loss divides by the accumulation steps itself
    trainer_kind = "grpo"
    _args_position = 2
    trainer_metric_prefixes = ("entropy/q", "clip_ratio/", "entropy_signal/", "rewards/non_finite")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.args if isinstance(self.args, TokenGRPOConfig) else None
        self.policy_loss_fn = get_policy_loss(options.policy_loss) if options and options.policy_loss else None
        self.policy_loss_config = options.policy_loss_config() if self.policy_loss_fn else None
        self._captured_entropies: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see rollout.Generation
        self._eval_generations = 0  # evaluation batches generated (generation_row_keys)
        self.rewards_per_func: torch.Tensor | None = None  # the last rewards, gathered over processes [N, F]

    # -- generation ----------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (gathered over processes), ±inf made NaN ("no reward from this function", TRL's rule for
        None) and counted in ``rewards/non_finite`` (``trainers.finite``); kept for the signals
        (``Generation.rewards_per_func``)."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        infinite = torch.isinf(rewards)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rewards/non_finite"].append(float(infinite.sum().item()))
        self.rewards_per_func = rewards.masked_fill(infinite, float("nan"))
        return self.rewards_per_func

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation, through each signal's ``sample`` (the last one outermost)."""
        generate = functools.partial(
            super()._generate_single_turn, prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        for signal in self.signals.values():
            generate = functools.partial(signal.sample, generate, self.model.training)
        return generate()

    def _generate_and_score_completions(self, inputs):
        """TRL's generation batch, with each row's identity when the random control is on, and the columns each
        signal adds after it, in order."""
        if not self.signals:
            return super()._generate_and_score_completions(inputs)
        training = self.model.training
        needs_entropies = any(signal.needs_generation_entropies(training) for signal in self.signals.values())
        self._captured_entropies = [] if needs_entropies else None
        try:
            output = super()._generate_and_score_completions(inputs)
            captured = self._captured_entropies or []
        finally:
            self._captured_entropies = None
        if uses_row_identity(self.args):
            output[ROW_KEYS] = self.generation_row_keys(output["completion_ids"].size(0))
        for name, signal in self.signals.items():
            columns = signal.after_generation(Generation(self, output, training, captured, inputs))
            for column, value in columns.items():  # collective: every process checks each column
                self.check_signal_output(name, column, value)
            output.update(columns)
        return output

    def generation_row_keys(self, rows: int) -> torch.Tensor:
        """``[rows, 4]``, the identity of this process's completions for the random control: (0 in training, 1 in
        evaluation; the optimizer step; in training the micro-step within its accumulation window, in evaluation the
        evaluation batch's index; the row's index in the generation batch over all processes). A resumed run, whose
        micro-step count starts again at a window's first, gives its generations the keys the run it resumes gave
        them."""
        if self.model.training:
            phase, batch = 0, self._step % self.current_gradient_accumulation_steps
        else:
            phase, batch = 1, self._eval_generations
            self._eval_generations += 1
        first = self.accelerator.process_index * rows
        indices = torch.arange(first, first + rows, device=self.accelerator.device)
        return torch.stack([torch.full_like(indices, value) for value in (phase, self.state.global_step, batch)]
                           + [indices], dim=1)

    def _get_per_token_logps_and_entropies(self, model, *args, compute_entropy=False, **kwargs):
        """TRL's; while ``_generate_and_score_completions`` collects entropies (a signal asked), the policy's
        forwards (TRL's old log-probs) also compute them, recorded with their log-probs for
        ``Generation.old_policy_entropies``."""
        if self._captured_entropies is None or model is not self.model:
            return super()._get_per_token_logps_and_entropies(model, *args, compute_entropy=compute_entropy, **kwargs)
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, *args, compute_entropy=True, **kwargs
        )
        self._captured_entropies.append((logps, entropies))
        return logps, entropies if compute_entropy else None, aux_loss

    def completion_logps_and_entropies(self, model, batch: dict, **kwargs):
        """TRL's ``_get_per_token_logps_and_entropies`` on a batch's prompts and completions (multimodal inputs
        included): ``(logps [B, T], entropies [B, T] or None, aux_loss or None)``; ``kwargs`` as TRL's."""
        completion_ids = batch["completion_ids"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([batch["prompt_ids"], completion_ids], dim=1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            completion_ids.size(1),
            **kwargs,
            **{key: batch.get(key) for key in _MODEL_INPUT_KEYS},
        )

    @torch.no_grad()
    def signal_values(self, inputs: dict) -> dict[str, torch.Tensor]:
        """For a generation batch (``_generate_and_score_completions``'s output), each completion token's
        ``advantages`` as the loss gets them (``[B, T]``, a signal's per-token advantages included) and the
        per-token inputs of the policy loss (``token_weights``: the product of every per-token factor, TRL's and the
        token signals', the random control applied; ``entropy_signal``, ...), from one forward of the model without
        gradient; 0 outside the completion tokens: what the heatmap shows (``tokenweave grpo-heatmap``). In
        evaluation mode, the random control's permutations are those of an evaluation batch."""
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        logps, entropies, _ = self.completion_logps_and_entropies(self.model, inputs, compute_entropy=True)
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps if old_logps is None else old_logps
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        weights, loss_inputs, _ = self._loss_token_inputs(inputs, logps, old_logps, entropies, advantages, mask,
                                                          self.model.training)
        values = {"advantages": advantages.expand(mask.shape).float()}
        if weights is not None:
            values["token_weights"] = weights.float()
        values |= {name: value.float() for name, value in loss_inputs.items()
                   if isinstance(value, torch.Tensor) and value.shape == mask.shape and value.is_floating_point()}
        return {name: value * mask for name, value in values.items()}

    # -- loss ----------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """The registered policy loss on TRL's per-token log-probs; TRL's ``_compute_loss`` without ``policy_loss``."""
        if self.policy_loss_fn is None:
            return super()._compute_loss(model, inputs)
        training = self.model.training
        mode = "train" if training else "eval"
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        logps, entropies, aux_loss = self.completion_logps_and_entropies(
            model, inputs, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
        )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        # None when TRL knows the batch is on-policy (see GRPOTrainer._generate_and_score_completions)
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps

        token_weights, loss_kwargs, entropy_mask = self._loss_token_inputs(inputs, logps, old_logps, entropies,
                                                                           advantages, mask, training)
        per_token_loss, loss_metrics = self.policy_loss_fn(
            logps, old_logps, advantages, mask, self.policy_loss_config, token_weights=token_weights, entropy=entropies,
            **loss_kwargs, **(self.args.policy_loss_kwargs or {}),
        )
        per_token_kl = None
        if self.beta != 0.0:  # TRL's k3 estimate of KL(π_θ ‖ π_ref), importance-corrected by default
            ref_logps = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
            if self.args.use_bias_correction_kl:
                level = self.policy_loss_config.importance_sampling_level
                per_token_kl = per_token_kl * importance_ratio(logps, old_logps, mask, level)
            per_token_loss = per_token_loss + self.beta * per_token_kl

        accumulation_steps = self.current_gradient_accumulation_steps if training else 1
        loss = trl_aggregate_loss(
            per_token_loss, mask, self.args.loss_agg_mode, inputs["num_items_in_batch"], self.accelerator.num_processes,
            accumulation_steps, self.args.steps_per_generation if training else 1, self.max_completion_length,
        )
        if self._entropy_bonus_enabled:
            policy_loss = loss.detach() * (1 if self.args.loss_agg_mode == "token-mean" else accumulation_steps)
            loss = self._with_entropy_bonus(loss, policy_loss, entropies, mask, entropy_mask, mode, accumulation_steps)
        if self.aux_loss_enabled:  # MoE load balancing, as TRL
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_loss_metrics(mode, entropies, mask, per_token_kl, loss_metrics)
        return loss

    def _loss_token_inputs(self, inputs, logps, old_logps, entropies, advantages, mask, training):
        """``(token weights or None, the signals' other loss inputs, TRL's entropy mask or None)``: the product of
        every per-token factor on the policy loss (:meth:`_token_weights`'s and the token signals')."""
        # "Beyond the 80/20 rule": only the top-entropy tokens (TRL's entropy_mask)
        entropy_mask = (self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
                        if self.top_entropy_quantile < 1.0 else None)
        weights = self._token_weights(inputs, logps, old_logps, advantages, mask, entropy_mask)
        batch = self._token_batch(inputs, logps, old_logps, entropies, mask, training)
        signal_weights, loss_kwargs = self.signal_token_inputs(batch)
        if signal_weights is not None:
            weights.append(signal_weights)
        token_weights = functools.reduce(operator.mul, (w.to(logps.dtype) for w in weights)) if weights else None
        return token_weights, loss_kwargs, entropy_mask

    def _token_batch(self, inputs, logps, old_logps, entropies, mask, training) -> TokenBatch:
        """The micro-batch as the signals see it: the completion tokens, the batch's ``[B, T]`` columns, the frozen
        models' log-probs of the completions (the reference's as TRL computed them for its KL term, with ``beta`` >
        0: ``ref_per_token_logps``)."""
        columns = {key: value for key, value in inputs.items()
                   if isinstance(value, torch.Tensor) and value.shape == mask.shape}
        known = {"reference": inputs["ref_per_token_logps"]} if self.beta != 0.0 else {}  # TRL's, with its KL
        frozen = FrozenForwards(self.frozen_models, lambda frozen_model: self.completion_logps_and_entropies(
            frozen_model, inputs)[0], known)
        return TokenBatch("grpo", logps, mask, entropies, old_logps, columns, frozen, training,
                          loss_sees_generation_batch(inputs, training, self.args.steps_per_generation),
                          row_keys=inputs.get(ROW_KEYS))

    def _with_entropy_bonus(self, loss, policy_loss, entropies, mask, entropy_mask, mode, accumulation_steps):
        """TRL's entropy bonus (``entropy_coef``; ``use_adaptive_entropy``, arXiv 2505.22312), mirrored from the end
        of ``GRPOTrainer._compute_loss`` (TRL 1.16) so that it applies to every registered policy loss:

            loss − c · H,   H = Σ entropies · m / max(Σ m, 1) / accumulation_steps,   m = mask · entropy_mask

        H does not depend on the loss's aggregation. Adaptive: c is the coefficient of the previous optimizer step,
        applied only while the window-global entropy of that step was <= ``entropy_target``; at each optimizer step
        c moves by ``entropy_coef_delta`` (up when the window's entropy over all processes is <= the target, else
        down) within [``entropy_coef_min``, ``entropy_coef_max``]. TRL saves and restores c with the checkpoint.
        Logs ``policy_loss`` (the loss before the bonus, as TRL's for the same aggregation) and ``entropy_coef``."""
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_steps
        if self.use_adaptive_entropy:
            coefficient = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            coefficient = self.entropy_coef
        loss = loss - coefficient * entropy_loss
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
            window = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            self._entropy_window_stats = window
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(window, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                step = self.args.entropy_coef_delta
                self.entropy_coef = (min(self.entropy_coef + step, self.args.entropy_coef_max)
                                     if world_entropy <= self.args.entropy_target
                                     else max(self.entropy_coef - step, self.args.entropy_coef_min))
                self._last_world_entropy, self._entropy_window_stats = world_entropy, None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return loss

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """TRL's top-entropy mask (``top_entropy_quantile``; "Beyond the 80/20 rule"), mirrored from
        ``GRPOTrainer.get_high_entropy_mask`` (TRL 1.16) with :func:`~tokenweave.tokens.quantile.quantile` in place of
        ``torch.quantile``, which refuses the more than 2^24 tokens a generation batch gathered over processes can
        hold: the masked tokens whose entropy is at least the ``threshold``-quantile of the masked tokens' entropies
        over all processes. TRL's ``_compute_loss`` (``policy_loss`` unset) calls it too."""
        token_entropies = gather_values(self.accelerator, entropies.detach()[mask.bool()].float())
        if token_entropies.numel() == 0:
            return torch.zeros_like(entropies, dtype=torch.bool)
        entropy_threshold = quantile(token_entropies, threshold)
        return ((entropies * mask.float()) >= entropy_threshold) & mask.bool()

    def _token_weights(self, inputs, logps, old_logps, advantages, mask, entropy_mask) -> list[torch.Tensor]:
        """TRL's per-token factors (``entropy_mask`` among them) and the ``token_weights_column`` signal (their
        product multiplies the loss)."""
        weights = [] if entropy_mask is None else [entropy_mask]
        if self.off_policy_mask_threshold is not None:  # DeepSeek-V3.2 off-policy sequence mask
            sampling_logps = inputs.get("sampling_per_token_logps", old_logps)
            weights.append(
                self.get_off_policy_mask(advantages, logps, sampling_logps, mask, self.off_policy_mask_threshold)
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        if self.args.token_weights_column is not None:
            if self.args.token_weights_column not in inputs:
                raise KeyError(
                    f"token_weights_column {self.args.token_weights_column!r} is not in the batch: add a [B, T] tensor "
                    "aligned to the completion tokens (e.g. a token signal's after_generation)."
                )
            weights.append(inputs[self.args.token_weights_column])
        return weights

    # -- metrics -------------------------------------------------------------------------------------------------

    def _global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of ``values`` over the masked tokens of all processes (TRL's ``global_masked_mean``)."""
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum().float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(self, mode, entropies, mask, per_token_kl, loss_metrics) -> None:
        metrics = self._metrics[mode]
        metrics["entropy"].append(self._global_masked_mean(entropies.detach(), mask))
        token_entropies = gather_values(self.accelerator, entropies.detach()[mask.bool()].float())
        if token_entropies.numel():
            quantiles = quantile(token_entropies, _ENTROPY_QUANTILES)
            for q, value in zip(_ENTROPY_QUANTILES, quantiles.tolist(), strict=True):
                metrics[f"entropy/q{round(q * 100)}"].append(value)
        if per_token_kl is not None:
            metrics["kl"].append(self._global_masked_mean(per_token_kl.detach(), mask))
        if loss_metrics:  # one gather for all: means over processes, or TRL's nanmin / nanmax for *_min / *_max
            names = list(loss_metrics)
            gathered = self.accelerator.gather(torch.stack([loss_metrics[name].float() for name in names]).unsqueeze(0))
            values = gathered.mean(0)
            for i, name in enumerate(names):
                if name.endswith(("_min", "_max")):
                    values[i] = nan_extreme(gathered[:, i], largest=name.endswith("_max"))
            for name, value in zip(names, values.tolist(), strict=True):
                metrics[name].append(value)
