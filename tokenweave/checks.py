"""The options of a run, checked in one place before anything heavy loads.

:func:`check_options` checks one config dataclass (``RunArguments``, a ``Token*Config``, TRL's ``ModelConfig``, a
component's fields such as ``AttentionCreditConfig``) and raises one :class:`ConfigError` listing every problem:

1. **types**: each field's value against its annotation. Values from a YAML file reach the dataclasses as YAML wrote
   them (argparse converts string defaults only), so ``8.5`` or ``[8]`` for an ``int``, or ``"4"`` for a list, would
   otherwise fail deep inside training.
2. **choices**: a field whose metadata lists ``choices`` (argparse checks them for command-line values only).
3. **ranges**: the ``option_ranges`` of the config's classes (a class attribute ``{field: Range}``: each method's
   config mixin declares its own fields' ranges), else :data:`RANGES` (the fields of TRL, transformers and the
   pipelines, by name; :data:`METHOD_RANGES` where a trainer reads a field differently, as DPO's β > 0 against
   GRPO's β ≥ 0); a ranged float must also be finite.
4. **rules**: the ``option_rules`` of the config's classes (``{field: its value → a message, or None when it
   holds}``), and :data:`COMBINATIONS`, rules over several fields of one config.

The configs call it first thing in ``__post_init__`` (so the command line, YAML files, the pipelines'
``dataclasses.replace`` and the Python API all pass through it, before TRL's own ``__post_init__`` divides by a batch
size); ``tokenweave.train.build_trainer`` calls it for ``ModelConfig``. What a method combines (a signal with a
loss) stays with the component that owns it (its ``configure``); datasets are checked where they are loaded
(``tokenweave.data.loading.check_dataset``).
"""

from __future__ import annotations

import enum
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """Options out of their type, choices or range: every problem found, one per line."""


@dataclass(frozen=True)
class Range:
    """A number's allowed range; ``special``: values allowed outside it (None, −1 for "unset")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple = (None,)

    def holds(self, value) -> bool:
        if value in self.special and not isinstance(value, bool):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "finite"
        extra = [repr(value) for value in self.special if value is not None]
        return text + (f" (or {', '.join(extra)})" if extra else "")


AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)
FINITE = Range()

# field name -> its range, whatever the config (a field absent from a config is skipped); a method's own fields declare
# their range in their metadata instead
RANGES: dict[str, Range] = {
    # RunArguments
    "num_train_examples": AT_LEAST_ONE, "num_test_examples": AT_LEAST_ONE, "task_list_length": AT_LEAST_ONE,
    "task_num_candidates": AT_LEAST_ONE,
    # transformers' TrainingArguments
    "per_device_train_batch_size": AT_LEAST_ONE, "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE, "max_steps": Range(1, special=(-1,)),
    "num_train_epochs": POSITIVE, "learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE, "adam_beta1": Range(0, 1, high_open=True), "adam_beta2": Range(0, 1, high_open=True),
    "adam_epsilon": POSITIVE, "warmup_steps": NON_NEGATIVE, "logging_steps": POSITIVE, "save_steps": POSITIVE,
    "eval_steps": POSITIVE, "save_total_limit": AT_LEAST_ONE,
    # TRL's ModelConfig (LoRA)
    "lora_r": AT_LEAST_ONE, "lora_alpha": POSITIVE, "lora_dropout": Range(0, 1, high_open=True),
    # TRL's SFT / DPO / GRPO configs
    "max_length": AT_LEAST_ONE, "max_prompt_length": AT_LEAST_ONE, "max_completion_length": AT_LEAST_ONE,
    "label_smoothing": Range(0, 0.5), "num_generations": Range(2),
    "num_generations_eval": AT_LEAST_ONE,  # TRL: one completion per prompt is enough to score an evaluation
    "steps_per_generation": AT_LEAST_ONE, "generation_batch_size": AT_LEAST_ONE, "num_iterations": AT_LEAST_ONE,
    "temperature": POSITIVE, "top_p": Range(0, 1, low_open=True), "top_k": NON_NEGATIVE, "min_p": UNIT,
    "repetition_penalty": POSITIVE, "epsilon": NON_NEGATIVE, "epsilon_high": NON_NEGATIVE, "delta": POSITIVE,
    "top_entropy_quantile": UNIT,
    # tokenweave: the critical-token pipeline, sampling, evaluation
    "num_examples": AT_LEAST_ONE, "num_samples_per_prompt": AT_LEAST_ONE, "max_new_tokens": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE, "sample_batch_size": AT_LEAST_ONE, "score_batch_size": AT_LEAST_ONE,
    "score_chunk_size": AT_LEAST_ONE, "score_b": NON_NEGATIVE, "positive_per_question": AT_LEAST_ONE,
    "negative_top_p": Range(0, 1, low_open=True), "rollout_trajectories": NON_NEGATIVE, "rollout_samples": AT_LEAST_ONE,
    "rollout_temperature": POSITIVE, "rollout_max_new_tokens": AT_LEAST_ONE, "vllm_tensor_parallel_size": AT_LEAST_ONE,
    "vllm_gpu_memory_utilization": Range(0, 1, low_open=True),
}

# config class name (or a base class's) -> field name -> its range there, over RANGES
METHOD_RANGES: dict[str, dict[str, Range]] = {
    "DPOConfig": {"beta": POSITIVE},
    "GRPOConfig": {"beta": NON_NEGATIVE},
    # correct and incorrect trajectories of one question need two samples at least
    "CriticalPipelineConfig": {"num_samples_per_prompt": Range(2)},
}


def _candidates(config) -> str | None:
    if config.task_num_candidates <= config.task_list_length:
        return (f"task_num_candidates ({config.task_num_candidates}) must exceed task_list_length "
                f"({config.task_list_length}): a list is chosen from the candidates")
    return None


# (the fields a rule reads, the rule: a message for a broken combination, else None)
COMBINATIONS: list[tuple[tuple[str, ...], Callable[[object], str | None]]] = [
    (("task_num_candidates", "task_list_length"), _candidates),
]


# fields whose values are wider than their annotation says, as their library reads them: PEFT takes
# lora_target_modules "all-linear", TRL's DPOConfig one loss_type string for a list of one, Trainer.train
# resume_from_checkpoint true (the newest checkpoint), TRL's GRPOConfig scale_rewards true ("group") or false ("none")
ALSO_ACCEPTED: dict[str, type] = {"lora_target_modules": str, "loss_type": str, "resume_from_checkpoint": bool,
                                  "scale_rewards": bool}


def _type_name(hint) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _matches(value, hint) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (an int counts as a float; a bool as neither)."""
    if hint is typing.Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        # None for a union is "unset": transformers' parser gives it to such fields (debug, fsdp) itself
        return value is None or any(_matches(value, option) for option in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (list, tuple, set):
        (item, *_) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_matches(element, item) for element in value)
    if origin is dict or hint is dict:
        return True  # a structured option (a dict, or the object its library turned it into) its library parses
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not read


def _declared(config, attribute: str) -> dict:
    """The ``option_ranges`` or ``option_rules`` the classes of ``config`` declare (module docstring)."""
    declared = {}
    for base in reversed(type(config).__mro__):
        declared.update(vars(base).get(attribute, {}))
    return declared


def _range_of(config, name: str) -> Range | None:
    """A field's range: its config's declared one, else the trainer's or the common one by name."""
    declared = _declared(config, "option_ranges")
    if name in declared:
        return declared[name]
    for base in type(config).__mro__:
        override = METHOD_RANGES.get(base.__name__, {})
        if name in override:
            return override[name]
    return RANGES.get(name)


def option_problems(config) -> list[str]:
    """Every problem of ``config``'s options (module docstring), one message each; empty when all hold."""
    hints = typing.get_type_hints(type(config))
    rules = _declared(config, "option_rules")
    problems, broken = [], set()
    for item in fields(config):
        if not item.init:
            continue
        name, value = item.name, getattr(config, item.name)
        if not (_matches(value, hints.get(name, typing.Any)) or isinstance(value, ALSO_ACCEPTED.get(name, ()))):
            problems.append(f"{name} must be {_type_name(hints[name])}, got {value!r} ({type(value).__name__})")
            broken.add(name)
            continue
        choices = item.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            problems.append(f"{name} must be one of {list(choices)}, got {value!r}")
            broken.add(name)
            continue
        allowed = _range_of(config, name)
        if allowed is not None and isinstance(value, (int, float)) and not allowed.holds(value):
            problems.append(f"{name} must be {allowed}, got {value!r}")
            broken.add(name)
            continue
        rule = rules.get(name)
        message = rule(value) if rule is not None else None
        if message:
            problems.append(message)
            broken.add(name)
    names = {item.name for item in fields(config)}
    for needed, rule in COMBINATIONS:
        if set(needed) <= names and not broken & set(needed):
            message = rule(config)
            if message:
                problems.append(message)
    return problems


def check_options(config) -> None:
    """Raise :class:`ConfigError` with every problem of ``config``'s options (module docstring)."""
    problems = option_problems(config)
    if problems:
        raise ConfigError(f"Invalid {type(config).__name__} option(s):\n  " + "\n  ".join(problems))


def check_values(where: str, **values) -> None:
    """Raise :class:`ConfigError` for the named ``values`` (a function's arguments, as ``tokenweave eval``'s) out of
    their :data:`RANGES`."""
    problems = [f"{name} must be {RANGES[name]}, got {value!r}" for name, value in values.items()
                if name in RANGES and not RANGES[name].holds(value)]
    if problems:
        raise ConfigError(f"Invalid {where} argument(s):\n  " + "\n  ".join(problems))
