"""Where an arithmetic trajectory first goes wrong: the ground truth that critical-token scores are measured against.

The built-in arithmetic task (:mod:`tokenweave.data.arithmetic`) writes its reference solutions as one calculation
per line and a final answer line::

    23 + 45 = 68
    The answer is 68.

A trajectory in that format can be read against the reference, line by line, and its *first error* located to one
character: :func:`first_error`. The rule (each step is compared with the reference step of the same index; since
every earlier step was right, the reference values are the values the trajectory should use):

1. The completion is split into non-blank lines. Each must be a step line ``L op R = C`` (integers; ``op`` one of
   ``+ - ×``, with ``*``/``x`` read as ``×`` and ``−`` as ``-``) or, last, the answer line ``The answer is N.``;
   any other line makes the trajectory unreadable ("other format"), unless an error was found before it.
2. Step ``i`` (expected ``a op b = c``), in the order the characters are written:

   * left operand ``L ≠ a``: the error is in ``L``, unless ``op`` is commutative (``+``, ``×``), ``L = b`` and the
     operator is right (the operands are swapped), in which case the right operand is compared with ``a``;
   * operator: the operator character;
   * right operand ``R`` against ``b`` (or ``a``, when swapped);
   * result ``C ≠ c``: the error is in ``C``.

   A wrong number's error is its first wrong digit: the first position where the written and the expected digits
   differ; when one is a prefix of the other, the position just after the shorter one (an extra digit, or the
   character that ended the number too early).
3. More step lines than the reference has, or an answer line after fewer steps than the reference has, is
   unreadable ("other route"). After all steps, the answer line's number is compared with the
   reference answer the same way.
4. A trajectory with no error found (every line right, or no answer line yet) is unreadable ("no error found"):
   its verdict came from something the rule does not read.

:func:`first_error` returns a :class:`FirstError` (character offset, kind, step) or an :class:`Unreadable` (why).
:func:`calculation_spans` gives where a trajectory's calculations ``L op R = C`` are (the tokens it computes with).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = r"-?\d+"
_STEP_LINE = re.compile(rf"\s*(?P<left>{_NUMBER})\s*(?P<op>[-+×*xX−])\s*(?P<right>{_NUMBER})\s*=\s*(?P<result>{_NUMBER})\s*")
_ANSWER_LINE = re.compile(rf"\s*The answer is\s+(?P<answer>{_NUMBER})\s*\.?\s*")
_OPERATORS = {"+": "+", "-": "-", "−": "-", "×": "×", "*": "×", "x": "×", "X": "×"}
_COMMUTATIVE = ("+", "×")
ERROR_KINDS = ("operand", "operator", "result", "answer")


@dataclass(frozen=True)
class FirstError:
    """The first wrong character of a trajectory: ``offset`` into its text, the ``kind`` of error (one of
    :data:`ERROR_KINDS`) and the ``step`` (0-based step line; the number of steps for the answer line)."""

    offset: int
    kind: str
    step: int


@dataclass(frozen=True)
class Unreadable:
    """A trajectory the rule cannot read: ``reason``, one of :data:`UNREADABLE_REASONS`, and a ``detail``."""

    reason: str
    detail: str = ""


UNREADABLE_REASONS = ("other format", "other route", "no error found")


@dataclass(frozen=True)
class _StepLine:
    """A parsed step line: each field's text and its offset in the completion."""

    left: tuple[str, int]
    op: tuple[str, int]
    right: tuple[str, int]
    result: tuple[str, int]


@dataclass(frozen=True)
class _Reference:
    steps: list[tuple[int, str, int, int]]  # (a, op, b, c)
    answer: int


def _lines(text: str) -> list[tuple[str, int]]:
    """The non-blank lines of ``text`` with their offsets."""
    lines, offset = [], 0
    for line in text.split("\n"):
        if line.strip():
            lines.append((line, offset))
        offset += len(line) + 1
    return lines


def _parse_step(line: str, offset: int) -> _StepLine | None:
    match = _STEP_LINE.fullmatch(line)
    if match is None:
        return None
    fields = {name: (match.group(name), offset + match.start(name)) for name in ("left", "op", "right", "result")}
    return _StepLine(**fields)


def _parse_reference(solution: str) -> _Reference:
    """The steps and answer of a reference solution in the task's format (``ValueError`` if it is not)."""
    lines = _lines(solution)
    steps = []
    for line, offset in lines[:-1]:
        step = _parse_step(line, offset)
        if step is None:
            raise ValueError(f"Reference solution line {line!r} is not a calculation 'a op b = c'.")
        steps.append((int(step.left[0]), _OPERATORS[step.op[0]], int(step.right[0]), int(step.result[0])))
    answer = _ANSWER_LINE.fullmatch(lines[-1][0]) if lines else None
    if answer is None:
        raise ValueError(f"Reference solution {solution!r} does not end with 'The answer is <number>.'")
    return _Reference(steps, int(answer.group("answer")))


def _first_wrong_digit(written: tuple[str, int], expected: int) -> int | None:
    """The offset of the first character where the number ``written`` (text, offset) differs from ``expected``
    (just after the shorter one when one is a prefix of the other); None when they are equal."""
    text, offset = written
    if int(text) == expected:
        return None
    target = str(expected)
    for index, (got, want) in enumerate(zip(text, target)):
        if got != want:
            return offset + index
    return offset + min(len(text), len(target))


def _step_error(step: _StepLine, expected: tuple[int, str, int, int], index: int) -> FirstError | None:
    """The first error of one step line against the reference step ``(a, op, b, c)`` (rule 2), or None."""
    a, op, b, c = expected
    written_op = _OPERATORS[step.op[0]]
    if op in _COMMUTATIVE and written_op == op and int(step.left[0]) == b != a:
        a, b = b, a  # swapped operands of a commutative operation are right
    checks = (
        ("operand", lambda: _first_wrong_digit(step.left, a)),
        ("operator", lambda: None if written_op == op else step.op[1]),
        ("operand", lambda: _first_wrong_digit(step.right, b)),
        ("result", lambda: _first_wrong_digit(step.result, c)),
    )
    for kind, check in checks:
        offset = check()
        if offset is not None:
            return FirstError(offset, kind, index)
    return None


def first_error(completion: str, solution: str) -> FirstError | Unreadable:
    """The first error of the trajectory ``completion`` against the reference ``solution`` (module docstring)."""
    reference = _parse_reference(solution)
    num_steps = 0
    for line, offset in _lines(completion):
        answer = _ANSWER_LINE.fullmatch(line)
        if answer is not None:
            if num_steps != len(reference.steps):
                return Unreadable("other route", f"answer after {num_steps} of {len(reference.steps)} steps")
            error = _first_wrong_digit((answer.group("answer"), offset + answer.start("answer")), reference.answer)
            if error is None:
                return Unreadable("no error found", "every line is right")
            return FirstError(error, "answer", num_steps)
        step = _parse_step(line, offset)
        if step is None:
            return Unreadable("other format", f"line {line.strip()[:40]!r} is not a calculation nor the answer line")
        if num_steps >= len(reference.steps):
            return Unreadable("other route", f"more than the reference's {len(reference.steps)} steps")
        error = _step_error(step, reference.steps[num_steps], num_steps)
        if error is not None:
            return error
        num_steps += 1
    return Unreadable("no error found", "no answer line and no wrong step")


def calculation_spans(completion: str) -> list[tuple[int, int]]:
    """The ``[start, end)`` characters of each calculation ``L op R = C`` in the step lines of ``completion`` (from the
    first character of ``L`` to the last of ``C``): the tokens a trajectory computes with, as opposed to its layout and
    its answer sentence (``tokenweave evidence`` asks how often a signal's tokens are these)."""
    spans = []
    for line, offset in _lines(completion):
        step = _parse_step(line, offset)
        if step is not None:
            spans.append((step.left[1], step.result[1] + len(step.result[0])))
    return spans
