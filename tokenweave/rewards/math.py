"""Rewards for math answers, with TRL's reward-function signature.

`GRPOTrainer` calls each reward function as
`fn(prompts=..., completions=..., completion_ids=..., **columns)`, where every extra dataset column
(here `answer`) arrives as a list aligned with `completions`, and returns one float per completion
(or `None` to skip one). A completion is either a string or a conversational list of messages such as
`[{"role": "assistant", "content": "..."}]`.

The expected answer format is the one the arithmetic task asks for: a final line "The answer is 68.".
Parsing and comparison otherwise go through math-verify, so "1,234", "68.", "-5" and "\\boxed{68}"
are all understood.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from math_verify import parse, verify

__all__ = ["completion_to_text", "correctness_reward", "extract_answer", "format_reward", "is_correct"]

# A number as written in an answer: an optional sign, digits with optional thousands commas, decimals.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# "The answer is" followed by the number, possibly wrapped in `$`, `**` or `\boxed{`.
_ANSWER_PHRASE = re.compile(rf"the answer is\s*:?[\s$*]*(?:\\boxed\{{\s*)?({_NUMBER})", re.IGNORECASE)
# The whole text ends with the line "The answer is <number>." (trailing whitespace allowed).
_FINAL_LINE = re.compile(rf"(?:\A|\n)The answer is {_NUMBER}\.\s*\Z")


def _timeout() -> int | None:
    """math-verify's timeouts use `signal.alarm`, which only works in the main thread: disable them
    elsewhere (evaluation in a worker thread, for instance), as TRL's own `accuracy_reward` does."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def completion_to_text(completion: str | list[dict[str, Any]] | None) -> str:
    """The text of a completion: the string itself, or the content of the last assistant message of a
    conversational completion (content given as a string or as a list of `{"type": "text"}` parts)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    messages = [m for m in completion if m.get("role", "assistant") == "assistant"]
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


def extract_answer(text: str | None) -> str | None:
    """The final answer in `text`, as a string, or `None` if there is none.

    The number after the last "The answer is" wins. Without that phrase, math-verify extracts the
    answer (a `\\boxed{}` or `$...$` expression, else the last number). A plain number comes back
    without thousands commas ("1,234" -> "1234").
    """
    if not text:
        return None
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        answer = phrases[-1]
    else:
        parsed = parse(text, parsing_timeout=_timeout())
        if not parsed:
            return None
        answer = parsed[-1]
    return answer.replace(",", "") if re.fullmatch(_NUMBER, answer) else answer


def _parse_gold(gold: str | int | float | None) -> list:
    """math-verify's parse of a gold answer (empty when missing or unparseable)."""
    return [] if gold is None else parse(str(gold), parsing_timeout=_timeout())


def _matches(text: str, gold_parsed: list) -> bool:
    """Whether the answer extracted from `text` verifies against the parsed gold answer."""
    answer = extract_answer(text)
    if answer is None:
        return False
    return verify(gold_parsed, parse(answer, parsing_timeout=_timeout()), timeout_seconds=_timeout())


def is_correct(completion: str | list[dict[str, Any]] | None, gold: str | int | float | None) -> bool:
    """Whether the answer extracted from `completion` equals `gold` numerically (via math-verify)."""
    gold_parsed = _parse_gold(gold)
    return bool(gold_parsed) and _matches(completion_to_text(completion), gold_parsed)


def correctness_reward(
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None = None,
    answer: list[str] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 for a completion whose final answer equals the gold `answer` column, else 0.0.

    A row whose gold answer is missing or unparseable gets `None`, which TRL skips for that row.
    """
    if answer is None:
        raise ValueError("correctness_reward needs the gold answers: a dataset column named 'answer'.")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_parsed = _parse_gold(gold)
        rewards.append(float(_matches(completion_to_text(completion), gold_parsed)) if gold_parsed else None)
    return rewards


def closeness_reward(
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None = None,
    answer: list[str] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Partial credit for a numeric answer near the gold one: ``max(0, 1 - |pred - gold| / max(|gold|, 1))``.

    A dense signal for small models that are rarely exactly right (a completion with no number gets 0.0;
    a row whose gold answer is not a number gets `None`, which TRL skips).
    """
    if answer is None:
        raise ValueError("closeness_reward needs the gold answers: a dataset column named 'answer'.")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_value = _as_number(str(gold))
        if gold_value is None:
            rewards.append(None)
            continue
        predicted = _as_number(extract_answer(completion_to_text(completion)))
        if predicted is None:
            rewards.append(0.0)
        else:
            rewards.append(max(0.0, 1.0 - abs(predicted - gold_value) / max(abs(gold_value), 1.0)))
    return rewards


def _as_number(text: str | None) -> float | None:
    try:
        return float(text.replace(",", "")) if text is not None else None
    except ValueError:
        return None


def format_reward(
    prompts: list, completions: list, completion_ids: list[list[int]] | None = None, **kwargs: Any
) -> list[float]:
    """1.0 for a completion that ends with the line "The answer is <number>." (trailing whitespace
    allowed), else 0.0."""
    return [float(bool(_FINAL_LINE.search(completion_to_text(c)))) for c in completions]
