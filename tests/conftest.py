"""Test set-up: offline hub, no telemetry, and shared helpers for runs of the tiny model."""

import os
import sys
from pathlib import Path

import pytest
import torch

from tokenweave.models import build_tiny_llama

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
LAUNCH = REPO_ROOT / "launch"
PYTHON = sys.executable


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama saved once per module, so every trainer (and TRL's reference model) loads the same weights."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build_tiny_llama()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model_cache(tmp_path_factory, monkeypatch):
    """Built-in models (``tiny-llama``) materialised in this session's temporary directory, not in ``~/.cache``."""
    monkeypatch.setenv("TOKENWEAVE_CACHE", str(tmp_path_factory.getbasetemp() / "tokenweave-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's matrices are small: on a shared 2-core machine, a second thread only adds waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def initial_weights():
    """The tiny Llama's initial state dict: what a trained run's saved weights must differ from."""
    return build_tiny_llama()[0].state_dict()


def prompt_and_completion_lengths(tokenizer, row, side):
    """Token counts of the prompt and of the ``side`` completion, as DPOTrainer tokenises them."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row[side])["input_ids"]
    assert full[: len(prompt)] == prompt  # the char tokenizer never merges across the boundary
    return len(prompt), len(full) - len(prompt)


def with_columns(dataset, tokenizer, chosen_values, rejected_values, names=("chosen_weights", "rejected_weights")):
    """Add per-completion-token columns; ``*_values(n, row_index)`` returns the n values of one row."""

    def add(row, index):
        _, num_chosen = prompt_and_completion_lengths(tokenizer, row, "chosen")
        _, num_rejected = prompt_and_completion_lengths(tokenizer, row, "rejected")
        return {names[0]: chosen_values(num_chosen, index), names[1]: rejected_values(num_rejected, index)}

    return dataset.map(add, with_indices=True)


@pytest.fixture(scope="session")
def scored_pairs(tmp_path_factory) -> str:
    """A cDPO dataset on disk: 32 arithmetic preference pairs with critical-token scores that vary from token to token
    and row to row (``(row + t) % 10 / 10``), one per completion token, as the critical-token pipeline writes them."""
    from tokenweave.data.arithmetic import load_arithmetic

    def scores(n, index):
        return [(index + t) % 10 / 10 for t in range(n)]

    dataset = with_columns(load_arithmetic("train", "preference", num_examples=32), build_tiny_llama()[1], scores,
                           scores, names=("chosen_scores", "rejected_scores"))
    path = tmp_path_factory.mktemp("scored-pairs")
    dataset.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_pair():
    """Two different random tiny models as positive and negative scoring models, and their tokenizer."""
    from tokenweave.inference.scoring import ScoringModel

    positive, tokenizer = build_tiny_llama(seed=0)
    negative, _ = build_tiny_llama(seed=1)
    return ScoringModel(positive.eval()), ScoringModel(negative.eval()), tokenizer
