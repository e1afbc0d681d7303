"""Offline arithmetic word problems with a verifiable integer answer.

A small task that needs no hub access: templated story problems (fruit, savings, a shop, a reading list,
a bus, a collection, a bakery) with varied names and objects, solved by a short chain of integer
operations. Everything is deterministic from a seed, across processes and Python runs (only
`random.Random` with an integer seed and `hashlib` are used, never the salted `hash()`).

Difficulties:

- `easy`: one `+` or `-` step, numbers of 1-2 digits (2..99).
- `medium`: 1-2 steps, 2-digit numbers (10..99), may include `×` by a 1-digit number (2..9).
- `hard`: 2-3 steps, numbers up to 3 digits (10..999), with `+`, `-` and `×` by a 1-digit number.

Every intermediate result and every answer is a positive integer.

The train/test split is a stable hash of the question text: a question belongs to exactly one split,
whatever the seed, sizes or difficulty, so the two splits never share a question.

Each problem renders a worked solution with one line per step and a final answer line:

    23 + 45 = 68
    The answer is 68.

`load_arithmetic` returns a `datasets.Dataset` in one of TRL's conversational formats:

- `fmt="sft"` (prompt-completion): `prompt`, `completion`.
- `fmt="prompt"` (GRPO, evaluation, sampling): `prompt`, `question`, `answer`, `solution` (the reference).
- `fmt="preference"` (DPO, synthetic pairs): `prompt`, `chosen`, `rejected`, `answer`, where `rejected`
  is the same solution with one step's result off by a small amount, propagated to a wrong answer.
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from datasets import Dataset

__all__ = [
    "DIFFICULTIES",
    "FORMATS",
    "INSTRUCTION",
    "SPLITS",
    "ArithmeticProblem",
    "Ref",
    "Step",
    "build_instruction",
    "build_prompt",
    "draw_problems",
    "generate_problems",
    "load_arithmetic",
]

SPLITS = ("train", "test")
FORMATS = ("sft", "prompt", "preference")
DIFFICULTIES = ("easy", "medium", "hard")

# Fraction of all possible questions that belong to the test split (by a stable hash of the text).
TEST_FRACTION = 0.2

INSTRUCTION = (
    "Solve the following math problem step by step. Write one calculation per line, "
    'and finish with the line "The answer is <number>."'
)


def build_instruction(question: str) -> str:
    """Return the user message text for `question`: the instruction, a blank line, then the question."""
    return f"{INSTRUCTION}\n\n{question}"


def build_prompt(question: str) -> list[dict[str, str]]:
    """Return the conversational prompt for `question`: a single user message."""
    return [{"role": "user", "content": build_instruction(question)}]


# ---------------------------------------------------------------------------------------------------
# Solution chains
# ---------------------------------------------------------------------------------------------------

OPERATIONS = {"+": operator.add, "-": operator.sub, "×": operator.mul}


@dataclass(frozen=True)
class Ref:
    """An operand that is the result of an earlier step, by index."""

    index: int


@dataclass(frozen=True)
class Step:
    """One line of a worked solution: `left op right`, each operand a literal or a `Ref`."""

    op: str
    left: int | Ref
    right: int | Ref


def _evaluate(steps: Sequence[Step], corrupt_at: int | None = None, delta: int = 0) -> list[int]:
    """Return the result of every step; with `corrupt_at`, that step's result is off by `delta`
    and later steps use the wrong value, as a solver who slipped once would."""
    results: list[int] = []
    for i, step in enumerate(steps):
        left, right = (results[x.index] if isinstance(x, Ref) else x for x in (step.left, step.right))
        results.append(OPERATIONS[step.op](left, right) + (delta if i == corrupt_at else 0))
    return results


def _render(steps: Sequence[Step], results: list[int]) -> str:
    """Render the steps with the given results, one line each, then the final answer line."""

    def value(x: int | Ref) -> int:
        return results[x.index] if isinstance(x, Ref) else x

    lines = [f"{value(s.left)} {s.op} {value(s.right)} = {r}" for s, r in zip(steps, results, strict=True)]
    return "\n".join([*lines, f"The answer is {results[-1]}."])


# Off-by-one and carry-style slips used for the rejected solutions.
_SLIPS = (-10, -2, -1, 1, 2, 10)


@dataclass(frozen=True)
class ArithmeticProblem:
    """A word problem with the chain of steps that solves it."""

    question: str
    steps: tuple[Step, ...]
    difficulty: str

    @property
    def answer(self) -> str:
        """The final result, as a string of digits."""
        return str(_evaluate(self.steps)[-1])

    @property
    def solution(self) -> str:
        """The worked solution: one line per step, ending with "The answer is <answer>."."""
        return _render(self.steps, _evaluate(self.steps))

    def wrong_solution(self, rng: random.Random) -> str:
        """A solution in which one step's result is off by a small slip that propagates to a wrong
        final answer. Every shown number stays non-negative. Each result feeds exactly one later step
        through `+`, `-` or `×` by a non-zero factor, so a slip always changes the final answer."""
        candidates = [(i, delta) for i in range(len(self.steps)) for delta in _SLIPS]
        rng.shuffle(candidates)
        # Slipping the last step by +1 always qualifies, so a candidate is always found.
        results = next(
            results
            for results in (_evaluate(self.steps, i, delta) for i, delta in candidates)
            if min(results) >= 0
        )
        return _render(self.steps, results)

    def to_dict(self) -> dict[str, str]:
        """The example as plain fields: `question`, `answer`, `solution`, `difficulty`."""
        return {
            "question": self.question,
            "answer": self.answer,
            "solution": self.solution,
            "difficulty": self.difficulty,
        }


# ---------------------------------------------------------------------------------------------------
# Stories
# ---------------------------------------------------------------------------------------------------

# (name, subject, object, possessive) pronouns.
_PEOPLE = (
    ("Ava", "she", "her", "her"),
    ("Ben", "he", "him", "his"),
    ("Chloe", "she", "her", "her"),
    ("Diego", "he", "him", "his"),
    ("Emma", "she", "her", "her"),
    ("Farid", "he", "him", "his"),
    ("Grace", "she", "her", "her"),
    ("Hiro", "he", "him", "his"),
    ("Isla", "she", "her", "her"),
    ("Jonas", "he", "him", "his"),
    ("Kemi", "she", "her", "her"),
    ("Liam", "he", "him", "his"),
    ("Mei", "she", "her", "her"),
    ("Noah", "he", "him", "his"),
    ("Olivia", "she", "her", "her"),
    ("Priya", "she", "her", "her"),
)


@dataclass(frozen=True)
class Story:
    """A story template. Sentences are format strings over `{n}` (an amount), `{k}` (a 1-digit
    multiplier), the person fields `{name} {he} {He} {him} {his} {His} {friend}`, and one value drawn
    from each entry of `fields`. Each event offers alternative phrasings, so that a story repeats
    a sentence only when it has used them all."""

    fields: dict[str, tuple[str, ...]]
    start: str
    start_groups: str
    add: tuple[str, ...]
    sub: tuple[str, ...]
    add_groups: tuple[str, ...]
    sub_groups: tuple[str, ...]
    question: str


_STORIES = (
    Story(
        fields={"thing": ("apples", "oranges", "pears", "plums", "lemons", "peaches"),
                "box": ("baskets", "bags", "crates")},
        start="{name} has {n} {thing}.",
        start_groups="{name} has {k} {box} with {n} {thing} in each.",
        add=(
            "{He} picks {n} more {thing}.",
            "{friend} gives {him} {n} {thing}.",
            "{He} buys {n} more {thing} at the market.",
        ),
        sub=(
            "{He} gives {n} {thing} to {friend}.",
            "{He} uses {n} {thing} to make juice.",
            "{He} sells {n} {thing}.",
        ),
        add_groups=("{He} buys {k} {box} with {n} {thing} in each.",),
        sub_groups=("{He} gives {n} {thing} to each of {k} neighbours.",),
        question="How many {thing} does {name} have now?",
    ),
    Story(
        fields={"chore": ("walking dogs", "mowing lawns", "washing cars", "babysitting"),
                "item": ("books", "tickets", "board games", "shirts")},
        start="{name} has saved {n} dollars.",
        start_groups="{name} saves {n} dollars a week for {k} weeks.",
        add=(
            "{He} earns {n} dollars {chore}.",
            "{His} grandmother gives {him} {n} dollars.",
            "{He} finds {n} dollars in an old coat.",
        ),
        sub=(
            "{He} spends {n} dollars on {item}.",
            "{He} pays {friend} back {n} dollars.",
            "{He} donates {n} dollars to an animal shelter.",
        ),
        add_groups=("{He} earns {n} dollars a day for {k} days {chore}.",),
        sub_groups=("{He} buys {k} {item} that cost {n} dollars each.",),
        question="How many dollars does {name} have now?",
    ),
    Story(
        fields={"shop": ("shop", "store", "market stall"),
                "thing": ("pencils", "notebooks", "toy cars", "candles", "mugs")},
        start="A {shop} has {n} {thing} in stock.",
        start_groups="A {shop} receives {k} boxes with {n} {thing} in each.",
        add=(
            "A delivery brings {n} more {thing}.",
            "The owner finds {n} more {thing} in the back.",
            "A supplier drops off {n} {thing}.",
        ),
        sub=(
            "Customers buy {n} {thing}.",
            "The {shop} sells {n} {thing}.",
            "The owner sends {n} {thing} back to the factory.",
        ),
        add_groups=("A delivery brings {k} boxes with {n} {thing} in each.",),
        sub_groups=("Each of {k} customers buys {n} {thing}.",),
        question="How many {thing} does the {shop} have now?",
    ),
    Story(
        fields={"book": ("novel", "history book", "science textbook", "comic collection"),
                "day": ("Monday", "Tuesday", "Friday", "Saturday")},
        start="{name} has {n} pages left to read in {his} {book}.",
        start_groups="{name} has to read {k} chapters of {n} pages each.",
        add=(
            "{His} teacher adds {n} more pages to read.",
            "{friend} lends {him} a story of {n} pages to read too.",
            "{He} adds a magazine of {n} pages to {his} list.",
        ),
        sub=(
            "{He} reads {n} pages on {day}.",
            "{He} reads {n} pages on the train.",
            "{He} reads {n} pages before bed.",
        ),
        add_groups=("{His} teacher adds {k} more chapters of {n} pages each.",),
        sub_groups=("{He} reads {n} pages a day for {k} days.",),
        question="How many pages does {name} still have to read?",
    ),
    Story(
        fields={"vehicle": ("bus", "train", "tram")},
        start="A {vehicle} leaves the first stop with {n} passengers.",
        start_groups="An empty {vehicle} picks up {k} groups of {n} passengers.",
        add=(
            "At the next stop, {n} people get on.",
            "Then {n} more passengers get on.",
            "At the station, {n} commuters board.",
        ),
        sub=(
            "At the next stop, {n} people get off.",
            "Then {n} passengers get off.",
            "At the market, {n} shoppers leave the {vehicle}.",
        ),
        add_groups=("At the next stop, {k} groups of {n} tourists get on.",),
        sub_groups=("At the next stop, {k} groups of {n} students get off.",),
        question="How many passengers are on the {vehicle} now?",
    ),
    Story(
        fields={"thing": ("stickers", "marbles", "trading cards", "stamps", "seashells")},
        start="{name} has {n} {thing}.",
        start_groups="{name} buys {k} packs of {n} {thing}.",
        add=(
            "{friend} gives {him} {n} {thing}.",
            "{He} wins {n} {thing} in a game.",
            "{He} finds {n} {thing} at a flea market.",
        ),
        sub=(
            "{He} trades away {n} {thing}.",
            "{He} loses {n} {thing}.",
            "{He} gives {n} {thing} to {friend}.",
        ),
        add_groups=("{He} buys {k} packs of {n} {thing}.",),
        sub_groups=("{He} gives {n} {thing} to each of {k} friends.",),
        question="How many {thing} does {name} have now?",
    ),
    Story(
        fields={"thing": ("cookies", "muffins", "rolls", "cupcakes", "bagels")},
        start="A bakery has {n} {thing}.",
        start_groups="A baker makes {k} trays of {n} {thing}.",
        add=(
            "The baker makes {n} more {thing}.",
            "A second oven adds {n} {thing}.",
            "The baker finds {n} more {thing} in the freezer.",
        ),
        sub=(
            "Customers buy {n} {thing}.",
            "The bakery sells {n} {thing} to a cafe.",
            "A school orders {n} {thing}.",
        ),
        add_groups=("The baker bakes {k} more trays of {n} {thing}.",),
        sub_groups=("Each of {k} customers buys {n} {thing}.",),
        question="How many {thing} does the bakery have now?",
    ),
)


@dataclass(frozen=True)
class _Spec:
    """Sampling ranges for one difficulty."""

    min_steps: int
    max_steps: int
    low: int  # smallest amount
    high: int  # largest amount
    multiply: bool  # whether `× k` (k in 2..9) may appear


_SPECS = {
    "easy": _Spec(min_steps=1, max_steps=1, low=2, high=99, multiply=False),
    "medium": _Spec(min_steps=1, max_steps=2, low=10, high=99, multiply=True),
    "hard": _Spec(min_steps=2, max_steps=3, low=10, high=999, multiply=True),
}


def _generate_problem(rng: random.Random, difficulty: str) -> ArithmeticProblem:
    """Draw one problem: a story, a start quantity, then events until the step budget is used."""
    spec = _SPECS[difficulty]
    story = rng.choice(_STORIES)
    person, friend = rng.sample(_PEOPLE, 2)
    name, he, him, his = person
    context = {
        "name": name, "he": he, "He": he.capitalize(), "him": him, "his": his, "His": his.capitalize(),
        "friend": friend[0],
    }
    context |= {key: rng.choice(values) for key, values in story.fields.items()}

    def amount(high: int = spec.high) -> int:
        return rng.randint(spec.low, high)

    num_steps = rng.randint(spec.min_steps, spec.max_steps)
    steps: list[Step] = []
    if spec.multiply and rng.random() < 0.3:
        k, n = rng.randint(2, 9), amount()
        sentences = [story.start_groups.format(k=k, n=n, **context)]
        steps.append(Step("×", k, n))
        total: int | Ref = Ref(0)  # the current quantity, as an operand of the next step
        value = k * n  # and as a number
    else:
        n = amount()
        sentences = [story.start.format(n=n, **context)]
        total = value = n
    used: set[str] = set()  # phrasings already in the story, avoided while others remain

    while len(steps) < num_steps:
        kinds = ["add", "sub"]
        if spec.multiply and num_steps - len(steps) >= 2:
            kinds += ["add_groups", "sub_groups"]
        kind = rng.choice(kinds)
        k = rng.randint(2, 9)  # the multiplier of a group event
        # A subtraction must leave a positive quantity; when it cannot, the event becomes an addition.
        if kind == "sub" and value - 1 < spec.low:
            kind = "add"
        if kind == "sub_groups" and (value - 1) // k < spec.low:
            kind = "add_groups"
        if kind == "add":
            n = amount()
            steps.append(Step("+", total, n))
        elif kind == "sub":
            n = amount(min(spec.high, value - 1))
            steps.append(Step("-", total, n))
        else:
            n = amount() if kind == "add_groups" else amount(min(spec.high, (value - 1) // k))
            steps.append(Step("×", k, n))
            steps.append(Step("+" if kind == "add_groups" else "-", total, Ref(len(steps) - 1)))
        phrasings = getattr(story, kind)
        phrasing = rng.choice([p for p in phrasings if p not in used] or phrasings)
        used.add(phrasing)
        sentences.append(phrasing.format(k=k, n=n, **context))
        total = Ref(len(steps) - 1)
        value = _evaluate(steps)[-1]

    sentences.append(story.question.format(**context))
    return ArithmeticProblem(question=" ".join(sentences), steps=tuple(steps), difficulty=difficulty)


def _split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def _check_choice(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"Unknown {kind} {value!r}; expected one of {', '.join(map(repr, allowed))}.")


def generate_problems(
    num_examples: int, difficulty: str = "easy", split: str = "train", seed: int = 0
) -> list[ArithmeticProblem]:
    """Draw `num_examples` distinct problems of `split` and `difficulty`, deterministically from `seed`.

    Problems are drawn from one stream per seed; those whose question hashes to the other split, or
    repeats an earlier question, are skipped.
    """
    _check_choice("split", split, SPLITS)
    return draw_problems(num_examples, difficulty, seed, lambda question: _split_of(question) == split, split)


def draw_problems(
    num_examples: int, difficulty: str, seed: int, belongs: Callable[[str], bool], split_name: str
) -> list[ArithmeticProblem]:
    """Draw `num_examples` distinct problems of `difficulty` whose question `belongs` (to a split named
    `split_name` in errors), from the one problem stream of `seed`: those that do not belong, or repeat an
    earlier question, are skipped. :func:`generate_problems` is this with the train/test split's test."""
    _check_choice("difficulty", difficulty, DIFFICULTIES)
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}.")
    rng = random.Random(seed)
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    max_draws = 100 * num_examples + 1000
    for _ in range(max_draws):
        problem = _generate_problem(rng, difficulty)
        if problem.question not in seen and belongs(problem.question):
            seen.add(problem.question)
            problems.append(problem)
            if len(problems) == num_examples:
                return problems
    raise ValueError(
        f"Could only draw {len(problems)} distinct {difficulty!r} {split_name!r} problems of the "
        f"{num_examples} requested in {max_draws} draws."
    )


def load_arithmetic(
    split: str = "train", fmt: str = "sft", num_examples: int = 1000, difficulty: str = "easy", seed: int = 0
) -> Dataset:
    """Load the arithmetic task as a `datasets.Dataset` in one of TRL's conversational formats.

    Args:
        split: `"train"` or `"test"`; no question appears in both.
        fmt: `"sft"` (`prompt`, `completion`), `"prompt"` (`prompt`, `question`, `answer`, `solution`; for
            GRPO, evaluation and sampling) or `"preference"` (`prompt`, `chosen`, `rejected`, `answer`; for DPO).
        num_examples: number of rows.
        difficulty: `"easy"`, `"medium"` or `"hard"`.
        seed: the same seed gives the same rows, in any process.
    """
    _check_choice("fmt", fmt, FORMATS)
    problems = generate_problems(num_examples, difficulty=difficulty, split=split, seed=seed)
    rows = []
    for problem in problems:
        row = {"prompt": build_prompt(problem.question)}
        if fmt == "sft":
            row["completion"] = [{"role": "assistant", "content": problem.solution}]
        elif fmt == "prompt":
            row |= {"question": problem.question, "answer": problem.answer, "solution": problem.solution}
        else:
            # Seeded by the question, so a pair does not depend on its position in the dataset.
            slip_rng = random.Random(f"{seed}:{problem.question}")
            row |= {
                "chosen": [{"role": "assistant", "content": problem.solution}],
                "rejected": [{"role": "assistant", "content": problem.wrong_solution(slip_rng)}],
                "answer": problem.answer,
            }
        rows.append(row)
    return Dataset.from_list(rows)
