"""Rewards of ranked-list answers (Rank-GRPO, Zhu et al. 2025, arXiv 2510.20150): items, per-rank rewards, metrics.

An answer is a list of items, one per line, each ``Title (Year)`` (a leading ``1.``, ``1)``, ``-`` or ``*`` and a
trailing `` — note`` are allowed). :func:`parse_ranked_list` splits it into items, with their first character, for both the rewards and the
token spans (``tokens.ranks``): one parse, so the reward of rank k is always the reward of the tokens of rank k.

Rules (decided here; the released code's reward index skips lines that do not parse as ``Title (Year)`` while its
span index counts every line, so a malformed line shifted every later reward onto the wrong span):

- every non-blank line is an item and takes a rank; a line that does not parse (malformed, a preamble such as
  "Here are five films:") earns nothing at its rank and pushes the later items down, as it would for a reader;
- blank lines take no rank (their characters join the item before them), so a trailing newline does not open an
  overflow item and EOS belongs to the last item.

Per-rank gains (:func:`relevance_gains`, Rank-GRPO's ``hit_k``): 1 when the item parses, is in the catalog (when one
is given), is not one the user already has (``history``), is not a repeat of an earlier item, and is relevant (each
relevant item counts once); 0 otherwise. Causal credit (:func:`causal_rank_rewards`) turns gains into rewards:

    exp_inf    r_k = g_k                              a rank earns only its own hit (the released checkpoints)
    log_decay  r_k = Σ_{j=k}^{N} g_j / log2(j + 1)    DCG from rank k to N (1-based), nothing from earlier ranks

Metrics (:func:`recall_at_k`, :func:`ndcg_at_k`): Recall@k = hits in the top k / |relevant|;
NDCG@k = DCG@k / IDCG@k with DCG@k = Σ_{j≤k} g_j / log2(j + 1) and IDCG@k the DCG of min(|relevant|, k) hits.
:func:`ndcg_reward` and :func:`recall_reward` are the scalar rewards (TRL's signature) of a plain GRPO baseline.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..data.recommendation import catalog, item_text, normalize_title
from .math import completion_to_text

RANK_CREDITS = ("exp_inf", "log_decay")
# "Title (Year)", optionally numbered ("1.", "1)") or bulleted, optionally followed by " — note" (a dash and a note,
# as the task's candidate lines "Title (Year) — genre")
_ITEM = re.compile(
    r"^\s*(?:(?:\d+\s*[.)]|[-*\u2022])\s*)?(?P<title>.*?\S)\s*\((?P<year>\d{4})\)(?:\s+[-\u2013\u2014].*)?\s*$"
)


@dataclass(frozen=True)
class RankedItem:
    """One item of a ranked list: its text (one line, stripped of the newline) and its first character offset."""

    start: int
    text: str


ItemParser = Callable[[str], list[RankedItem]]


def parse_ranked_list(text: str) -> list[RankedItem]:
    """The items of a one-item-per-line answer (module docstring): every non-blank line, in order."""
    items, offset = [], 0
    for line in text.split("\n"):
        if line.strip():
            items.append(RankedItem(offset, line))
        offset += len(line) + 1
    return items


def get_item_parser(name: str | None) -> ItemParser:
    """:func:`parse_ranked_list` for None, else the function at ``package.module:function`` (text → ranked items
    with ascending starts), its answers checked by :func:`checked_items` on every call: a parser's wrong offsets
    would otherwise put every token of an answer on a wrong rank, silently."""
    if name is None:
        return parse_ranked_list
    module, _, attribute = name.partition(":")
    parser = getattr(importlib.import_module(module), attribute, None) if attribute else None
    if not callable(parser):
        raise ValueError(f"item parser {name!r} is not a callable 'package.module:function'")

    def checked_parser(text: str) -> list[RankedItem]:
        return checked_items(parser(text), text, name)

    return checked_parser


def checked_items(items, text: str, parser_name: str) -> list[RankedItem]:
    """``items`` (what the item parser ``parser_name`` returned for ``text``) as a list, if they are
    :class:`RankedItem` with an ``int`` start and a ``str`` text and their starts increase strictly inside ``text``
    (``0 <= start < len(text)``); otherwise a one-line ``ValueError`` naming the parser and what is wrong."""
    problem = None
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        problem = f"a {type(items).__name__}, not a list"
    elif not all(isinstance(item, RankedItem) for item in items):
        problem = f"items of type {sorted({type(item).__name__ for item in items} - {'RankedItem'})}"
    elif not all(type(item.start) is int and isinstance(item.text, str) for item in items):
        problem = "a RankedItem whose start is not an int or whose text is not a str"
    else:
        starts = [item.start for item in items]
        if any(not 0 <= start < len(text) for start in starts):
            problem = f"starts {starts} outside the text's characters 0..{len(text) - 1}"
        elif any(later <= earlier for earlier, later in zip(starts, starts[1:])):
            problem = f"starts {starts} that do not strictly increase"
    if problem is not None:
        raise ValueError(f"rank_item_parser {parser_name!r} returned {problem} for the answer {text[:60]!r}: it must "
                         "return a list of tokenweave.rewards.ranking.RankedItem(start, text), one per item in rank "
                         "order, with strictly increasing character offsets inside the answer; fix the parser.")
    return list(items)


def item_key(text: str) -> tuple[str, int] | None:
    """``(normalised title, year)`` of an item line ``Title (Year)`` (optionally numbered), None if it does not
    parse."""
    match = _ITEM.match(text)
    return None if match is None else (normalize_title(match["title"]), int(match["year"]))


def relevance_gains(
    items: Sequence[str],
    relevant: Iterable[str],
    history: Iterable[str] = (),
    catalog: set[tuple[str, int]] | None = None,
) -> list[float]:
    """Rank-GRPO's per-rank hits ``g_k`` (module docstring) of one answer's items (their texts, in rank order)."""
    remaining = {key for key in map(item_key, relevant) if key is not None}
    owned = {key for key in map(item_key, history) if key is not None}
    seen, gains = set(), []
    for text in items:
        key = item_key(text)
        hit = key is not None and key not in seen and key not in owned and key in remaining
        hit = hit and (catalog is None or key in catalog)
        if key is not None:
            seen.add(key)
        if hit:
            remaining.discard(key)
        gains.append(1.0 if hit else 0.0)
    return gains


def _discount(rank: int) -> float:
    """DCG's discount of 1-based ``rank``: 1 / log2(rank + 1)."""
    return 1.0 / math.log2(rank + 1)


def causal_rank_rewards(gains: Sequence[float], num_ranks: int, credit: str = "exp_inf") -> list[float]:
    """Per-rank rewards ``[num_ranks]`` from per-rank gains (module docstring; ranks past the answer's items gain 0,
    gains past ``num_ranks`` are overflow and count nowhere)."""
    if credit not in RANK_CREDITS:
        raise ValueError(f"rank credit must be one of {RANK_CREDITS}, got {credit!r}")
    padded = (list(gains) + [0.0] * num_ranks)[:num_ranks]
    if credit == "exp_inf":
        return padded
    rewards, suffix = [0.0] * num_ranks, 0.0
    for k in reversed(range(num_ranks)):
        suffix += padded[k] * _discount(k + 1)
        rewards[k] = suffix
    return rewards


def recall_at_k(gains: Sequence[float], num_relevant: int, k: int) -> float:
    """Recall@k: hits among the first ``k`` ranks over the number of relevant items (0 when there are none)."""
    return sum(gains[:k]) / num_relevant if num_relevant else 0.0


def ndcg_at_k(gains: Sequence[float], num_relevant: int, k: int) -> float:
    """NDCG@k with binary gains: DCG@k / IDCG@k, IDCG@k the DCG of min(num_relevant, k) hits (0 without any)."""
    ideal = sum(_discount(j + 1) for j in range(min(num_relevant, k)))
    return sum(g * _discount(j + 1) for j, g in enumerate(gains[:k])) / ideal if ideal else 0.0


def _list_gains(completions, relevant_items, history_items=None, list_length=None):
    """Per completion: ``(gains of its first list_length items, number of relevant items, list_length)``."""
    rows = []
    for i, completion in enumerate(completions):
        num_ranks = list_length[i] if isinstance(list_length, Sequence) else list_length
        items = [item.text for item in parse_ranked_list(completion_to_text(completion))]
        num_ranks = num_ranks or len(items) or 1
        history = history_items[i] if history_items is not None else ()
        gains = relevance_gains(items[:num_ranks], relevant_items[i], history)
        rows.append((gains, len(relevant_items[i]), num_ranks))
    return rows


def ndcg_reward(completions, relevant_items, history_items=None, list_length=None, **kwargs) -> list[float]:
    """NDCG@N of each answer (N: the row's ``list_length`` column, else the answer's own length); TRL's reward
    signature (columns ``relevant_items``, ``history_items``, ``list_length`` of the recommendation task)."""
    rows = _list_gains(completions, relevant_items, history_items, list_length)
    return [ndcg_at_k(gains, num_relevant, n) for gains, num_relevant, n in rows]


def recall_reward(completions, relevant_items, history_items=None, list_length=None, **kwargs) -> list[float]:
    """Recall@N of each answer, as :func:`ndcg_reward`."""
    rows = _list_gains(completions, relevant_items, history_items, list_length)
    return [recall_at_k(gains, num_relevant, n) for gains, num_relevant, n in rows]


def relevance_rank_gains(items, relevant_items, history_items=None, catalog=None, **columns) -> list[list[float]]:
    """:func:`relevance_gains` of each answer (``items``: each answer's item texts in rank order; the columns as
    TRL's reward functions get them, one entry per answer): the rank gain function ``relevance``."""
    return [
        relevance_gains(answer, relevant_items[i], history_items[i] if history_items is not None else (), catalog)
        for i, answer in enumerate(items)
    ]


def get_rank_gain_func(name: str) -> Callable[..., list[list[float]]]:
    """The gain function registered as ``name`` or at ``package.module:function``; ``ValueError`` otherwise."""
    if name in RANK_GAIN_FUNCS:
        return RANK_GAIN_FUNCS[name]
    module, _, attribute = name.partition(":")
    func = getattr(importlib.import_module(module), attribute, None) if attribute else None
    if not callable(func):
        raise ValueError(f"unknown rank gain function {name!r}; registered: {', '.join(sorted(RANK_GAIN_FUNCS))}, "
                         "or 'package.module:function'")
    return func


def checked_gains(gains, items: Sequence[Sequence[str]], func_name: str) -> list[list[float]]:
    """``gains`` (what the rank gain function ``func_name`` returned for the answers' ``items``) as lists of floats,
    if they are one sequence of real numbers per answer, one number per item; otherwise a one-line ``ValueError``
    naming the function and what is wrong."""
    problem = None
    if isinstance(gains, (str, bytes)) or not isinstance(gains, Sequence):
        problem = f"a {type(gains).__name__}, not a list"
    elif len(gains) != len(items):
        problem = f"{len(gains)} rows for {len(items)} answers"
    else:
        for index, (row, answer) in enumerate(zip(gains, items, strict=True)):
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                problem = f"a {type(row).__name__} for answer {index}"
            elif len(row) != len(answer):
                problem = f"{len(row)} gains for the {len(answer)} items of answer {index}"
            elif not all(isinstance(gain, numbers.Real) and math.isfinite(gain) for gain in row):
                problem = f"gains {list(row)!r} for answer {index}, not all finite numbers"
            if problem is not None:
                break
    if problem is not None:
        raise ValueError(f"rank_gain_func {func_name!r} returned {problem}: it must return one list of finite numbers "
                         "per answer, one gain per item in rank order; fix the gain function.")
    return [[float(gain) for gain in row] for row in gains]


def load_catalog(name: str | None) -> set[tuple[str, int]] | None:
    """The catalog items' keys (:func:`item_key`): ``recommendation`` (the built-in task's catalog) or a text file
    with one ``Title (Year)`` per line; None: no catalog check."""
    if name is None:
        return None
    if name == "recommendation":
        lines = [item_text(item) for item in catalog()]
    else:
        try:
            with open(name, encoding="utf-8") as handle:
                lines = [line for line in handle.read().splitlines() if line.strip()]
        except OSError as err:
            raise ValueError(f"cannot read the item catalog {name!r}: {err}") from err
    keys = {item_key(line) for line in lines}
    if None in keys:
        raise ValueError(f"the item catalog {name!r} has lines that are not 'Title (Year)'")
    return keys


def _bigrams(text: str) -> set[str]:
    text = normalize_title(text)
    return {text[i : i + 2] for i in range(len(text) - 1)}


def similarity_rank_gains(items, relevant_items, history_items=None, catalog=None, **columns) -> list[list[float]]:
    """A dense gain for models that rarely name a relevant item yet (the tiny CPU configs; as arithmetic's
    ``closeness``): 1 for a hit of :func:`relevance_gains`, else half the largest character-bigram Dice
    similarity 2|X ∩ Y| / (|X| + |Y|) between the item's line and a relevant item: the gain function
    ``similarity``."""
    gains = relevance_rank_gains(items, relevant_items, history_items, catalog)
    dense = []
    for i, answer in enumerate(items):
        targets = [_bigrams(item) for item in relevant_items[i]]
        row = []
        for text, hit in zip(answer, gains[i], strict=True):
            if hit or not targets:
                row.append(hit)
                continue
            line = _bigrams(text)
            row.append(max(2 * len(line & target) / (len(line) + len(target) or 1) for target in targets) * 0.5)
        dense.append(row)
    return dense


RANK_GAIN_FUNCS: dict[str, Callable[..., list[list[float]]]] = {"relevance": relevance_rank_gains, "similarity": similarity_rank_gains}
"""Per-rank gain functions by name: ``fn(items, catalog=..., **columns) -> [[g_1, ..., g_n], ...]`` (one list per
answer, one gain per parsed item), turned into rewards by :func:`causal_rank_rewards`."""
