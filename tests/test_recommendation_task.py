"""Tests for the offline recommendation task (ranked-list answers for Rank-GRPO).

The relevance rule is recomputed here from the catalog, independently of the module's own ``is_relevant``.
"""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

from tokenweave.data.arithmetic import load_arithmetic
from tokenweave.data import BUILTIN_TASKS
from tokenweave.data.loading import load_run_dataset
from tokenweave.data.recommendation import (
    GENRES,
    MAX_CANDIDATES,
    MIN_CANDIDATES,
    Item,
    catalog,
    catalog_index,
    find_item,
    generate_requests,
    item_text,
    load_recommendation,
    normalize_title,
)

from .conftest import REPO_ROOT

PROMPT_COLUMNS = {
    "prompt", "relevant_items", "history_items", "candidate_items", "list_length", "answer", "genre", "decade",
}
CANONICAL = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+ \((19[7-9]\d|20[0-2]\d)\)")


def rule(text: str, genre: str, decade: int, history: list[str]) -> bool:
    """The hidden rule, written out again: the genre, a year in the decade, not watched."""
    item = catalog_index()[text]
    return item.genre == genre and decade <= item.year <= decade + 9 and text not in history


@pytest.fixture(scope="module")
def train_rows():
    return load_recommendation("train", num_examples=600, seed=0).to_list()


# --------------------------------------------------------------------------------------------------
# The catalog
# --------------------------------------------------------------------------------------------------


def test_catalog_is_fixed_unique_and_covers_every_cell():
    items = catalog()
    assert len(items) == 240 and all(isinstance(item, Item) for item in items)
    texts = [item_text(item) for item in items]
    assert len(set(texts)) == 240
    assert len({normalize_title(item.title) for item in items}) == 240
    assert all(CANONICAL.fullmatch(text) for text in texts), texts[:5]
    assert all(1970 <= item.year <= 2023 for item in items)
    assert {item.genre for item in items} == set(GENRES) and len(GENRES) == 8
    cells = collections.Counter((item.genre, item.year // 10 * 10) for item in items)
    assert len(cells) == 8 * 6 and set(cells.values()) == {5}
    assert catalog_index() == dict(zip(texts, items, strict=True))
    assert catalog() is items  # cached


def test_normalize_title_and_find_item():
    assert normalize_title("  Silent \t Harbor\n(1994) ") == "silent harbor (1994)"
    item = catalog()[17]
    assert find_item(item_text(item)) == item
    assert find_item("  " + item_text(item).upper().replace(" ", "   ")) == item
    assert find_item(f"{item.title} ({item.year + 1})") is None  # titles are unique: a wrong year matches nothing
    assert find_item("Not A Movie (1999)") is None


def test_catalog_is_the_same_in_another_process():
    code = (
        "import json\n"
        "from tokenweave.data.recommendation import catalog, item_text\n"
        "print(json.dumps([[item_text(i), i.genre] for i in catalog()]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    output = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout
    assert json.loads(output) == [[item_text(i), i.genre] for i in catalog()]


# --------------------------------------------------------------------------------------------------
# Determinism and splits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["prompt", "sft"])
def test_same_seed_gives_identical_rows(fmt):
    first = load_recommendation("train", num_examples=40, seed=3, fmt=fmt)
    second = load_recommendation("train", num_examples=40, seed=3, fmt=fmt)
    assert first.to_list() == second.to_list()
    # Row i does not depend on how many rows are asked for.
    assert load_recommendation("train", num_examples=10, seed=3, fmt=fmt).to_list() == first.to_list()[:10]


def test_different_seeds_give_different_rows():
    first = load_recommendation("train", num_examples=50, seed=0)
    second = load_recommendation("train", num_examples=50, seed=1)
    first_prompts = {row[0]["content"] for row in first["prompt"]}
    second_prompts = {row[0]["content"] for row in second["prompt"]}
    assert len(first_prompts & second_prompts) < 3


def test_deterministic_across_python_runs():
    """String hashing is salted per process: a different PYTHONHASHSEED must not change the rows."""
    code = (
        "import json\n"
        "from tokenweave.data.recommendation import load_recommendation\n"
        "print(json.dumps(load_recommendation('test', num_examples=20, seed=5).to_list()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    output = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout
    assert json.loads(output) == load_recommendation("test", num_examples=20, seed=5).to_list()


def request_key(row) -> tuple:
    return (row["genre"], row["decade"], frozenset(row["history_items"]))


def test_train_and_test_requests_are_disjoint(train_rows):
    test_rows = load_recommendation("test", num_examples=300, seed=0).to_list()
    other_seed_test = load_recommendation("test", num_examples=300, seed=1).to_list()
    train_keys = {request_key(row) for row in train_rows}
    test_keys = {request_key(row) for row in test_rows} | {request_key(row) for row in other_seed_test}
    assert len(train_keys) == len(train_rows)  # distinct within a split
    assert len({request_key(row) for row in test_rows}) == len(test_rows)
    assert not train_keys & test_keys
    train_prompts = {row["prompt"][0]["content"] for row in train_rows}
    assert not train_prompts & {row["prompt"][0]["content"] for row in test_rows + other_seed_test}


# --------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------


def test_columns_and_prompt_format(train_rows):
    dataset = load_recommendation("train", num_examples=3)
    assert set(dataset.column_names) == PROMPT_COLUMNS
    for row in train_rows:
        prompt = row["prompt"]
        assert len(prompt) == 1 and prompt[0]["role"] == "user"
        assert row["list_length"] == 5
        assert row["genre"] in GENRES and row["decade"] in (1970, 1980, 1990, 2000, 2010, 2020)


def test_relevant_items_follow_the_rule_and_no_other_candidate_does(train_rows):
    for row in train_rows:
        genre, decade, history = row["genre"], row["decade"], row["history_items"]
        text = row["prompt"][0]["content"]
        assert f" {genre} movie from the {decade}s " in text
        expected = [c for c in row["candidate_items"] if rule(c, genre, decade, history)]
        assert set(row["relevant_items"]) == set(expected)
        assert len(row["relevant_items"]) == len(expected)
        for candidate in row["candidate_items"]:
            assert rule(candidate, genre, decade, history) == (candidate in row["relevant_items"])
        # Preference order: newest first, then title.
        relevant = [catalog_index()[c] for c in row["relevant_items"]]
        assert relevant == sorted(relevant, key=lambda i: (-i.year, normalize_title(i.title)))
        assert row["answer"] == "\n".join(row["relevant_items"][: row["list_length"]])


def test_relevant_counts_traps_and_distractors(train_rows):
    counts = collections.Counter(len(row["relevant_items"]) for row in train_rows)
    assert set(counts) == {2, 3, 4, 5}, counts
    traps = near_genre = near_decade = history_matches = 0
    for row in train_rows:
        candidates = [catalog_index()[c] for c in row["candidate_items"]]
        history = set(row["history_items"])
        trapped = [c for c in row["candidate_items"] if c in history]
        assert len(trapped) <= 1
        traps += bool(trapped)
        near_genre += any(i.genre == row["genre"] and i.year // 10 * 10 != row["decade"] for i in candidates)
        near_decade += any(i.genre != row["genre"] and i.year // 10 * 10 == row["decade"] for i in candidates)
        history_matches += any(
            catalog_index()[h].genre == row["genre"] and catalog_index()[h].year // 10 * 10 == row["decade"]
            for h in history
        )
    n = len(train_rows)
    assert 0.35 * n < traps < 0.65 * n
    assert near_genre == n and near_decade == n
    assert 0.5 * n < history_matches < 0.8 * n  # 0, 1 or 2 of the 3 from the requested cell


@pytest.mark.parametrize("num_candidates", [MIN_CANDIDATES, 12, MAX_CANDIDATES])
def test_candidates_are_distinct_catalog_items(num_candidates):
    rows = load_recommendation("train", num_examples=60, seed=2, num_candidates=num_candidates).to_list()
    for row in rows:
        candidates = row["candidate_items"]
        assert len(candidates) == num_candidates == len(set(candidates))
        assert all(c in catalog_index() for c in candidates)
        assert len(row["history_items"]) == len(set(row["history_items"])) == 3
        assert all(h in catalog_index() for h in row["history_items"])
        assert 2 <= len(row["relevant_items"]) <= 5


def test_prompt_shows_every_candidate_and_history_item(train_rows):
    for row in train_rows:
        text = row["prompt"][0]["content"]
        watched, shown = text.split("Movies I have already watched:\n")[1].split("\n\nCandidates:\n")
        shown = shown.split("\n\n")[0]
        lines = lambda texts: [f"{t} — {catalog_index()[t].genre}" for t in texts]  # noqa: E731
        assert watched.split("\n") == lines(row["history_items"])
        assert shown.split("\n") == lines(row["candidate_items"])
        assert f"exactly {row['list_length']} movies" in text
        assert "relevant" not in text.casefold()


def test_candidate_order_is_shuffled(train_rows):
    """The relevant items are not always first (or last) in the shown list."""
    first_is_relevant = sum(row["candidate_items"][0] in row["relevant_items"] for row in train_rows)
    assert 0.1 * len(train_rows) < first_is_relevant < 0.5 * len(train_rows)


@pytest.mark.parametrize("list_length", [1, 3, 5, 8, 11])
def test_sft_completion_is_a_valid_ideal_list(list_length):
    sft = load_recommendation("train", num_examples=80, seed=4, list_length=list_length, fmt="sft").to_list()
    rows = load_recommendation("train", num_examples=80, seed=4, list_length=list_length).to_list()
    assert len(sft) == len(rows) == 80
    for example, row in zip(sft, rows, strict=True):
        assert example["prompt"] == row["prompt"]
        (message,) = example["completion"]
        assert message["role"] == "assistant"
        lines = message["content"].split("\n")
        assert len(lines) == list_length == len(set(lines))
        assert not set(lines) & set(row["history_items"])
        assert set(lines) <= set(row["candidate_items"])
        relevant = row["relevant_items"][:list_length]
        assert lines[: len(relevant)] == relevant
        # Filling: the wanted genre before the others.
        fill = [catalog_index()[line] for line in lines[len(relevant):]]
        same_genre = [item.genre == row["genre"] for item in fill]
        assert same_genre == sorted(same_genre, reverse=True)


def test_generate_requests_matches_rows():
    requests = generate_requests(5, "test", seed=9)
    rows = load_recommendation("test", num_examples=5, seed=9).to_list()
    for request, row in zip(requests, rows, strict=True):
        assert [item_text(i) for i in request.candidates] == row["candidate_items"]
        assert [item_text(i) for i in request.relevant] == row["relevant_items"]


# --------------------------------------------------------------------------------------------------
# Arguments and loading for a run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "validation"}, "split"),
        ({"fmt": "preference"}, "fmt"),
        ({"num_examples": -1}, "num_examples"),
        ({"num_examples": 2.5}, "num_examples"),
        ({"num_examples": True}, "num_examples"),
        ({"num_candidates": MIN_CANDIDATES - 1}, "num_candidates"),
        ({"num_candidates": MAX_CANDIDATES + 1}, "num_candidates"),
        ({"list_length": 0}, "list_length"),
        ({"list_length": 12}, "list_length"),
        ({"list_length": "5"}, "list_length"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_recommendation(**{"num_examples": 3, **kwargs})


def test_zero_examples_give_an_empty_dataset_with_the_columns():
    empty = load_recommendation(num_examples=0)
    assert len(empty) == 0 and set(empty.column_names) == PROMPT_COLUMNS
    assert load_recommendation(num_examples=0, fmt="sft").column_names == ["prompt", "completion"]


def test_load_run_dataset_builds_the_task():
    assert "recommendation" in BUILTIN_TASKS
    grpo = load_run_dataset("recommendation", "train", "grpo", num_examples=7)
    assert len(grpo) == 7 and set(grpo.column_names) == PROMPT_COLUMNS
    assert grpo.to_list() == load_recommendation("train", num_examples=7).to_list()
    sft = load_run_dataset("recommendation", "test", "sft", num_examples=4, seed=2, difficulty="hard")
    assert sft.to_list() == load_recommendation("test", num_examples=4, seed=2, fmt="sft").to_list()
    with pytest.raises(ValueError, match="recommendation.*no format for method 'dpo'"):
        load_run_dataset("recommendation", "train", "dpo", num_examples=4)


def test_load_run_dataset_keeps_arithmetic():
    loaded = load_run_dataset("arithmetic", "train", "dpo", num_examples=5, difficulty="medium", seed=1)
    assert loaded.to_list() == load_arithmetic("train", "preference", 5, "medium", seed=1).to_list()
