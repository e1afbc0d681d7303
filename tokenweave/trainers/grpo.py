"""TokenGRPOTrainer: TRL's GRPOTrainer with the registered policy losses (grpo, dapo, cispo, gspo, hapo, ...) and HAPO.

With ``policy_loss`` unset the trainer is TRL's ``GRPOTrainer``, ``loss_type`` and all. With ``policy_loss`` set,
``_compute_loss`` takes TRL's per-token log-probs and entropies, hands them to the registered loss
(:mod:`tokenweave.losses.policy`) with TRL's per-token factors (top-entropy mask, off-policy mask, vLLM importance
ratios) and the ``token_weights_column`` signal multiplied into ``token_weights``, adds TRL's ``beta`` KL term, and
aggregates with ``loss_agg_mode`` and TRL's normalisers. The returned loss is already scaled for gradient
accumulation (``loss_is_scaled_for_ga = True``, as TRL's).

HAPO (Liu et al. 2025, arXiv 2509.16591) enters TRL at these places, each part switched on its own::

    part (paper section)              TRL hook                                  computed by
    entropy statistics (3.0)          _generate_and_score_completions (or       tokens.entropy.entropy_stats
                                      _compute_loss, see below): token
                                      entropies of the generation batch under
                                      the policy that sampled it, gathered
                                      over all processes
    adaptive temperature (3.1)        _generate_single_turn: a logits           tokens.entropy.
                                      processor given to model.generate, with   AdaptiveTemperatureLogitsProcessor
                                      the previous generation's statistics
    token-level group advantage (3.2) _generate_and_score_completions:          tokens.advantage.
                                      [B, T] advantages from the gathered       token_group_advantage_values
                                      rewards and completion lengths
    advantage redistribution (3.3)    _compute_loss → policy loss "hapo"        tokens.advantage.redistribute_advantage
    adaptive clipping (3.4)           _compute_loss → policy loss "hapo"        losses.policy.adaptive_clip_bounds

Entropy statistics. The generation batch's token entropies are those of π_old, the policy that sampled it, from
whichever forward already sees them: TRL's old-log-prob forward when TRL runs one (off-policy); the loss's own forward
when TRL runs none and each process's generation batch is one micro-batch (``steps_per_generation`` 1: the loss's
policy is then π_old); otherwise one extra no-grad forward at generation. Their statistics over the whole
generation batch (all processes) serve twice, as in HAPO's released code: the NEXT generation samples with them (HAPO: the previous step's
old-log-prob entropies over the whole batch), and, with ``hapo_entropy_stats: generation_batch`` (the default), they
give the loss's ĥ as the batch column ``entropy_signal``, so ĥ, and with it the update, does not depend on how the
batch is split into micro-batches, accumulation steps and processes. ``hapo_entropy_stats: micro_batch`` is the
released code's loss instead: ĥ from the current policy's entropies with each micro-batch's own statistics.

Temperatures. TRL's fused LM head bakes ``temperature`` (T_base) in at ``__init__``: old, current and reference
log-probs and the entropies are all computed at T_base. Adaptive sampling draws token t at
``T_t = T_base·(1 + τ·ĥ_t)`` (within ``T_base·[1 − τ, 1 + τ]``), so the behaviour policy differs slightly from π_old
at T_base, while the ratio π_θ/π_old stays at T_base: exactly HAPO's released code (verl recomputes the old
log-probs at T = 1 and ignores the mismatch). The sampler measures each step's entropy at T_base too, the
temperature of the statistics it is compared with. The first generation, with no statistics yet, samples at T_base.
"""

from __future__ import annotations

import copy
import functools
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ..losses.policy import (
    LOSS_AGG_MODES,
    POLICY_LOSS_AGG_MODES,
    PolicyLossConfig,
    aggregate_loss,
    get_policy_loss,
    importance_ratio,
)
from ..tokens.advantage import token_group_advantage_values
from ..tokens.entropy import AdaptiveTemperatureLogitsProcessor, EntropyStats, entropy_stats

# Upper clip range of a loss when ``epsilon_high`` is unset: DAPO's clip-higher (HAPO builds on the DAPO recipe;
# its released scripts use 0.2), and CISPO's absolute cap ε_max on the IS weight (ScaleRL). Others: ``epsilon``.
EPSILON_HIGH_DEFAULTS = {"dapo": 0.28, "hapo": 0.28, "cispo": 5.0}
# The TRL ``loss_type`` that computes the same loss (HAPO with its parts off is DAPO); ``loss_type`` is set to it so
# that TRL's own checks of ``loss_type`` agree with the loss that runs.
TRL_LOSS_TYPES = {"grpo": "grpo", "gspo": "grpo", "dapo": "dapo", "cispo": "cispo", "hapo": "dapo"}
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
# Marks padding when per-token values of different lengths are gathered across processes (entropies are >= 0).
_GATHER_PAD = -1e9
_ENTROPY_QUANTILES = (0.2, 0.5, 0.8)
# HAPO's parts; unset (None), each is on for ``policy_loss: hapo`` and off otherwise.
HAPO_SWITCHES = ("hapo_adaptive_temperature", "hapo_token_advantage", "hapo_adaptive_advantage", "hapo_adaptive_clip")
HAPO_ENTROPY_STATS = ("generation_batch", "micro_batch")


@dataclass
class TokenGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus a policy-loss registry and HAPO's parts.

    ``policy_loss`` unset: TRL's ``loss_type`` path, unchanged (only ``hapo_token_advantage`` may be used with it).
    ``policy_loss`` set: TRL's clip fields are the loss's (``epsilon`` → ε_lo, ``epsilon_high`` → ε_hi or, for
    cispo, ε_max; ``delta``; ``importance_sampling_level``), ``loss_type`` is set to the TRL loss it extends, and
    a HAPO switch left unset is on for ``policy_loss: hapo`` and off otherwise.
    """

    policy_loss: str | None = field(
        default=None,
        metadata={
            "help": "A policy loss registered in tokenweave.losses.policy: grpo, dapo, cispo, gspo, hapo, or any "
            "registered with @register_policy_loss. None: TRL's `loss_type`, unchanged."
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
    hapo_adaptive_temperature: bool | None = field(
        default=None,
        metadata={
            "help": "HAPO 3.1: sample each token at T·(1 + temperature_tau·ĥ), ĥ from its entropy under the previous "
            "generation batch's statistics. Needs policy_loss; not with vLLM or continuous batching. None: on for hapo."
        },
    )
    temperature_tau: float = field(
        default=0.05, metadata={"help": "HAPO: strength of the adaptive temperature (released recipes: 0.05)."}
    )
    hapo_token_advantage: bool | None = field(
        default=None,
        metadata={
            "help": "HAPO 3.2: token-level group-average advantage (mean and std over the group's tokens; GRPO "
            "fall-back when some |A| >= 5) of the weighted reward sum; replaces TRL's advantage (scale_rewards is "
            "not used). None: on for hapo."
        },
    )
    hapo_adaptive_advantage: bool | None = field(
        default=None,
        metadata={"help": "HAPO 3.3: differential advantage redistribution (hapo loss only). None: on for hapo."},
    )
    adv_beta: float = field(default=1.0, metadata={"help": "HAPO: strength of the advantage redistribution."})
    hapo_adaptive_clip: bool | None = field(
        default=None,
        metadata={"help": "HAPO 3.4: entropy-adaptive asymmetric clip bounds (hapo loss only). None: on for hapo."},
    )
    clip_alpha: float = field(default=1.0, metadata={"help": "HAPO: strength of the adaptive clip bounds."})
    entropy_pivot: float = field(
        default=0.8, metadata={"help": "HAPO: quantile of the token log-entropies that splits high from low entropy."}
    )
    hapo_entropy_stats: str = field(
        default="generation_batch",
        metadata={
            "help": "HAPO: where the loss's ĥ gets its entropies and statistics. 'generation_batch': the entropies "
            "of the policy that sampled the batch, statistics over the whole generation batch (all processes), so "
            "the update is invariant to micro-batching, accumulation and processes. 'micro_batch': the released "
            "code's, the current policy's entropies with each micro-batch's own statistics.",
            "choices": list(HAPO_ENTROPY_STATS),
        },
    )
    hapo_released_sign: bool = field(
        default=False,
        metadata={
            "help": "HAPO: use the released code's entropy signal, non-negative below the pivot (a sign slip), "
            "instead of the paper's (negative below the pivot)."
        },
    )
    dual_clip_c: float | None = field(
        default=None,
        metadata={
            "help": "Dual clip (arXiv 1912.09729) of the clipped losses: for A < 0 the loss is capped at -A·c. "
            "HAPO's recipes: 10. None: off."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.policy_loss is None:
            needs_loss = ("loss_agg_mode", "token_weights_column", "dual_clip_c", "hapo_adaptive_temperature",
                          "hapo_adaptive_advantage", "hapo_adaptive_clip")
            given = [name for name in needs_loss if getattr(self, name) not in (None, False)]
            if given:
                raise ValueError(f"{given} need a policy_loss (TRL's loss_type path does not read them).")
            self.hapo_token_advantage = bool(self.hapo_token_advantage)  # TRL's losses take [B, T] advantages
            return

        get_policy_loss(self.policy_loss)  # a ValueError naming the registered losses
        if self.hapo_entropy_stats not in HAPO_ENTROPY_STATS:
            raise ValueError(f"hapo_entropy_stats must be one of {HAPO_ENTROPY_STATS}, got {self.hapo_entropy_stats!r}")
        is_hapo = self.policy_loss == "hapo"
        for name in HAPO_SWITCHES:
            if getattr(self, name) is None:
                setattr(self, name, is_hapo)
        if not is_hapo and (self.hapo_adaptive_advantage or self.hapo_adaptive_clip):
            raise ValueError("hapo_adaptive_advantage and hapo_adaptive_clip are parts of the hapo policy loss.")
        if self.loss_agg_mode is None:
            self.loss_agg_mode = POLICY_LOSS_AGG_MODES[self.policy_loss]
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; expected one of {LOSS_AGG_MODES}")
        if self.epsilon_high is None:
            self.epsilon_high = EPSILON_HIGH_DEFAULTS.get(self.policy_loss)
        if self.policy_loss == "gspo":
            self.importance_sampling_level = "sequence"
        self.loss_type = TRL_LOSS_TYPES.get(self.policy_loss, self.loss_type)
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError("TRL's entropy bonus (entropy_coef, use_adaptive_entropy) is not supported with "
                             "policy_loss.")
        if self.hapo_token_advantage and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("hapo_token_advantage uses the weighted reward sum: multi_objective_aggregation must be "
                             "'sum_then_normalize'.")
        if self.hapo_adaptive_temperature and (self.use_vllm or self.use_transformers_continuous_batching):
            raise ValueError("hapo_adaptive_temperature samples with transformers' generate (a logits processor): "
                             "not with use_vllm or use_transformers_continuous_batching.")
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
            entropy_pivot=self.entropy_pivot,
            released_sign=self.hapo_released_sign,
            adaptive_clip=self.hapo_adaptive_clip,
            clip_alpha=self.clip_alpha,
            adaptive_advantage=self.hapo_adaptive_advantage,
            adv_beta=self.adv_beta,
        )


class TokenGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the policy losses and HAPO parts of :class:`TokenGRPOConfig` (module docstring).

    Given a plain ``GRPOConfig`` it is TRL's trainer. Metrics added to TRL's, per logging step: ``entropy/q20``,
    ``entropy/q50``, ``entropy/q80`` (token-entropy quantiles over all processes), the loss's metrics (clip ratios,
    with ``_high_entropy`` / ``_low_entropy`` splits, ``hapo/redistributed_frac``, ``entropy_signal/mean``, ...:
    local token fractions averaged over processes) and ``hapo/sampling_temperature`` (mean over sampled tokens).
    """

    loss_is_scaled_for_ga = True  # as GRPOTrainer: _compute_loss divides by the accumulation steps itself

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.args if isinstance(self.args, TokenGRPOConfig) else None
        self.policy_loss_fn = get_policy_loss(options.policy_loss) if options and options.policy_loss else None
        self.policy_loss_config = options.policy_loss_config() if self.policy_loss_fn else None
        self.token_advantage = bool(options and options.hapo_token_advantage)
        self.temperature_processor = None
        if options and options.hapo_adaptive_temperature:
            self.temperature_processor = AdaptiveTemperatureLogitsProcessor(
                None, self.temperature, options.temperature_tau, record_temperatures=True
            )
        config = self.policy_loss_config
        # the hapo loss takes ĥ from the batch column "entropy_signal" (statistics of the whole generation batch)
        self.entropy_signal_from_generation = bool(
            config and options.policy_loss == "hapo" and (config.adaptive_clip or config.adaptive_advantage)
            and options.hapo_entropy_stats == "generation_batch"
        )
        self._captured_entropies: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see _generation_entropies
        self._sampling_temperature_totals = torch.zeros(2, device=self.accelerator.device)  # Σ T, sampled tokens
        self._rewards_per_func: torch.Tensor | None = None  # the last rewards, gathered over processes [N, F]

    # -- generation: adaptive temperature and token-level advantages -----------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (gathered over processes), kept for the token-level advantage."""
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        needs_entropies = self.entropy_signal_from_generation or (training and self.temperature_processor is not None)
        self._captured_entropies = [] if needs_entropies else None
        try:
            output = super()._generate_and_score_completions(inputs)
            captured = self._captured_entropies
        finally:
            self._captured_entropies = None
        if training and self.temperature_processor is not None:
            totals = self.accelerator.reduce(self._sampling_temperature_totals, reduction="sum")
            self._metrics["train"]["hapo/sampling_temperature"].append((totals[0] / totals[1].clamp(min=1)).item())
            self._sampling_temperature_totals.zero_()
        if needs_entropies and not self._loss_sees_generation_batch(output, training):
            stats, signal = self._generation_entropy_signal(output, captured)
            if training and self.temperature_processor is not None:
                self.temperature_processor.stats = stats  # HAPO 3.1: the next generation samples with them
            if self.entropy_signal_from_generation:
                output["entropy_signal"] = signal
        if self.token_advantage:
            output["advantages"] = self._token_group_advantage(output, training)
        return output

    def _get_per_token_logps_and_entropies(self, model, *args, compute_entropy=False, **kwargs):
        """TRL's; while ``_generate_and_score_completions`` collects entropies, the policy's forwards (TRL's old
        log-probs) also compute them, recorded with their log-probs for :meth:`_generation_entropies`."""
        if self._captured_entropies is None or model is not self.model:
            return super()._get_per_token_logps_and_entropies(model, *args, compute_entropy=compute_entropy, **kwargs)
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, *args, compute_entropy=True, **kwargs
        )
        self._captured_entropies.append((logps, entropies))
        return logps, entropies if compute_entropy else None, aux_loss

    def _loss_sees_generation_batch(self, batch: dict, training: bool) -> bool:
        """Whether the loss's own forward gives the generation batch's entropy statistics (no extra forward).

        True when TRL computed no old log-probs (on-policy: the loss's policy is the sampling policy) and each
        process's generation batch is one micro-batch (``steps_per_generation`` 1 in training; evaluation scores a
        generation batch at once): then ``_compute_loss`` computes the statistics from its own entropies.
        """
        return batch.get("old_per_token_logps") is None and (not training or self.args.steps_per_generation == 1)

    def _generation_entropies(self, output: dict, captured: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Token entropies ``[B, T]`` of this process's completions under the policy that sampled them (at T_base).

        From TRL's old-log-prob forward when it ran one (the ``captured`` forward whose log-probs TRL kept as
        ``old_per_token_logps``), else from one no-grad forward.
        """
        old_logps = output.get("old_per_token_logps")
        entropies = next((entropies for logps, entropies in captured if logps is old_logps), None)
        if entropies is not None:
            return entropies
        batch_size = (
            self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        )
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            _, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                output["completion_ids"].size(1),
                batch_size=batch_size,
                compute_entropy=True,
                **{key: output.get(key) for key in _MODEL_INPUT_KEYS},
            )
        return entropies

    def _generation_entropy_signal(self, output: dict, captured=()) -> tuple[EntropyStats, torch.Tensor]:
        """HAPO's statistics of the generation batch (all processes) and ĥ of this process's completions."""
        return self._entropy_statistics(self._generation_entropies(output, captured), output)

    def _entropy_statistics(self, entropies: torch.Tensor, batch: dict) -> tuple[EntropyStats, torch.Tensor]:
        """HAPO's entropy statistics over the valid tokens of ``batch`` on every process (a collective: every process
        calls it), and ĥ ``[B, T]`` of this process's tokens under them (0 at padding)."""
        valid = (batch["completion_mask"] * batch.get("tool_mask", 1)).bool()
        values = self._gather_values(entropies.detach()[valid].float())
        stats = entropy_stats(
            values.unsqueeze(0), torch.ones_like(values).unsqueeze(0), self.args.entropy_pivot,
            self.args.hapo_released_sign,
        )
        return stats, stats.signal(entropies).masked_fill(~valid, 0.0)

    def _token_group_advantage(self, output: dict, training: bool) -> torch.Tensor:
        """HAPO's token-level group advantage ``[B, T]`` of this process's completions (Sec. 3.2).

        A prompt's group may span processes, so the statistics use the rewards and completion lengths of every
        process; TRL's ``Σ_k w_k r_k`` is the reward (NaN where no function scored). The local rows are TRL's slice.
        """
        mask = output["completion_mask"] * output.get("tool_mask", 1)
        weighted = self._rewards_per_func * self.reward_weights.to(self._rewards_per_func.device)
        rewards = weighted.nansum(dim=1).masked_fill(self._rewards_per_func.isnan().all(dim=1), float("nan"))
        lengths = self.accelerator.gather(mask.sum(-1))
        group_size = self.num_generations if training else self.num_generations_eval
        values = token_group_advantage_values(rewards, lengths, group_size=group_size)
        local = values.view(self.accelerator.num_processes, -1)[self.accelerator.process_index]
        return local.unsqueeze(-1) * mask

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation; in training with the adaptive temperature, sampled through HAPO's logits processor."""
        generate = functools.partial(
            super()._generate_single_turn, prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        if self.temperature_processor is None or not self.model.training:
            return generate()
        with self._adaptive_temperature_sampling():
            completion_ids, logprobs = generate()
        temperatures = self.temperature_processor.pop_temperatures()  # [B, decoding steps]
        lengths = torch.tensor([len(ids) for ids in completion_ids], device=temperatures.device)
        sampled = torch.arange(temperatures.size(1), device=temperatures.device) < lengths.unsqueeze(1)
        totals = torch.stack([(temperatures * sampled).sum(), sampled.sum()]).to(self._sampling_temperature_totals)
        self._sampling_temperature_totals += totals
        return completion_ids, logprobs

    @contextmanager
    def _adaptive_temperature_sampling(self):
        """While open, the policy's ``generate`` samples with HAPO's temperature.

        TRL calls ``generate(..., generation_config=self.generation_config)`` and offers no logits-processor hook,
        so ``generate`` is wrapped on the unwrapped model (the object TRL generates with): the processor is passed as
        ``logits_processor`` (transformers runs it after the penalties and before top-k / top-p / min-p) and the
        config's temperature set to 1, since the processor divides by T_base·(1 + τ·ĥ) itself.
        """
        model = self.accelerator.unwrap_model(self.model_wrapped)
        previous = vars(model).get("generate")  # an instance attribute to restore, if the model had one
        generate = model.generate
        processors = LogitsProcessorList([self.temperature_processor])

        def adaptive_generate(*args, generation_config, **kwargs):
            generation_config = copy.deepcopy(generation_config)
            generation_config.temperature = 1.0
            return generate(*args, generation_config=generation_config, logits_processor=processors, **kwargs)

        model.generate = adaptive_generate
        try:
            yield
        finally:
            if previous is None:
                del model.generate
            else:
                model.generate = previous

    # -- loss --------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """The registered policy loss on TRL's per-token log-probs; TRL's ``_compute_loss`` without ``policy_loss``."""
        if self.policy_loss_fn is None:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask * inputs.get("tool_mask", 1)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _MODEL_INPUT_KEYS},
        )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        # None when TRL knows the batch is on-policy (see GRPOTrainer._generate_and_score_completions)
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps

        token_weights = self._token_weights(inputs, logps, old_logps, entropies, advantages, mask)
        per_token_loss, loss_metrics = self.policy_loss_fn(
            logps, old_logps, advantages, mask, self.policy_loss_config, token_weights=token_weights, entropy=entropies,
            entropy_signal=self._loss_entropy_signal(inputs, entropies, mode == "train"),
        )
        per_token_kl = None
        if self.beta != 0.0:  # TRL's k3 estimate of KL(π_θ ‖ π_ref), importance-corrected by default
            ref_logps = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
            if self.args.use_bias_correction_kl:
                level = self.policy_loss_config.importance_sampling_level
                per_token_kl = per_token_kl * importance_ratio(logps, old_logps, mask, level)
            per_token_loss = per_token_loss + self.beta * per_token_kl

        accumulation_steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss = self._aggregate(per_token_loss, mask, inputs["num_items_in_batch"], mode == "train", accumulation_steps)
        if self.aux_loss_enabled:  # MoE load balancing, as TRL
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_loss_metrics(mode, entropies, mask, per_token_kl, loss_metrics)
        return loss

    def _loss_entropy_signal(self, inputs: dict, entropies: torch.Tensor, training: bool) -> torch.Tensor | None:
        """ĥ for the loss with the generation batch's statistics (None: the loss's own, per micro-batch, or none).

        The batch column ``entropy_signal`` when generation added it; when this micro-batch is the whole generation
        batch of its process (:meth:`_loss_sees_generation_batch`), the statistics come from these entropies,
        gathered over processes, and also go to the sampler for the next generation.
        """
        if "entropy_signal" in inputs:
            return inputs["entropy_signal"]
        samples_adaptively = training and self.temperature_processor is not None
        if not (self.entropy_signal_from_generation or samples_adaptively):
            return None
        if not self._loss_sees_generation_batch(inputs, training):
            if self.entropy_signal_from_generation:
                raise KeyError(
                    "hapo_entropy_stats='generation_batch' takes ĥ from the batch column 'entropy_signal', set by "
                    "_generate_and_score_completions; it is missing (use hapo_entropy_stats='micro_batch' for "
                    "batches made elsewhere)."
                )
            return None  # the sampler got its statistics at generation
        stats, signal = self._entropy_statistics(entropies, inputs)
        if samples_adaptively:
            self.temperature_processor.stats = stats  # HAPO 3.1: the next generation samples with them
        return signal if self.entropy_signal_from_generation else None

    def _token_weights(self, inputs, logps, old_logps, entropies, advantages, mask) -> torch.Tensor | None:
        """TRL's per-token factors and the ``token_weights_column`` signal, multiplied (``None`` when there is none)."""
        weights = []
        if self.top_entropy_quantile < 1.0:  # "Beyond the 80/20 rule": only the top-entropy tokens
            weights.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
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
                    "aligned to the completion tokens (e.g. in _generate_and_score_completions)."
                )
            weights.append(inputs[self.args.token_weights_column])
        if not weights:
            return None
        return functools.reduce(operator.mul, (weight.to(logps.dtype) for weight in weights))

    def _aggregate(self, per_token_loss, mask, num_items_in_batch, training, accumulation_steps) -> torch.Tensor:
        """``aggregate_loss`` with TRL's normalisers (losses.policy's docstring), scaled for gradient accumulation.

        token-mean divides by ``N_glob`` = the generation batch's active tokens / processes · GA / steps_per_generation
        (TRL's dapo normaliser), which already covers one accumulation window of one process; the other modes are
        per-micro-batch means, divided by GA as TRL's grpo / luspo / dr_grpo.
        """
        agg_mode = self.args.loss_agg_mode
        if agg_mode == "token-mean":
            normalizer = num_items_in_batch.clamp(min=1.0) / self.accelerator.num_processes
            if training:
                normalizer = normalizer * accumulation_steps / self.args.steps_per_generation
            return aggregate_loss(per_token_loss, mask, agg_mode, normalizer)
        normalizer = None
        if agg_mode == "seq-mean-token-sum-norm":  # Dr. GRPO: B · max_completion_length
            normalizer = per_token_loss.size(0) * self.max_completion_length
        return aggregate_loss(per_token_loss, mask, agg_mode, normalizer) / accumulation_steps

    # -- metrics -----------------------------------------------------------------------------------------------------

    def _gather_values(self, local: torch.Tensor) -> torch.Tensor:
        """1-D tensors of different lengths from every process, concatenated (as TRL's ``get_high_entropy_mask``)."""
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=_GATHER_PAD))
        return gathered[gathered != _GATHER_PAD]

    def _global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of ``values`` over the masked tokens of all processes (TRL's ``global_masked_mean``)."""
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum().float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(self, mode, entropies, mask, per_token_kl, loss_metrics) -> None:
        metrics = self._metrics[mode]
        metrics["entropy"].append(self._global_masked_mean(entropies.detach(), mask))
        token_entropies = self._gather_values(entropies.detach()[mask.bool()].float())
        if token_entropies.numel():
            quantiles = torch.quantile(token_entropies, torch.tensor(_ENTROPY_QUANTILES, device=token_entropies.device))
            for q, value in zip(_ENTROPY_QUANTILES, quantiles.tolist(), strict=True):
                metrics[f"entropy/q{round(q * 100)}"].append(value)
        if per_token_kl is not None:
            metrics["kl"].append(self._global_masked_mean(per_token_kl.detach(), mask))
        if loss_metrics:  # one gather for all: local fractions, averaged over processes
            names = list(loss_metrics)
            local = torch.stack([loss_metrics[name].float() for name in names]).unsqueeze(0)
            for name, value in zip(names, self.accelerator.gather(local).mean(0).tolist(), strict=True):
                metrics[name].append(value)
