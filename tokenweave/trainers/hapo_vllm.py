"""HAPO's adaptive temperature inside vLLM, through vLLM's supported logits-processor extension point.

HAPO's released code patches vLLM's sampler; here nothing of vLLM is patched. :class:`HapoTemperatureProcessor` is
a custom logits processor of vLLM's Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor``: the default
runner of vLLM 0.31, the newest TRL 1.16 supports, and the only one from 0.34 on), registered with
``LLM(logits_processors=[PROCESSOR_PATH])``. vLLM calls ``apply`` on the float32 logits of every decoding step
before its own temperature, min-p and top-k / top-p, which is where HAPO's temperature belongs (as on the
transformers path, where the processor runs before the warpers).

Per request, ``SamplingParams.extra_args[EXTRA_ARGS_KEY]`` (:func:`hapo_extra_args`) carries the previous generation
batch's entropy statistics, T_base and τ, so each generation hands the engine its statistics; the request's own
``temperature`` must be 1 (vLLM then scales nothing: this processor is the temperature). Each row becomes
``adaptive_temperature_logits(row, stats, T_base, τ)``: the formula of the transformers path
(:func:`tokenweave.tokens.entropy.adaptive_temperature_logits`). Requests without the key are left alone.

In TRL's colocate mode (``use_vllm: true``, ``vllm_mode: colocate``) :class:`~tokenweave.trainers.grpo.TokenGRPOTrainer`
builds TRL's engine with this processor (:func:`engine_with_hapo_processor`) and the hapo signal puts the statistics
into TRL's ``generation_kwargs`` before each generation. TRL's engine returns the processed log-probabilities (at
the adaptive temperature: the behaviour policy's), which its importance-sampling correction compares with π_old at
T_base. Server mode is refused: its engine is started by ``trl vllm-serve`` outside the trainer.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..tokens.entropy import EntropyStats, adaptive_temperature_logits

try:  # vLLM's base class where vLLM is installed; the same class without it (for tests and CPU machines)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _VllmLogitsProcessor
except ImportError:
    _VllmLogitsProcessor = object

EXTRA_ARGS_KEY = "tokenweave_hapo"
PROCESSOR_PATH = f"{__name__}:HapoTemperatureProcessor"
_STATS_FIELDS = ("pivot", "rms", "scale_pos", "scale_neg")


def hapo_extra_args(stats: EntropyStats | None, base_temperature: float, tau: float) -> dict:
    """``SamplingParams.extra_args`` that make :class:`HapoTemperatureProcessor` sample at HAPO's temperature with
    these statistics (None: the first generation, plain ``base_temperature``); plain floats."""
    values = {"base_temperature": float(base_temperature), "tau": float(tau)}
    if stats is not None:
        values |= {name: float(getattr(stats, name)) for name in _STATS_FIELDS}
    return {EXTRA_ARGS_KEY: values}


def _settings(sampling_params) -> tuple[float, ...] | None:
    """``(T_base, τ)`` or ``(T_base, τ, pivot, rms, scale_pos, scale_neg)`` of a request's ``extra_args`` (None
    without the key); ``ValueError`` if malformed."""
    values = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
    if values is None:
        return None
    given = set(values)
    if not {"base_temperature", "tau"} <= given or not given <= {"base_temperature", "tau", *_STATS_FIELDS} or (
        given & set(_STATS_FIELDS) and not set(_STATS_FIELDS) <= given
    ):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] needs base_temperature, tau and either all or none of "
                         f"{list(_STATS_FIELDS)}; got {sorted(given)}.")
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in values.values()):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must hold finite numbers; got {values}.")
    if values["base_temperature"] <= 0 or not -1 < values["tau"] < 1:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: base_temperature must be > 0 and tau in (-1, 1), so that "
                         f"T_base·(1 + tau·ĥ) stays positive; got {values}.")
    if sampling_params.temperature != 1.0:
        raise ValueError(f"A request with extra_args[{EXTRA_ARGS_KEY!r}] must have temperature 1.0 (the processor "
                         f"divides by HAPO's temperature itself); got {sampling_params.temperature}.")
    names = ("base_temperature", "tau", *(_STATS_FIELDS if "pivot" in values else ()))
    return tuple(float(values[name]) for name in names)


class HapoTemperatureProcessor(_VllmLogitsProcessor):
    """vLLM (Model Runner V2) logits processor: HAPO's adaptive temperature per row (module docstring).

    State per request slot: its settings ``(T_base, τ[, pivot, rms, scale_pos, scale_neg])``, set in
    :meth:`add_request` (slots are reused: a request without the key clears its slot). :meth:`apply` groups the rows
    of the step by their settings (one group when every request of a generation has the same statistics, as in
    TRL) and scales each group with :func:`~tokenweave.tokens.entropy.adaptive_temperature_logits`, in place.
    """

    def __init__(self, vllm_config=None, req_states=None):
        self._slots: dict[int, tuple[float, ...]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        _settings(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        settings = _settings(sampling_params)
        if settings is None:
            self._slots.pop(req_idx, None)
            return False
        self._slots[req_idx] = settings
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        """Scale the rows of the requests that asked for it; ``ctx.expanded_idx_mapping`` maps rows to slots."""
        if not self._slots:
            return logits
        groups: dict[tuple[float, ...], list[int]] = {}  # settings -> their rows
        for row, slot in enumerate(ctx.expanded_idx_mapping.tolist()):
            settings = self._slots.get(slot)
            if settings is not None:
                groups.setdefault(settings, []).append(row)
        for (base_temperature, tau, *statistics), rows in groups.items():
            stats = None
            if statistics:
                stats = EntropyStats(*(torch.tensor(value, device=logits.device) for value in statistics))
            index = torch.tensor(rows, device=logits.device)
            logits[index] = adaptive_temperature_logits(logits[index], stats, base_temperature, tau)[0]
        return logits


@contextlib.contextmanager
def engine_with_hapo_processor():
    """While open, TRL's colocated vLLM engine is built with :class:`HapoTemperatureProcessor` registered.

    TRL 1.16 builds ``vllm.LLM(...)`` in ``trl.generation.vllm_generation`` and takes no logits processors, so the
    name ``LLM`` there is wrapped for the trainer's ``__init__`` (TRL's name, not vLLM's code): the wrapper passes
    ``logits_processors=[PROCESSOR_PATH]`` besides TRL's own arguments.
    """
    import trl.generation.vllm_generation as trl_vllm

    engine = getattr(trl_vllm, "LLM", None)  # absent without vLLM: TRL's trainer then refuses use_vllm itself
    if engine is None:
        yield
        return

    def engine_with_processor(*args, **kwargs):
        processors = [*(kwargs.pop("logits_processors", None) or []), PROCESSOR_PATH]
        return engine(*args, **kwargs, logits_processors=processors)

    trl_vllm.LLM = engine_with_processor
    try:
        yield
    finally:
        trl_vllm.LLM = engine
