"""Saved runs describe themselves: the model card names the token-level method and cites its papers, ``run_info.json``
records the loss, policy loss and signals, ``run_config.yaml`` reproduces the run; and a split that a dataset does not
have is an error, not its training rows."""

import json

import pytest
import yaml
from datasets import Dataset

from tokenweave.config import parse_run_config
from tokenweave.data.loading import load_run_dataset
from tokenweave.models import public_model_id
from tokenweave.train import RUN_CONFIG_FILE, RUN_INFO_FILE, train
from tokenweave.losses.policy import HAPO_PAPER
from tokenweave.losses.preference import CDPO_PAPER, TDPO_PAPER

from .conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("tiny_model_cache", "one_torch_thread")

RUNS = {  # name: (config, extra flags, token method, loss_type, policy_loss, token signals, papers)
    "cdpo": ("cdpo_tiny.yaml", [], "cdpo", ["cdpo"], None, ["critical_tokens"], [CDPO_PAPER]),
    "tdpo2": ("tdpo_tiny.yaml", [], "tdpo2", ["tdpo2"], None, [], [TDPO_PAPER]),
    "hapo": ("hapo_tiny.yaml", [], "hapo", "dapo", "hapo", ["hapo"], [HAPO_PAPER]),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_saved_run_names_its_method(name, tmp_path, scored_pairs):
    config, extra, method, loss_type, policy_loss, signals, papers = RUNS[name]
    output_dir = tmp_path / name
    argv = ["--config", str(CONFIGS / config), "--output_dir", str(output_dir), "--max_steps", "1", *extra]
    if name == "cdpo":
        argv += ["--dataset_name", scored_pairs]
    info = train(argv + ["--learning-rate", "0.002"])

    card = (output_dir / "README.md").read_text()
    assert f"trained with {method} (tokenweave" in card
    front_matter = yaml.safe_load(card.split("---")[1])
    assert {"tokenweave", method} <= set(front_matter["tags"])
    for paper in papers:
        assert f"eprint        = {{{paper.arxiv}}}" in card
    assert "## tokenweave method options" in card

    saved = json.loads((output_dir / RUN_INFO_FILE).read_text())
    assert saved == json.loads(json.dumps(info, default=str))
    assert (saved["token_method"], saved["loss_type"], saved["policy_loss"], saved["token_signals"]) == (
        method, loss_type, policy_loss, signals)
    assert saved["papers"] == [f"arXiv:{paper.arxiv}" for paper in papers]

    # the run config: the file's keys and the flags, parsed; it parses to the same configs
    run_config = yaml.safe_load((output_dir / RUN_CONFIG_FILE).read_text())
    assert run_config["learning_rate"] == 0.002 and run_config["max_steps"] == 1  # flags, by name and with dashes
    assert run_config["output_dir"] == str(output_dir)
    again = parse_run_config(["--config", str(output_dir / RUN_CONFIG_FILE)])
    original = parse_run_config(argv + ["--learning-rate", "0.002"])
    for parsed, expected in zip(again, original):
        assert parsed == expected


def test_the_card_of_a_smollm2_run_names_its_public_model_id(tmp_path, monkeypatch):
    from tokenweave.models import cache_dir

    assert public_model_id("smollm2-135m") == public_model_id(str(cache_dir() / "SmolLM2-135M-Instruct"))
    assert public_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_model_id("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert public_model_id("tiny-llama") is None and public_model_id(str(tmp_path)) is None


def test_a_split_that_a_single_dataset_does_not_have_is_an_error(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}] * 4
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert len(load_run_dataset(str(tmp_path / "single"), "train", "grpo")) == 4
    with pytest.raises(ValueError, match="no split 'test': it is a single dataset"):
        load_run_dataset(str(tmp_path / "single"), "test", "grpo")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train'\]"):
        load_run_dataset(str(tmp_path / "rows.jsonl"), "test", "grpo")
