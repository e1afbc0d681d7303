"""HAPO's token signal: entropy statistics, adaptive-temperature sampling and token-level advantages, as one token
signal of ``TokenGRPOTrainer`` (Liu et al. 2025, arXiv 2509.16591). Its loss is ``losses.policy.hapo_policy_loss``.

HAPO's parts, each switched on its own (:class:`HapoConfig`; ``policy_loss: hapo`` or ``token_signals: [hapo]``
turns the signal on), and where they enter TRL::

    part (paper section)              hook of HapoSignal (signals.py)            computed by
    (vLLM engine, colocate mode)      init_context: TRL's engine built with       hapo_vllm.engine_with_hapo_processor
                                      HAPO's logits processor
    entropy statistics (3.0)          after_generation (or token_inputs, see      tokens.entropy.entropy_stats
                                      below): token entropies of the generation
                                      batch under the policy that sampled it,
                                      gathered over all processes
    adaptive temperature (3.1)        sample: a logits processor given to         AdaptiveTemperatureLogitsProcessor
                                      model.generate, or registered in TRL's      (tokens.entropy.
                                      colocated vLLM engine (hapo_vllm), with     adaptive_temperature_logits)
                                      the previous generation's statistics
    token-level group advantage (3.2) after_generation: [B, T] "advantages"       tokens.advantage.
                                      from the gathered rewards and lengths       token_group_advantage_values
    advantage redistribution (3.3)    token_inputs → policy loss "hapo"           losses.policy.redistribute_advantage
    adaptive clipping (3.4)           token_inputs → policy loss "hapo"           losses.policy.adaptive_clip_bounds

Entropy statistics. The generation batch's token entropies are those of π_old, the policy that sampled it, from
whichever forward already sees them: TRL's old-log-prob forward when TRL runs one (off-policy); the loss's own forward
when TRL runs none and each process's generation batch is one micro-batch (``steps_per_generation`` 1: the loss's
policy is then π_old); otherwise one extra no-grad forward at generation (``signals.Generation.old_policy_entropies``).
Their statistics over the whole generation batch (all processes) serve twice, as in HAPO's released code: the NEXT
generation samples with them (HAPO: the previous step's old-log-prob entropies over the whole batch), and, with
``hapo_entropy_stats: generation_batch`` (the default), they give the loss's ĥ as the batch column ``entropy_signal``,
so ĥ, and with it the update, does not depend on how the batch is split into micro-batches, accumulation steps and
processes. ``hapo_entropy_stats: micro_batch`` is the released code's loss instead: ĥ from the current policy's
entropies with each micro-batch's own statistics (computed by the loss).

Temperatures. TRL's fused LM head bakes ``temperature`` (T_base) in at ``__init__``: old, current and reference
log-probs and the entropies are all computed at T_base. Adaptive sampling draws token t at
``T_t = T_base·(1 + τ·ĥ_t)`` (within ``T_base·[1 − τ, 1 + τ]``), so the behaviour policy differs slightly from π_old
at T_base, while the ratio π_θ/π_old stays at T_base: exactly HAPO's released code (verl recomputes the old
log-probs at T = 1 and ignores the mismatch). The sampler measures each step's entropy at T_base too, the
temperature of the statistics it is compared with. The first generation, with no statistics yet, samples at T_base;
the statistics are the signal's checkpointed state, so a resumed run samples as the saved one would have.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..checks import NON_NEGATIVE, UNIT, Range
from ..losses.policy import HAPO_PAPER
from ..tokens.advantage import token_group_advantage_values
from ..tokens.entropy import EntropyStats, adaptive_temperature_logits, entropy_stats
from .hapo_vllm import engine_with_hapo_processor, hapo_extra_args
from .rollout import Generation, gather_values
from .signals import TokenBatch, TokenSignal, register_token_signal

HAPO_ENTROPY_STATS = ("generation_batch", "micro_batch")
# Parts that act at generation (on with the hapo signal) and parts of the hapo policy loss (on with policy_loss hapo).
GENERATION_SWITCHES = ("hapo_adaptive_temperature", "hapo_token_advantage")
LOSS_SWITCHES = ("hapo_adaptive_advantage", "hapo_adaptive_clip")


@dataclass
class HapoConfig:
    """HAPO's fields of ``TokenGRPOConfig`` (a mixin). A switch left unset (None) is on when its side is: the
    generation parts (3.1, 3.2) with the hapo signal (``token_signals: [hapo]``, which ``policy_loss: hapo`` and any
    switch set to true imply), the loss parts (3.3, 3.4) with ``policy_loss: hapo``."""

    option_ranges: ClassVar[dict] = {  # tokenweave.checks reads them
        "temperature_tau": Range(-1, 1, low_open=True, high_open=True), "adv_beta": NON_NEGATIVE,
        "clip_alpha": NON_NEGATIVE, "entropy_pivot": UNIT,
    }

    hapo_adaptive_temperature: bool | None = field(
        default=None,
        metadata={
            "help": "HAPO 3.1: sample each token at T·(1 + temperature_tau·ĥ), ĥ from its entropy under the previous "
            "generation batch's statistics. Needs policy_loss; with vLLM in colocate mode only "
            "(trainers/hapo_vllm.py), not with continuous batching. None: on with "
            "the hapo signal."
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
            "not used). None: on with the hapo signal."
        },
    )
    hapo_adaptive_advantage: bool | None = field(
        default=None,
        metadata={"help": "HAPO 3.3: differential advantage redistribution (hapo loss only). None: on for hapo."},
    )
    adv_beta: float = field(default=1.0, metadata={"help": "HAPO: strength of the advantage redistribution."})
    hapo_adaptive_clip: bool | None = field(
        default=None,
        metadata={"help": "HAPO 3.4: entropy-adaptive asymmetric clip bounds (the hapo and rank_grpo losses). None: "
                  "on for hapo, off for rank_grpo."},
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

    def hapo_loss_options(self) -> dict:
        """The fields of ``losses.policy.PolicyLossConfig`` that the hapo loss reads, from these fields (a switch the
        hapo signal did not resolve, being off, is off)."""
        return dict(
            entropy_pivot=self.entropy_pivot,
            released_sign=self.hapo_released_sign,
            adaptive_clip=bool(self.hapo_adaptive_clip),
            clip_alpha=self.clip_alpha,
            adaptive_advantage=bool(self.hapo_adaptive_advantage),
            adv_beta=self.adv_beta,
        )


def entropy_signal_from_generation(args) -> bool:
    """Whether the loss takes ĥ from the batch column ``entropy_signal`` (generation-batch statistics): the hapo
    loss with one of its parts on, or the rank_grpo loss with ``hapo_adaptive_clip``."""
    uses_signal = (args.policy_loss == "hapo" and (args.hapo_adaptive_clip or args.hapo_adaptive_advantage)) or (
        args.policy_loss == "rank_grpo" and args.hapo_adaptive_clip
    )
    return bool(uses_signal and args.hapo_entropy_stats == "generation_batch")


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """Divides each row of logits by its HAPO adaptive temperature (the patched vLLM sampler, for ``generate``).

    At every decoding step, :func:`~tokenweave.tokens.entropy.adaptive_temperature_logits` of the scores (``H`` at
    T_base, ``T = T_base·(1 + τ·ĥ)``, ``scores / T``; vLLM's path is ``trainers.hapo_vllm``). It replaces the
    temperature warper, so generate with ``temperature=1.0`` and put this processor before top-k / top-p / min-p
    (``generate`` runs the ``logits_processor`` it is given before its warpers). Update ``stats`` between rollouts (``None``: plain
    ``base_temperature``). With ``record_temperatures=True``, each call appends its ``[B]`` temperatures to
    :attr:`temperatures`; :meth:`pop_temperatures` returns them as ``[B, steps]`` and starts a new record.
    """

    def __init__(
        self,
        stats: EntropyStats | None = None,
        base_temperature: float = 1.0,
        tau: float = 0.05,
        record_temperatures: bool = False,
    ):
        self.stats = stats
        self.base_temperature = base_temperature
        self.tau = tau
        self.record_temperatures = record_temperatures
        self.temperatures: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scaled, temperature = adaptive_temperature_logits(scores, self.stats, self.base_temperature, self.tau)
        if self.record_temperatures:
            self.temperatures.append(temperature)
        return scaled

    def pop_temperatures(self) -> torch.Tensor:
        """The recorded temperatures ``[B, steps]`` (one column per decoding step), and clear the record."""
        temperatures, self.temperatures = self.temperatures, []
        return torch.stack(temperatures, dim=1)


@register_token_signal("hapo")
class HapoSignal(TokenSignal):
    """HAPO's generation-side parts and the ĥ its loss takes (module docstring). Metric:
    ``hapo/sampling_temperature`` (mean over the sampled tokens of a generation, all processes)."""

    provides = frozenset({"entropy_signal"})
    metric_prefixes = ("hapo/", "entropy_signal/")
    option_prefixes = ("hapo_", "temperature_tau", "adv_beta", "clip_alpha", "entropy_pivot")
    paper = HAPO_PAPER

    @classmethod
    def implied(cls, args) -> bool:
        """On with ``policy_loss: hapo``, with any HAPO switch set to true, and with ``policy_loss: rank_grpo`` and
        ``hapo_adaptive_clip`` (which needs ĥ)."""
        switched = any(getattr(args, name) for name in (*GENERATION_SWITCHES, *LOSS_SWITCHES))
        return args.policy_loss == "hapo" or switched

    @classmethod
    def configure(cls, args) -> bool:
        """Resolve the unset switches (:class:`HapoConfig`), check them; False when no part acts here."""
        switched_on = any(getattr(args, name) for name in GENERATION_SWITCHES)
        requested = cls.name in (args.token_signals or []) or args.policy_loss == "hapo" or switched_on
        # rank_grpo with HAPO's adaptive clip needs only ĥ: the generation parts stay off unless asked for
        clip_for_rank_grpo = args.policy_loss == "rank_grpo" and bool(args.hapo_adaptive_clip)
        if args.policy_loss is None:  # TRL's loss_type path: only the token-level advantage ([B, T] is accepted)
            given = [name for name in ("hapo_adaptive_temperature", *LOSS_SWITCHES) if getattr(args, name)]
            if given:
                raise ValueError(f"{given} need a policy_loss (TRL's loss_type path does not read them).")
            args.hapo_token_advantage = bool(requested if args.hapo_token_advantage is None else
                                             args.hapo_token_advantage)
            return args.hapo_token_advantage
        is_hapo_loss = args.policy_loss == "hapo"
        for names, default in ((GENERATION_SWITCHES, requested), (LOSS_SWITCHES, is_hapo_loss)):
            for name in names:
                if getattr(args, name) is None:
                    setattr(args, name, default)
        if not is_hapo_loss and args.hapo_adaptive_advantage:
            raise ValueError("hapo_adaptive_advantage is a part of the hapo policy loss.")
        if not (is_hapo_loss or clip_for_rank_grpo) and args.hapo_adaptive_clip:
            raise ValueError("hapo_adaptive_clip is a part of the hapo and rank_grpo policy losses.")
        if clip_for_rank_grpo and args.hapo_entropy_stats != "generation_batch":
            raise ValueError("rank_grpo takes HAPO's ĥ from the generation batch: hapo_entropy_stats must be "
                             "'generation_batch' with hapo_adaptive_clip.")
        if args.hapo_token_advantage and args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("hapo_token_advantage uses the weighted reward sum: multi_objective_aggregation must be "
                             "'sum_then_normalize'.")
        if args.hapo_adaptive_temperature and args.use_transformers_continuous_batching:
            raise ValueError("hapo_adaptive_temperature samples through a logits processor of transformers' generate "
                             "or of vLLM: not with use_transformers_continuous_batching.")
        if args.hapo_adaptive_temperature and args.use_vllm and args.vllm_mode != "colocate":
            raise ValueError("hapo_adaptive_temperature with vLLM needs vllm_mode: colocate. In server mode the "
                             "engine is started by `trl vllm-serve`, outside the trainer, which can neither register "
                             "HAPO's logits processor there nor hand it each generation's entropy statistics.")
        return bool(args.hapo_adaptive_temperature or args.hapo_token_advantage or entropy_signal_from_generation(args))

    @classmethod
    def init_context(cls, args):
        """With vLLM and the adaptive temperature: TRL's colocated engine is built with HAPO's logits processor."""
        if args.hapo_adaptive_temperature and args.use_vllm:
            return engine_with_hapo_processor()
        return super().init_context(args)

    def __init__(self, trainer):
        super().__init__(trainer)
        args = trainer.args
        self.token_advantage = bool(args.hapo_token_advantage)
        self.entropy_signal_from_generation = entropy_signal_from_generation(args)
        self.temperature_processor = None
        if args.hapo_adaptive_temperature:
            self.temperature_processor = AdaptiveTemperatureLogitsProcessor(
                None, trainer.temperature, args.temperature_tau, record_temperatures=True
            )
        self._sampling_temperature_totals = torch.zeros(2, device=trainer.accelerator.device)  # Σ T, sampled tokens

    # -- generation ----------------------------------------------------------------------------------------------

    def needs_generation_entropies(self, training: bool) -> bool:
        return self.entropy_signal_from_generation or (training and self.temperature_processor is not None)

    def sample(self, generate, training: bool):
        """In training with the adaptive temperature, ``generate`` through HAPO's logits processor (vLLM's:
        :mod:`.hapo_vllm`, whose temperatures stay in the engine and are not logged)."""
        if self.temperature_processor is None or not training:
            return generate()
        if self.trainer.use_vllm:
            with self._vllm_adaptive_temperature_sampling():
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
        model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
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

    @contextmanager
    def _vllm_adaptive_temperature_sampling(self):
        """While open, TRL's colocated vLLM engine samples with HAPO's temperature: the statistics, T_base and τ go
        into every request's ``extra_args`` and its temperature is 1 (:mod:`.hapo_vllm`) through TRL's
        ``generation_kwargs``, which TRL puts into the ``SamplingParams`` last."""
        generation = self.trainer.vllm_generation
        previous = generation.generation_kwargs
        processor = self.temperature_processor
        extra_args = {**(previous.get("extra_args") or {}),
                      **hapo_extra_args(processor.stats, processor.base_temperature, processor.tau)}
        generation.generation_kwargs = {**previous, "temperature": 1.0, "extra_args": extra_args}
        try:
            yield
        finally:
            generation.generation_kwargs = previous

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        """The sampling temperature metric; ĥ of the generation batch (column ``entropy_signal``) and the sampler's
        next statistics, unless the loss's forward gives them; the token-level group advantage."""
        training, columns = generation.training, {}
        if training and self.temperature_processor is not None and not self.trainer.use_vllm:
            totals = self.trainer.accelerator.reduce(self._sampling_temperature_totals, reduction="sum")
            mean_temperature = (totals[0] / totals[1].clamp(min=1)).item()
            self.trainer._metrics["train"]["hapo/sampling_temperature"].append(mean_temperature)
            self._sampling_temperature_totals.zero_()
        if self.needs_generation_entropies(training) and not generation.loss_sees_generation_batch:
            stats, signal = self.entropy_statistics(generation.old_policy_entropies(), generation.completion_mask)
            if training and self.temperature_processor is not None:
                self.temperature_processor.stats = stats  # HAPO 3.1: the next generation samples with them
            if self.entropy_signal_from_generation:
                columns["entropy_signal"] = signal
        if self.token_advantage:
            columns["advantages"] = self.token_group_advantage(generation)
        return columns

    def entropy_statistics(self, entropies: torch.Tensor, mask: torch.Tensor) -> tuple[EntropyStats, torch.Tensor]:
        """HAPO's entropy statistics over the tokens of ``mask`` (the completion tokens that enter the loss) on every
        process (a collective: every process calls it), and ĥ ``[B, T]`` of this process's tokens under them (0 at
        padding)."""
        valid = mask.bool()
        values = gather_values(self.trainer.accelerator, entropies.detach()[valid].float())
        stats = entropy_stats(
            values.unsqueeze(0), torch.ones_like(values).unsqueeze(0), self.trainer.args.entropy_pivot,
            self.trainer.args.hapo_released_sign,
        )
        return stats, stats.signal(entropies).masked_fill(~valid, 0.0)

    def token_group_advantage(self, generation: Generation) -> torch.Tensor:
        """HAPO's token-level group advantage ``[B, T]`` of this process's completions (Sec. 3.2).

        A prompt's group may span processes, so the statistics use the rewards and completion lengths of every
        process; TRL's ``Σ_k w_k r_k`` is the reward (NaN where no function scored). The local rows are TRL's slice.
        """
        trainer, mask = self.trainer, generation.completion_mask
        rewards_per_func = generation.rewards_per_func
        weighted = rewards_per_func * trainer.reward_weights.to(rewards_per_func.device)
        rewards = weighted.nansum(dim=1).masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))
        lengths = trainer.accelerator.gather(mask.sum(-1))
        group_size = trainer.num_generations if generation.training else trainer.num_generations_eval
        values = token_group_advantage_values(rewards, lengths, group_size=group_size)
        local = values.view(trainer.accelerator.num_processes, -1)[trainer.accelerator.process_index]
        return local.unsqueeze(-1) * mask

    # -- loss ----------------------------------------------------------------------------------------------------

    def token_inputs(self, batch: TokenBatch) -> dict:
        """ĥ for the hapo loss with the generation batch's statistics (none: the loss's own, per micro-batch).

        The batch column ``entropy_signal`` when generation added it; when this micro-batch is the whole generation
        batch of its process (``batch.sees_generation_batch``), the statistics come from the loss's entropies,
        gathered over processes, and also go to the sampler for the next generation.
        """
        if "entropy_signal" in batch.columns:
            return {"entropy_signal": batch.columns["entropy_signal"]}
        samples_adaptively = batch.training and self.temperature_processor is not None
        if not (self.entropy_signal_from_generation or samples_adaptively):
            return {}
        if not batch.sees_generation_batch:
            if self.entropy_signal_from_generation:
                raise KeyError(
                    "hapo_entropy_stats='generation_batch' takes ĥ from the batch column 'entropy_signal', set by "
                    "_generate_and_score_completions; it is missing (use hapo_entropy_stats='micro_batch' for "
                    "batches made elsewhere)."
                )
            return {}  # the sampler got its statistics at generation
        stats, signal = self.entropy_statistics(batch.entropies, batch.mask)
        if samples_adaptively:
            self.temperature_processor.stats = stats  # HAPO 3.1: the next generation samples with them
        return {"entropy_signal": signal} if self.entropy_signal_from_generation else {}

    # -- checkpoint ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The sampler's statistics (the next generation samples with them)."""
        stats = self.temperature_processor.stats if self.temperature_processor is not None else None
        return {"sampler_stats": None if stats is None else asdict(stats)}

    def load_state_dict(self, state: dict) -> None:
        stats = state.get("sampler_stats")
        if self.temperature_processor is not None and stats is not None:
            device = self.trainer.accelerator.device
            self.temperature_processor.stats = EntropyStats(**{key: value.to(device) for key, value in stats.items()})
