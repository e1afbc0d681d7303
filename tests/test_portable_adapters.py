"""A LoRA adapter trained on a built-in model loads on another machine: its ``adapter_config.json`` names the base by
public hub id (``smollm2-135m``) or built-in name (``tiny-llama``), never by this machine's cache path, and both
tokenweave's loader (which reads the built-in model the adapter was trained on from its sidecar file, whatever the
public id means on this machine) and, once the conversion is aliased in the hub cache (opt-in),
``AutoPeftModelForCausalLM`` find that base offline here.

"Another machine" is a copy of the adapter directory loaded after the tokenweave cache (``$TOKENWEAVE_CACHE``) was
moved away and, for the last test, with an empty hub cache too. SmolLM2's GGUF conversion is replaced by the tiny
model (seed 2) so that its path (public id, hub-cache registration) runs in a second.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tokenweave.inference.loading import load_model_and_tokenizer
from tokenweave.models import (
    SMOLLM2_PUBLIC_ID,
    build_tiny_llama,
    make_peft_model_portable,
    portable_base_model,
    adapter_base_model,
    alias_in_hub_cache,
    register_in_hub_cache,
    resolve_model,
)
from tokenweave.models import registry

IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """This test's own tokenweave cache and hub cache (offline), and SmolLM2's conversion replaced by a tiny model."""
    monkeypatch.setenv("TOKENWEAVE_CACHE", str(tmp_path / "tokenweave-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(registry, "_convert_smollm2",
                        lambda directory: registry._save_on_this_process(*build_tiny_llama(seed=2), directory))
    return tmp_path


def save_adapter(base_name: str, run_dir: Path) -> torch.Tensor:
    """A LoRA adapter (non-zero, so it changes the outputs) on the built-in ``base_name``, made portable and saved
    with its tokenizer to ``run_dir`` as a run saves it; returns the adapted model's logits on :data:`IDS`."""
    path = resolve_model(base_name)
    base = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    assert model.peft_config["default"].base_model_name_or_path == path  # what PEFT records: the cache path
    make_peft_model_portable(model)
    model.save_pretrained(run_dir)
    build_tiny_llama()[1].save_pretrained(run_dir)
    with torch.no_grad():
        return model(IDS).logits


def move_away(directory: Path) -> None:
    """``directory`` renamed, as if this were another machine where it does not exist."""
    directory.rename(directory.with_name(directory.name + "-moved-away"))


def paths_in_json_files(directory: Path, *roots: Path) -> list[str]:
    """Every ``file: value`` of the JSON files of ``directory`` that names a path under one of ``roots``."""
    found = []
    for path in directory.rglob("*.json"):
        text = path.read_text()
        found += [f"{path.name}: {root}" for root in roots if str(root) in text]
    return found


def test_portable_base_model_names_builtins_by_public_id_or_name(caches):
    assert portable_base_model("smollm2-135m") == SMOLLM2_PUBLIC_ID
    assert portable_base_model(resolve_model("smollm2-135m")) == SMOLLM2_PUBLIC_ID
    assert portable_base_model(resolve_model("tiny-llama")) == "tiny-llama"
    assert portable_base_model(resolve_model("tiny-llama-reference")) == "tiny-llama-reference"
    assert portable_base_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert portable_base_model(str(caches)) == str(caches)  # your own model directory: the path is all there is


def test_a_tiny_llama_adapter_loads_from_a_copy_with_the_cache_moved_away(caches):
    logits = save_adapter("tiny-llama", caches / "run")
    assert json.loads((caches / "run" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert paths_in_json_files(caches / "run", caches) == []
    shutil.copytree(caches / "run", caches / "copy")
    move_away(caches / "tokenweave-cache")
    model, _ = load_model_and_tokenizer(str(caches / "copy"))  # tiny-llama is built again, in a fresh cache
    torch.testing.assert_close(model(IDS).logits, logits)


def test_a_smollm2_adapter_loads_with_auto_peft_from_the_hub_cache_offline(caches):
    """The base is named by its public id, and the conversion, aliased in the hub cache on request (never by itself),
    is what ``AutoPeftModelForCausalLM`` loads offline, with the tokenweave cache moved away (the hub cache holds its
    own links to the files)."""
    logits = save_adapter("smollm2-135m", caches / "run")
    assert not (caches / "hub-cache").exists()  # resolving and training wrote nothing into the hub cache
    alias_in_hub_cache("smollm2-135m")
    config = json.loads((caches / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_PUBLIC_ID
    assert paths_in_json_files(caches / "run", caches) == []
    shutil.copytree(caches / "run", caches / "copy")
    move_away(caches / "tokenweave-cache")
    with torch.no_grad():
        torch.testing.assert_close(AutoPeftModelForCausalLM.from_pretrained(str(caches / "copy"))(IDS).logits, logits)
        torch.testing.assert_close(load_model_and_tokenizer(str(caches / "copy"))[0](IDS).logits, logits)


def test_a_smollm2_adapter_loads_where_neither_cache_has_the_model(caches, monkeypatch):
    """On a machine with empty caches, tokenweave's loader converts SmolLM2 for the public id (offline);
    ``AutoPeftModelForCausalLM`` loads the adapter once the conversion is aliased in the hub cache."""
    logits = save_adapter("smollm2-135m", caches / "run")
    shutil.copytree(caches / "run", caches / "copy")
    move_away(caches / "tokenweave-cache")
    assert not (caches / "hub-cache").exists()  # nothing was put there
    with pytest.raises(OSError):  # the public id is nowhere here yet
        AutoPeftModelForCausalLM.from_pretrained(str(caches / "copy"))
    with torch.no_grad():
        torch.testing.assert_close(load_model_and_tokenizer(str(caches / "copy"))[0](IDS).logits, logits)
    alias_in_hub_cache("smollm2-135m")
    with torch.no_grad():
        torch.testing.assert_close(AutoPeftModelForCausalLM.from_pretrained(str(caches / "copy"))(IDS).logits, logits)
    assert resolve_model(SMOLLM2_PUBLIC_ID) == SMOLLM2_PUBLIC_ID  # now found in the hub cache


def test_registering_leaves_a_model_already_in_the_hub_cache_alone(caches, tmp_path):
    """A real download (or an earlier registration) of the public id is never replaced."""
    first, second = tmp_path / "first", tmp_path / "second"
    for directory, seed in ((first, 0), (second, 1)):
        model, tokenizer = build_tiny_llama(seed=seed)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    register_in_hub_cache("some-org/some-model", first)
    register_in_hub_cache("some-org/some-model", second)
    loaded = AutoModelForCausalLM.from_pretrained("some-org/some-model")
    reference = AutoModelForCausalLM.from_pretrained(first)
    torch.testing.assert_close(loaded(IDS).logits, reference(IDS).logits)


def test_a_hub_cache_that_cannot_be_written_is_a_warning_not_an_error(caches, monkeypatch, caplog):
    (caches / "hub-cache").write_text("a file where the hub cache should be")
    alias_in_hub_cache("smollm2-135m")
    assert resolve_model("smollm2-135m") == str(caches / "tokenweave-cache" / "SmolLM2-135M-Instruct")
    assert "Could not register" in caplog.text


def test_a_trained_run_and_its_checkpoints_record_no_cache_path(caches):
    """``tokenweave train`` with LoRA on ``tiny-llama``: no JSON file or card of the run (the final adapter, each
    checkpoint, PEFT's checkpoint cards) names the cache, and a copy of the run loads with the cache moved away."""
    from tokenweave.train import train

    from .conftest import CONFIGS

    run = caches / "run"
    train(["--config", str(CONFIGS / "sft_tiny.yaml"), "--output_dir", str(run), "--max_steps", "1",
           "--save_strategy", "steps", "--save_steps", "1", "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj"])
    cache = caches / "tokenweave-cache"
    assert {json.loads(path.read_text())["base_model_name_or_path"] for path in run.rglob("adapter_config.json")} == {
        "tiny-llama"}
    assert {adapter_base_model(path.parent) for path in run.rglob("adapter_config.json")} == {"tiny-llama"}
    assert json.loads((run / "tokenweave_base_model.json").read_text()) == {"builtin_model": "tiny-llama"}
    assert paths_in_json_files(run, cache) == []
    assert [path for path in run.rglob("README.md") if str(cache) in path.read_text()] == []
    merged, _ = load_model_and_tokenizer(str(run))
    shutil.copytree(run, caches / "copy")
    move_away(cache)
    with torch.no_grad():
        torch.testing.assert_close(load_model_and_tokenizer(str(caches / "copy"))[0](IDS).logits, merged(IDS).logits)


def test_tokenweaves_loaders_use_the_builtin_an_adapter_was_trained_on_whatever_the_public_id_means(caches):
    """Online, or with the hub's SmolLM2 in the hub cache, the public id is the hub's model, whose weights differ from
    the conversion the adapter was trained on: the sidecar names the built-in, which tokenweave's loaders read first."""
    other = caches / "hub-smollm2"  # the hub's SmolLM2, as a download would have put it in the hub cache
    model, tokenizer = build_tiny_llama(seed=5)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    register_in_hub_cache(SMOLLM2_PUBLIC_ID, other)
    logits = save_adapter("smollm2-135m", caches / "run")
    (caches / "run" / "tokenweave_base_model.json").write_text(json.dumps({"builtin_model": "smollm2-135m"}))
    assert resolve_model(SMOLLM2_PUBLIC_ID) == SMOLLM2_PUBLIC_ID and adapter_base_model(caches / "run") == "smollm2-135m"
    with torch.no_grad():
        torch.testing.assert_close(load_model_and_tokenizer(str(caches / "run"))[0](IDS).logits, logits)
