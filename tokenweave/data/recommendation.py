"""Offline movie recommendation requests with a ranked-list answer, for Rank-GRPO.

A small task that needs no hub access. A fixed catalog of invented movies, each ``Title (Year)`` with a genre;
a request names a genre and a decade, shows three movies the user has already watched, and a shuffled list of
candidates. The model answers with a ranked list of ``list_length`` candidates, one per line, best first: the
kind of list answer Rank-GRPO (Zhu et al. 2025, "Rank-GRPO: Training LLM-based Conversational Recommender
Systems with Reinforcement Learning", arXiv:2510.20150) rewards rank by rank.

Everything is deterministic, across processes and Python runs: only ``random.Random`` seeded with a fixed
string (seeded through SHA-512, not the salted ``hash()``) and ``zlib.crc32`` are used.

The catalog
    240 movies: 8 genres (``GENRES``) × 6 decades (the 1970s to the 2020s, ``DECADES``) × 5 movies per
    (genre, decade) cell. A title is an adjective and a noun from fixed word lists, unique over the catalog
    (also after ``normalize_title``); a year is drawn inside its decade (1970..2023: the 2020s run to 2023).
    An item's canonical text is ``"Title (Year)"`` (``item_text``), unique over the catalog.

The hidden relevance rule (the ground truth; the prompt states the request in words, never labels)
    A candidate is relevant iff

        item.genre == wanted genre  and  wanted decade <= item.year <= wanted decade + 9  and  item not in history

    Relevance is binary. ``relevant_items`` lists the relevant candidates in a fixed preference order, newest
    first, then by normalised title (``preference_key``); the order only shapes the reference list.

A request
    - ``genre``, ``decade``: drawn uniformly.
    - history: 3 movies. ``h`` of them (uniform in 0..2) are from the requested (genre, decade) cell, so they
      match the request but are not relevant (already watched); the others are drawn uniformly from the rest
      of the catalog. Shown in the prompt in a shuffled order.
    - candidates: ``num_candidates`` distinct movies, shuffled:
        * ``r`` relevant ones, ``r`` uniform in 2..(5 - h) (the cell has 5 movies, ``h`` of them watched);
        * with probability 1/2, one history movie as a trap (one from the requested cell when the history
          has one, else any history movie);
        * the rest distractors, never history: same genre other decade, same decade other genre, and
          neither, dealt in turn (from a random first kind), each drawn uniformly from its pool.

The train/test split
    A request's split is a stable hash of (genre, decade, the set of history movies):
    ``zlib.crc32(key) % 5 == 0`` puts it in ``test`` (``TEST_FRACTION`` = 0.2), whatever the seed or sizes.
    Row ``i`` of a split is drawn from ``random.Random(f"{split}:{seed}:{i}")``: requests of the other split,
    or with the (genre, decade, history) of an earlier row, are redrawn. So no (genre, decade, history) —
    hence no full request — appears in both splits, rows within a split are distinct, and the same seed gives
    the same rows in any process (row ``i`` does not depend on ``num_examples``).

The reference list (``answer`` and the SFT completion)
    ``answer`` is the first ``list_length`` relevant items, one per line (fewer lines when fewer are relevant).
    The SFT completion always has exactly ``list_length`` lines: the relevant items, then, while lines are
    missing, the other candidates of the wanted genre, then those of the wanted decade, then the rest; each
    group in preference order. History movies (the trap) are never used, and no item repeats. This is why
    ``list_length <= num_candidates - 1``: at most one candidate is a history movie.

``load_recommendation`` returns a ``datasets.Dataset`` in one of TRL's conversational formats:

- ``fmt="prompt"`` (GRPO, evaluation, sampling): ``prompt``, ``relevant_items``, ``history_items``,
  ``candidate_items``, ``list_length``, ``answer``, ``genre``, ``decade``.
- ``fmt="sft"`` (prompt-completion): ``prompt``, ``completion``.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from datasets import Dataset, Features, List, Value

__all__ = [
    "DECADES",
    "FORMATS",
    "GENRES",
    "HISTORY_LENGTH",
    "ITEMS_PER_CELL",
    "MAX_CANDIDATES",
    "MAX_RELEVANT",
    "MIN_CANDIDATES",
    "MIN_RELEVANT",
    "SPLITS",
    "TEST_FRACTION",
    "Item",
    "RecommendationRequest",
    "build_instruction",
    "build_prompt",
    "catalog",
    "catalog_index",
    "decade_of",
    "find_item",
    "generate_requests",
    "is_relevant",
    "item_text",
    "load_recommendation",
    "normalize_title",
    "preference_key",
]

SPLITS = ("train", "test")
FORMATS = ("prompt", "sft")

GENRES = ("comedy", "drama", "horror", "sci-fi", "thriller", "romance", "animation", "documentary")
DECADES = (1970, 1980, 1990, 2000, 2010, 2020)
LAST_YEAR = 2023  # the 2020s of the catalog run from 2020 to 2023
ITEMS_PER_CELL = 5  # movies per (genre, decade)
HISTORY_LENGTH = 3
MAX_HISTORY_MATCHES = 2  # history movies from the requested (genre, decade) cell: 0..2
MIN_RELEVANT = 2
MAX_RELEVANT = ITEMS_PER_CELL  # reached only when no history movie is from the requested cell
DISTRACTOR_KINDS = ("genre", "decade", "other")  # same genre other decade; same decade other genre; neither
# Room for the most relevant items, a trap and one distractor of each kind.
MIN_CANDIDATES = MAX_RELEVANT + 1 + len(DISTRACTOR_KINDS)
MAX_CANDIDATES = 48  # keeps the prompt short, and each distractor pool large enough
TRAP_PROBABILITY = 0.5
# Fraction of all possible (genre, decade, history) requests that belong to the test split.
TEST_FRACTION = 0.2
_TEST_BUCKETS = 5  # crc32 % 5 == 0: test

_CATALOG_SEED = "tokenweave/recommendation/catalog/v1"

_ADJECTIVES = (
    "Amber", "Broken", "Burning", "Crimson", "Crystal", "Distant", "Electric", "Empty", "Endless", "Fallen",
    "Forgotten", "Frozen", "Gentle", "Golden", "Hidden", "Hollow", "Iron", "Last", "Lonely", "Lucky",
    "Midnight", "Neon", "Northern", "Paper", "Quiet", "Restless", "Rusty", "Scarlet", "Secret", "Silent",
    "Silver", "Sleeping", "Stolen", "Sudden", "Velvet", "Wandering", "Wicked", "Wild", "Winter", "Yellow",
)
_NOUNS = (
    "Anchor", "Avenue", "Balloon", "Canyon", "Carnival", "Circus", "Comet", "Compass", "Crown", "Desert",
    "Engine", "Feather", "Garden", "Harbor", "Horizon", "Island", "Kingdom", "Lantern", "Letter", "Machine",
    "Meadow", "Mirror", "Orchard", "Planet", "Promise", "Radio", "River", "Shadow", "Signal", "Sparrow",
    "Station", "Storm", "Summer", "Telescope", "Tower", "Valley", "Voyage", "Whisper", "Window", "Wolf",
)


# ---------------------------------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """A movie of the catalog."""

    title: str
    year: int
    genre: str


def item_text(item: Item) -> str:
    """The canonical text of ``item``: ``"Title (Year)"``, unique over the catalog."""
    return f"{item.title} ({item.year})"


def normalize_title(text: str) -> str:
    """``text`` casefolded, with runs of whitespace collapsed to one space and the ends stripped: the form in
    which titles (or canonical texts) are compared."""
    return " ".join(text.casefold().split())


def decade_of(year: int) -> int:
    """The decade a year lies in, as its first year: 1994 -> 1990."""
    return year - year % 10


def preference_key(item: Item) -> tuple[int, str]:
    """The sort key of the preference order among items: newest first, then by normalised title."""
    return (-item.year, normalize_title(item.title))


def is_relevant(item: Item, genre: str, decade: int, history: Iterable[Item]) -> bool:
    """The hidden relevance rule: the wanted genre, a year in the wanted decade, and not already watched."""
    return item.genre == genre and decade_of(item.year) == decade and item not in set(history)


@functools.cache
def catalog() -> tuple[Item, ...]:
    """The 240 movies of the catalog, ordered by genre (as in ``GENRES``), then decade, then year and title.

    Built from a fixed seed: the same in every process."""
    rng = random.Random(_CATALOG_SEED)
    cells = [(genre, decade) for genre in GENRES for decade in DECADES]
    pairs = [(adjective, noun) for adjective in _ADJECTIVES for noun in _NOUNS]
    titles = [f"{adjective} {noun}" for adjective, noun in rng.sample(pairs, len(cells) * ITEMS_PER_CELL)]
    items = []
    for index, (genre, decade) in enumerate(cells):
        cell_titles = titles[index * ITEMS_PER_CELL : (index + 1) * ITEMS_PER_CELL]
        years = [rng.randint(decade, min(decade + 9, LAST_YEAR)) for _ in cell_titles]
        cell = [Item(title, year, genre) for title, year in zip(cell_titles, years, strict=True)]
        items += sorted(cell, key=lambda item: (item.year, item.title))
    return tuple(items)


@functools.cache
def catalog_index() -> dict[str, Item]:
    """The catalog by canonical text (``item_text``): ``{"Title (Year)": Item}``. Do not mutate it."""
    return {item_text(item): item for item in catalog()}


@functools.cache
def _normalized_index() -> dict[str, Item]:
    return {normalize_title(text): item for text, item in catalog_index().items()}


def find_item(text: str) -> Item | None:
    """The catalog item whose canonical text equals ``text`` up to ``normalize_title``; None if there is none."""
    return _normalized_index().get(normalize_title(text))


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecommendationRequest:
    """One user request: the wanted genre and decade, the watched history and the shown candidates.

    ``history`` and ``candidates`` are in prompt order; ``relevant`` is the relevant candidates in preference
    order (``preference_key``)."""

    genre: str
    decade: int
    history: tuple[Item, ...]
    candidates: tuple[Item, ...]

    @property
    def relevant(self) -> tuple[Item, ...]:
        """The candidates the hidden rule marks relevant, newest first, then by title."""
        chosen = [item for item in self.candidates if is_relevant(item, self.genre, self.decade, self.history)]
        return tuple(sorted(chosen, key=preference_key))

    def ideal_list(self, list_length: int) -> tuple[Item, ...]:
        """``list_length`` distinct non-history candidates: the relevant ones, then the other candidates of the
        wanted genre, then those of the wanted decade, then the rest, each group in preference order."""
        history = set(self.history)
        rest = sorted((item for item in self.candidates if item not in history), key=preference_key)
        relevant = self.relevant
        groups = (
            relevant,
            [item for item in rest if item not in relevant and item.genre == self.genre],
            [item for item in rest if item.genre != self.genre and decade_of(item.year) == self.decade],
            [item for item in rest if item.genre != self.genre and decade_of(item.year) != self.decade],
        )
        ranked = [item for group in groups for item in group]
        if len(ranked) < list_length:
            raise ValueError(f"A request has only {len(ranked)} non-history candidates; list_length is {list_length}.")
        return tuple(ranked[:list_length])

    def split_key(self) -> str:
        """The text whose hash assigns the request to a split: genre, decade and the set of history movies."""
        history = sorted(item_text(item) for item in self.history)
        return "|".join([self.genre, str(self.decade), *history])


def _split_of(request: RecommendationRequest) -> str:
    """The split a request belongs to, from a stable hash of its genre, decade and history."""
    return "test" if zlib.crc32(request.split_key().encode("utf-8")) % _TEST_BUCKETS == 0 else "train"


def _decade_words(decade: int) -> str:
    return f"the {decade}s"


def build_instruction(request: RecommendationRequest, list_length: int) -> str:
    """The user message text: the request in words, the history and the candidates (one per line,
    ``Title (Year) — genre``), then the answer format."""
    article = "an" if request.genre[0] in "aeiou" else "a"

    def lines(items: Sequence[Item]) -> str:
        return "\n".join(f"{item_text(item)} — {item.genre}" for item in items)

    return (
        f"I would like to watch {article} {request.genre} movie from {_decade_words(request.decade)} "
        "that I have not seen yet.\n\n"
        f"Movies I have already watched:\n{lines(request.history)}\n\n"
        f"Candidates:\n{lines(request.candidates)}\n\n"
        f"Recommend exactly {list_length} movies from the candidates, best first. "
        "Write one movie per line as Title (Year), and nothing else."
    )


def build_prompt(request: RecommendationRequest, list_length: int) -> list[dict[str, str]]:
    """The conversational prompt for ``request``: a single user message."""
    return [{"role": "user", "content": build_instruction(request, list_length)}]


def _draw_request(rng: random.Random, num_candidates: int) -> RecommendationRequest:
    """Draw one request (see the module docstring for the recipe)."""
    genre = rng.choice(GENRES)
    decade = rng.choice(DECADES)
    cell = [item for item in catalog() if item.genre == genre and decade_of(item.year) == decade]
    outside = [item for item in catalog() if item not in cell]

    num_matches = rng.randint(0, MAX_HISTORY_MATCHES)
    watched_in_cell = rng.sample(cell, num_matches)
    history = watched_in_cell + rng.sample(outside, HISTORY_LENGTH - num_matches)
    rng.shuffle(history)

    unwatched_in_cell = [item for item in cell if item not in watched_in_cell]
    relevant = rng.sample(unwatched_in_cell, rng.randint(MIN_RELEVANT, len(unwatched_in_cell)))
    traps = []
    if rng.random() < TRAP_PROBABILITY:
        traps = [rng.choice(watched_in_cell or history)]

    pools = {
        "genre": [item for item in outside if item.genre == genre and item not in history],
        "decade": [item for item in outside if decade_of(item.year) == decade and item not in history],
        "other": [
            item for item in outside
            if item.genre != genre and decade_of(item.year) != decade and item not in history
        ],
    }
    for pool in pools.values():
        rng.shuffle(pool)
    distractors: list[Item] = []
    turn = rng.randrange(len(DISTRACTOR_KINDS))
    while len(relevant) + len(traps) + len(distractors) < num_candidates:
        pool = pools[DISTRACTOR_KINDS[turn % len(DISTRACTOR_KINDS)]]
        if pool:
            distractors.append(pool.pop())
        turn += 1
    candidates = relevant + traps + distractors
    rng.shuffle(candidates)
    return RecommendationRequest(genre, decade, tuple(history), tuple(candidates))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise a ValueError unless ``value`` is an int (not a bool) in ``low..high``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value}.")


def _check_choice(kind: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"Unknown {kind} {value!r}; expected one of {', '.join(map(repr, allowed))}.")


def _check_list_length(list_length: object, num_candidates: int) -> None:
    _check_int("list_length", list_length, 1)
    if list_length > num_candidates - 1:
        raise ValueError(
            f"list_length must be at most num_candidates - 1 = {num_candidates - 1} (one candidate may be a "
            f"movie the user has watched), got {list_length}."
        )


def generate_requests(
    num_examples: int, split: str = "train", seed: int = 0, num_candidates: int = 12
) -> list[RecommendationRequest]:
    """Draw ``num_examples`` requests of ``split``, deterministically from ``seed``.

    Row ``i`` comes from ``random.Random(f"{split}:{seed}:{i}")``, redrawn while the request hashes to the other
    split or repeats the (genre, decade, history) of an earlier row.
    """
    _check_choice("split", split, SPLITS)
    _check_int("num_examples", num_examples, 0)
    _check_int("num_candidates", num_candidates, MIN_CANDIDATES, MAX_CANDIDATES)
    _check_int("seed", seed, -(2**63))
    requests: list[RecommendationRequest] = []
    seen: set[str] = set()
    max_draws = 1000
    for index in range(num_examples):
        rng = random.Random(f"{split}:{seed}:{index}")
        for _ in range(max_draws):
            request = _draw_request(rng, num_candidates)
            if _split_of(request) == split and request.split_key() not in seen:
                break
        else:
            raise ValueError(f"Could not draw a new {split!r} request for row {index} in {max_draws} draws.")
        seen.add(request.split_key())
        requests.append(request)
    return requests


_MESSAGES = List({"role": Value("string"), "content": Value("string")})
_FEATURES = {
    "prompt": Features(
        {
            "prompt": _MESSAGES,
            "relevant_items": List(Value("string")),
            "history_items": List(Value("string")),
            "candidate_items": List(Value("string")),
            "list_length": Value("int64"),
            "answer": Value("string"),
            "genre": Value("string"),
            "decade": Value("int64"),
        }
    ),
    "sft": Features({"prompt": _MESSAGES, "completion": _MESSAGES}),
}


def load_recommendation(
    split: str = "train",
    num_examples: int = 1000,
    seed: int = 0,
    num_candidates: int = 12,
    list_length: int = 5,
    fmt: str = "prompt",
) -> Dataset:
    """Load the recommendation task as a ``datasets.Dataset`` in one of TRL's conversational formats.

    Args:
        split: ``"train"`` or ``"test"``; no (genre, decade, history) request appears in both.
        num_examples: number of rows (0 gives an empty dataset with the columns).
        seed: the same seed gives the same rows, in any process.
        num_candidates: candidates shown per request, ``MIN_CANDIDATES`` (9) to ``MAX_CANDIDATES`` (48).
        list_length: movies the model is asked for, 1 to ``num_candidates - 1``.
        fmt: ``"prompt"`` (GRPO, evaluation, sampling) or ``"sft"`` (``prompt``, ``completion``).

    Columns of ``fmt="prompt"``:
        ``prompt``: the user message (a one-message list). ``relevant_items``: canonical texts (``"Title
        (Year)"``) of the relevant candidates, in preference order (newest first, then title); 2 to 5 of them.
        ``history_items``: canonical texts of the 3 watched movies, in prompt order. ``candidate_items``:
        canonical texts of the ``num_candidates`` candidates, in prompt order. ``list_length``: the number of
        movies asked for. ``answer``: the first ``list_length`` relevant items, one per line. ``genre``,
        ``decade`` (e.g. ``1990``): the request.

    ``fmt="sft"``'s ``completion`` is an assistant message with ``list_length`` lines (the module docstring's
    filling rule).
    """
    _check_choice("fmt", fmt, FORMATS)
    _check_int("num_candidates", num_candidates, MIN_CANDIDATES, MAX_CANDIDATES)
    _check_list_length(list_length, num_candidates)
    requests = generate_requests(num_examples, split=split, seed=seed, num_candidates=num_candidates)
    rows = []
    for request in requests:
        row = {"prompt": build_prompt(request, list_length)}
        if fmt == "sft":
            ideal = "\n".join(item_text(item) for item in request.ideal_list(list_length))
            row["completion"] = [{"role": "assistant", "content": ideal}]
        else:
            relevant = [item_text(item) for item in request.relevant]
            row |= {
                "relevant_items": relevant,
                "history_items": [item_text(item) for item in request.history],
                "candidate_items": [item_text(item) for item in request.candidates],
                "list_length": list_length,
                "answer": "\n".join(relevant[:list_length]),
                "genre": request.genre,
                "decade": request.decade,
            }
        rows.append(row)
    features = _FEATURES[fmt]
    columns = {name: [row[name] for row in rows] for name in features}
    return Dataset.from_dict(columns, features=features)
