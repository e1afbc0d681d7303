"""``noisy_arithmetic``: the arithmetic SFT task with planted noise in a set share of its train solutions.

A task with ground truth for token selection and weighting (Rho-1, TokenCleaning, DFT-style weights, span rules): the
problems, the prompt and the worked solutions are those of :mod:`.arithmetic` (its SFT format: ``prompt``,
``completion``), but a share ``noise_share`` of the **train** rows (exactly ``round(noise_share × rows)``, the rows
drawn with a seeded RNG) carry one planted error each, and the task knows every planted character. The kind of each
noisy row is drawn, with the same seeded RNG, from ``noise_kinds``:

- ``wrong_step``: one calculation line is wrong, either by one wrong digit of its result (``23 + 45 = 63``) or by a
  wrong operator with its result computed through (``45 - 23 = 22`` for ``45 + 23``, ``7 + 4 = 11`` for ``7 × 4``;
  ``×`` only in the difficulties that have it). The wrong result is copied on to the later lines that use it, and to
  the final answer, which is always wrong (:func:`wrong_step_solution`; the slip mechanism is arithmetic's
  ``_evaluate(steps, corrupt_at, delta)``). Every number shown stays non-negative.
- ``junk``: a few (3-6) random letters and symbols inserted at a word boundary of the solution
  (``23 + 45 = 68q#Zk``, ``The q#Zkanswer is 68.``; :func:`junk_solution`).

What is planted is the difference between the clean and the noisy solution (:func:`planted_spans`: difflib's opcodes,
on the noisy side), so the copied-on wrong results and the wrong final answer are planted characters too; for a wrong
digit ``68 → 63`` only the ``3`` is. Columns of every row:

- ``prompt``, ``completion``: as the arithmetic task's SFT format (the completion: one assistant message);
- ``planted_spans``: ``[start, end)`` character offsets, in the completion's assistant text, of every planted
  character (``[]`` for a clean row);
- ``noise_kind``: ``"none"``, ``"wrong_step"`` or ``"junk"``.

Splits: ``train`` (noisy), ``test`` (always clean: exactly the arithmetic task's test questions) and ``clean``, a
small clean split for the reference model of Rho-1 / TokenCleaning (``dataset_train_split: clean``). The three are
disjoint by question, whatever the seed or sizes: ``test`` is arithmetic's test bucket (a stable hash of the
question), and ``clean`` is a second stable hash's share :data:`CLEAN_FRACTION` of arithmetic's train bucket, so this
task's ``train`` questions are the arithmetic task's train questions without those (the same problem stream of a
seed, a few skipped).

In a run config (SFT only: ``tokenweave.data.loading`` refuses the task for DPO and GRPO)::

    dataset_name: noisy_arithmetic
    task_noise_share: 0.3                  # in [0, 1]
    task_noise_kinds: [wrong_step, junk]
    dataset_train_split: clean             # the reference model's run; the policy's run keeps "train"

Per-token ground truth, aligned to the tokens TRL 1.16's SFTTrainer labels:

- :func:`planted_label_mask`: 1/0 for each labelled token (``labels != -100``, in order) whose characters overlap a
  planted span; :func:`planted_label_masks`: that mask and the token ids of every row of a dataset;
- :func:`tokenize_like_sft`: the ``input_ids`` and ``labels`` SFTTrainer gives a conversational prompt-completion
  row (before truncation);
- :func:`oracle_weights` / :func:`oracle_weights_column`: one weight per labelled token, 0 at planted tokens and 1
  elsewhere, as a ``token_weights`` column for the ``weights`` token signal (an oracle: what a perfect noise detector
  would give).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
import string
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, Features, List, Value
from trl.data_utils import _tokenize, common_prefix_length, is_conversational

from .arithmetic import (
    _SPECS,
    OPERATIONS,
    ArithmeticProblem,
    Step,
    _check_choice,
    _evaluate,
    _render,
    _split_of,
    build_prompt,
    draw_problems,
)
from .token_columns import message_texts, token_char_spans

__all__ = [
    "CLEAN_FRACTION",
    "FEATURES",
    "NOISE_KINDS",
    "SPLITS",
    "junk_solution",
    "load_noisy_arithmetic",
    "noisy_split_of",
    "oracle_weights",
    "oracle_weights_column",
    "planted_label_mask",
    "planted_label_masks",
    "planted_spans",
    "tokenize_like_sft",
    "wrong_step_solution",
]

SPLITS = ("train", "test", "clean")
NOISE_KINDS = ("wrong_step", "junk")

CLEAN_FRACTION = 0.25
"""Share of the arithmetic task's train questions that form the ``clean`` split (by a second stable hash)."""

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
FEATURES = Features({"prompt": _MESSAGES, "completion": _MESSAGES, "planted_spans": List(List(Value("int64"))),
                     "noise_kind": Value("string")})
"""The columns of every split (an all-clean split too: its ``planted_spans`` are lists of int lists)."""

_JUNK_CHARACTERS = string.ascii_letters + "#$%&*@~^_"
_JUNK_LENGTHS = (3, 6)


def noisy_split_of(question: str) -> str:
    """The split of this task that a question belongs to: ``test`` as in the arithmetic task; else ``clean`` for a
    share :data:`CLEAN_FRACTION` of arithmetic's train questions (a second stable hash of the text), else ``train``."""
    if _split_of(question) == "test":
        return "test"
    digest = hashlib.sha256(f"noisy_arithmetic.clean:{question}".encode()).digest()
    return "clean" if int.from_bytes(digest[:8], "big") / 2**64 < CLEAN_FRACTION else "train"


# ---------------------------------------------------------------------------------------------------
# Planting noise
# ---------------------------------------------------------------------------------------------------


def planted_spans(clean: str, noisy: str) -> list[list[int]]:
    """The ``[start, end)`` character offsets in ``noisy`` of every character that differs from ``clean``: the
    replaced and inserted characters of difflib's opcodes (``SequenceMatcher``, no autojunk), on the noisy side,
    sorted and merged where they touch. Where ``noisy`` only lacks characters (a number that got shorter, ``100 →
    10``), no noisy character differs: the word (run of letters and digits) around that place is planted instead, or
    the character there when there is no word."""
    spans = []
    for tag, _, _, start, end in difflib.SequenceMatcher(None, clean, noisy, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            spans.append([start, end])
        elif tag == "delete" and noisy:
            low = high = start
            while low > 0 and noisy[low - 1].isalnum():
                low -= 1
            while high < len(noisy) and noisy[high].isalnum():
                high += 1
            if low == high:
                low, high = (start, start + 1) if start < len(noisy) else (start - 1, start)
            spans.append([low, high])
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _wrong_digits(steps: tuple[Step, ...]):
    """``(steps, results)`` of every one-digit change of one step's result (no leading zero), carried on."""
    for index, result in enumerate(_evaluate(steps)):
        digits = str(result)
        for position, old in enumerate(digits):
            for new in "0123456789":
                if new != old and not (position == 0 and new == "0" and len(digits) > 1):
                    delta = (int(new) - int(old)) * 10 ** (len(digits) - 1 - position)
                    yield steps, _evaluate(steps, corrupt_at=index, delta=delta)


def _wrong_operators(steps: tuple[Step, ...], difficulty: str):
    """``(steps, results)`` of every step done with another operator of its difficulty (``×`` only where the
    difficulty has it: an easy solution gets no new symbol), carried on."""
    operators = [op for op in OPERATIONS if op != "×" or _SPECS[difficulty].multiply]
    for index, step in enumerate(steps):
        for op in operators:
            if op != step.op:
                changed = (*steps[:index], Step(op, step.left, step.right), *steps[index + 1 :])
                yield changed, _evaluate(changed)


def wrong_step_solution(problem: ArithmeticProblem, rng: random.Random) -> str:
    """``problem``'s solution with one wrong calculation line (module docstring): a wrong digit of its result or a
    wrong operator (which of the two, 50/50, and which line, digit or operator from ``rng``), the wrong result copied
    on to the later lines that use it and to the final answer. Every number stays non-negative and the final answer
    is wrong; a change that only shortens a number (nothing in the noisy text differs there) is avoided while
    another exists. A one-digit change of the last result always qualifies."""
    clean_results = _evaluate(problem.steps)
    clean = _render(problem.steps, clean_results)
    variants = [list(_wrong_digits(problem.steps)), list(_wrong_operators(problem.steps, problem.difficulty))]
    if rng.random() < 0.5:
        variants.reverse()
    for candidates in variants:
        rng.shuffle(candidates)
    valid = [_render(steps, results) for candidates in variants for steps, results in candidates
             if min(results) >= 0 and results[-1] != clean_results[-1]]

    def only_shortens(noisy: str) -> bool:
        opcodes = difflib.SequenceMatcher(None, clean, noisy, autojunk=False).get_opcodes()
        return any(tag == "delete" for tag, *_ in opcodes)

    return next((noisy for noisy in valid if not only_shortens(noisy)), valid[0])


def junk_solution(solution: str, rng: random.Random) -> str:
    """``solution`` with a junk span (3-6 random letters and symbols) inserted at a word boundary (before or after a
    space or line break, or at either end). Drawn again until difflib sees exactly the inserted characters as the
    difference (:func:`planted_spans`), so the planted span is the junk itself."""
    boundaries = [index for index in range(len(solution) + 1)
                  if index in (0, len(solution)) or solution[index - 1].isspace() or solution[index].isspace()]
    for _ in range(1000):
        position = rng.choice(boundaries)
        junk = "".join(rng.choice(_JUNK_CHARACTERS) for _ in range(rng.randint(*_JUNK_LENGTHS)))
        noisy = solution[:position] + junk + solution[position:]
        if planted_spans(solution, noisy) == [[position, position + len(junk)]]:
            return noisy
    raise RuntimeError(f"Could not plant a junk span that difflib recovers in {solution!r}.")  # never seen


def _check_noise(noise_share: float, noise_kinds: Sequence[str]) -> tuple[str, ...]:
    """The distinct noise kinds, in order, after checking the options (ValueError naming the bad one)."""
    if isinstance(noise_share, bool) or not isinstance(noise_share, (int, float)) or not 0 <= noise_share <= 1:
        raise ValueError(f"noise_share must be a number in [0, 1], got {noise_share!r}.")
    if isinstance(noise_kinds, str):
        noise_kinds = [noise_kinds]
    for kind in noise_kinds:
        _check_choice("noise kind", kind, NOISE_KINDS)
    if not noise_kinds:
        raise ValueError(f"noise_kinds is empty; give one or more of {', '.join(map(repr, NOISE_KINDS))}.")
    return tuple(dict.fromkeys(noise_kinds))


def load_noisy_arithmetic(
    split: str = "train",
    num_examples: int = 1000,
    difficulty: str = "easy",
    seed: int = 0,
    noise_share: float = 0.3,
    noise_kinds: Sequence[str] = NOISE_KINDS,
) -> Dataset:
    """Load the noisy arithmetic task (module docstring): columns ``prompt``, ``completion``, ``planted_spans``,
    ``noise_kind``.

    Args:
        split: ``"train"`` (noisy), ``"test"`` (clean: the arithmetic task's test questions) or ``"clean"`` (a
            clean split for a reference model); no question is in two of them.
        num_examples: number of rows.
        difficulty: ``"easy"``, ``"medium"`` or ``"hard"`` (as the arithmetic task).
        seed: the same seed gives the same rows, in any process.
        noise_share: share of the train rows with planted noise, in [0, 1]: exactly ``round(noise_share ×
            num_examples)`` rows (halves round up). Ignored (0) for the test and clean splits.
        noise_kinds: the kinds drawn from for each noisy row: ``"wrong_step"`` and/or ``"junk"``.
    """
    _check_choice("split", split, SPLITS)
    kinds = _check_noise(noise_share, noise_kinds)
    problems = draw_problems(num_examples, difficulty, seed, lambda question: noisy_split_of(question) == split, split)
    share = noise_share if split == "train" else 0.0
    rng = random.Random(f"noisy_arithmetic:{seed}:{split}")
    noisy_rows = sorted(rng.sample(range(len(problems)), math.floor(share * len(problems) + 0.5)))
    kind_of = {row: rng.choice(kinds) for row in noisy_rows}
    rows = []
    for index, problem in enumerate(problems):
        clean, kind = problem.solution, kind_of.get(index, "none")
        # seeded by the question, so a row's noise does not depend on its position or on the other rows
        noise_rng = random.Random(f"noisy_arithmetic:{seed}:{kind}:{problem.question}")
        if kind == "wrong_step":
            text = wrong_step_solution(problem, noise_rng)
        elif kind == "junk":
            text = junk_solution(clean, noise_rng)
        else:
            text = clean
        rows.append({
            "prompt": build_prompt(problem.question),
            "completion": [{"role": "assistant", "content": text}],
            "planted_spans": planted_spans(clean, text),
            "noise_kind": kind,
        })
    return Dataset.from_list(rows, features=FEATURES)


# ---------------------------------------------------------------------------------------------------
# Per-token ground truth, aligned to SFTTrainer's tokens
# ---------------------------------------------------------------------------------------------------


def tokenize_like_sft(example: dict[str, Any], tokenizer, completion_only_loss: bool = True) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of a conversational prompt-completion ``example`` exactly as TRL 1.16's
    ``SFTTrainer._prepare_dataset`` gives them before truncation (its ``tokenize_fn``, then ``build_labels``): the
    prompt alone (with the generation prompt) and ``prompt + completion`` through the chat template, the ``tools``
    and ``chat_template_kwargs`` columns honoured; the completion starts where the two token lists first differ;
    labels are -100 before it with ``completion_only_loss`` (TRL's default for prompt-completion data), else the
    ids. ``assistant_only_loss`` (an ``assistant_masks`` column) is not mirrored."""
    if "prompt" not in example or "completion" not in example or not is_conversational(example):
        raise ValueError("tokenize_like_sft needs a conversational prompt-completion example (lists of role/content "
                         f"messages in 'prompt' and 'completion'), got {str(example.get('prompt'))[:80]!r}.")
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    template_kwargs = {"tools": tools, **example.get("chat_template_kwargs", {})}
    prompt_ids = _tokenize(tokenizer, example["prompt"], add_generation_prompt=True, **template_kwargs)["input_ids"]
    ids = list(_tokenize(tokenizer, example["prompt"] + example["completion"], **template_kwargs)["input_ids"])
    prompt_length = common_prefix_length(prompt_ids, ids)
    labels = [-100] * prompt_length + ids[prompt_length:] if completion_only_loss else list(ids)
    return {"input_ids": ids, "labels": labels}


def planted_label_mask(tokenizer, input_ids: Sequence[int], labels: Sequence[int], completion: Any,
                       planted_spans: Sequence[Sequence[int]]) -> list[int]:
    """1/0 for each labelled token (``labels != -100``, in order) of a tokenised row: 1 where the token's characters
    overlap a planted span (``[start, end)`` offsets in the completion's one assistant text, as the
    ``planted_spans`` column holds them).

    The tokens' characters are those of the decoded ``input_ids`` (:func:`~.token_columns.token_char_spans`); the
    assistant text is found in it, as :func:`~.token_columns.rule_weights` finds it, from the first labelled token
    on (after the prompt). ``input_ids`` must hold the whole assistant text (tokenised before truncation); a
    ``ValueError`` says when it does not."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    contents = message_texts(completion)
    if len(contents) != 1:
        raise ValueError(f"planted_label_mask needs a completion with one assistant text, got {len(contents)}.")
    labelled = [index for index, label in enumerate(labels) if label != -100]
    if not labelled:
        return []
    text, spans = token_char_spans(tokenizer, input_ids)
    start = text.find(contents[0], spans[labelled[0]][0])
    if start < 0:
        raise ValueError(f"planted_label_mask: the assistant's text {contents[0][:60]!r} is not in the tokenised "
                         "sequence after its first labelled token (a truncated sequence?).")
    planted = [(start + low, start + high) for low, high in planted_spans]
    return [int(any(begin < high and end > low for low, high in planted))
            for begin, end in (spans[index] for index in labelled)]


def planted_label_masks(dataset: Dataset, tokenizer,
                        completion_only_loss: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    """``(masks, ids)``: for each row of ``dataset`` (rows with ``planted_spans``), :func:`planted_label_mask` of its
    labelled tokens and its ``input_ids``, as :func:`tokenize_like_sft` gives them (before truncation). The masks are
    the ground truth a token signal's weights are scored against; the ids tell which of a trainer's rows is which."""
    masks, ids = [], []
    for example in dataset:
        tokens = tokenize_like_sft(example, tokenizer, completion_only_loss)
        masks.append(planted_label_mask(tokenizer, tokens["input_ids"], tokens["labels"], example["completion"],
                                        example["planted_spans"]))
        ids.append(tokens["input_ids"])
    return masks, ids


def oracle_weights(example: dict[str, Any], tokenizer, completion_only_loss: bool = True) -> list[float]:
    """One weight per token SFTTrainer labels in ``example`` (a row with ``planted_spans``), before truncation: 0.0
    at the tokens that overlap a planted span, 1.0 elsewhere (:func:`tokenize_like_sft`,
    :func:`planted_label_mask`)."""
    tokens = tokenize_like_sft(example, tokenizer, completion_only_loss)
    mask = planted_label_mask(tokenizer, tokens["input_ids"], tokens["labels"], example["completion"],
                              example["planted_spans"])
    return [0.0 if planted else 1.0 for planted in mask]


def oracle_weights_column(dataset: Dataset, tokenizer, column: str = "token_weights",
                          completion_only_loss: bool = True, num_proc: int | None = None) -> Dataset:
    """``dataset`` (rows with ``planted_spans``) with a ``column`` of :func:`oracle_weights`: the ``weights`` token
    signal's input (``token_signals: [weights]``, ``weights_column: token_weights``), an oracle noise filter. Give
    the tokenizer the trainer uses, and TRL's ``completion_only_loss`` if it is set to False."""
    return dataset.map(lambda example: {column: oracle_weights(example, tokenizer, completion_only_loss)},
                       num_proc=num_proc, desc=f"Oracle weights ({column})")
