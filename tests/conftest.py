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
