import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft import LoraConfig, get_peft_model

from tokenweave.inference.loading import load_model_and_tokenizer
from tokenweave.models import (
    build_tiny_llama,
    build_tiny_tokenizer,
    causal_lm,
    check_direct_head_calls,
    final_hidden_states,
    lm_head_functions,
    resolve_model,
)


def test_tiny_tokenizer_round_trips_text_and_chat_template():
    tokenizer = build_tiny_tokenizer()
    text = "23 + 45 = 68\nThe answer is 68."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tiny_llama_is_deterministic_and_sized_to_tokenizer():
    model_a, tokenizer = build_tiny_llama(seed=0)
    model_b, _ = build_tiny_llama(seed=0)
    model_c, _ = build_tiny_llama(seed=1)
    assert model_a.config.vocab_size == len(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model_a(ids).logits, model_b(ids).logits)
    assert not torch.equal(model_a(ids).logits, model_c(ids).logits)


def test_resolve_tiny_llama_materialises_a_loadable_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWEAVE_CACHE", str(tmp_path))
    path = resolve_model("tiny-llama")
    assert json.loads((tmp_path / path.split("/")[-1] / "config.json").read_text())["model_type"] == "llama"
    assert resolve_model("tiny-llama") == path  # cached, not rebuilt
    model, tokenizer = load_model_and_tokenizer("tiny-llama")
    reference, _ = build_tiny_llama(seed=0)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(ids).logits, reference(ids).logits)
    assert tokenizer.padding_side == "left"
    assert not list(tmp_path.glob("*.*/"))  # no staging directory left behind


def test_a_process_of_rank_1_materialises_what_save_pretrained_writes(tmp_path, monkeypatch):
    """Under ``accelerate launch`` the cache may be built by any rank; transformers' ``save_pretrained`` writes nothing
    on rank != 0 once torch.distributed is up, which used to leave a tokenizer-only directory (and a crash of the
    other rank). Built as rank 1 of an initialised process group, the directory holds what ``save_pretrained``
    writes in one process: the same config, generation config, weights and tokenizer files."""
    model, tokenizer = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 1)
    monkeypatch.setenv("TOKENWEAVE_CACHE", str(tmp_path / "cache"))
    built = Path(resolve_model("tiny-llama"))
    saved = tmp_path / "saved"
    assert sorted(path.name for path in built.iterdir()) == sorted(path.name for path in saved.iterdir())
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((built / name).read_text()) == json.loads((saved / name).read_text()), name
    built_weights, saved_weights = load_file(built / "model.safetensors"), load_file(saved / "model.safetensors")
    assert built_weights.keys() == saved_weights.keys()
    assert all(torch.equal(built_weights[name], weight) for name, weight in saved_weights.items())


@pytest.mark.parametrize("bad", ["./no/such/model", "/no/such/model", "not a model", "~/no-such-model"])
def test_missing_model_is_a_clear_error(bad):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(bad)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_uncached_hub_id_is_rejected_offline():
    with pytest.raises(FileNotFoundError, match="not in the hub cache"):
        resolve_model("no-such-org/no-such-model-xyz")


# -- heads: the LM head applied by hand --------------------------------------------------------------------


def test_captured_final_hidden_states_through_the_head_give_the_model_logits():
    """``final_hidden_states`` captures what the LM head reads in the model's own forward (through PEFT), and the
    head function maps it to that forward's logits."""
    model = get_peft_model(build_tiny_llama()[0], LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    assert causal_lm(model) is model.get_base_model()
    with final_hidden_states(model) as hidden:
        logits = model(input_ids=ids).logits
    with final_hidden_states(model, enabled=False) as nothing:
        model(input_ids=ids)
    assert len(hidden) == 1 and hidden[0].shape == (2, 4, model.config.hidden_size) and nothing == []
    (head,) = lm_head_functions([model])
    torch.testing.assert_close(head(hidden[0]), logits)


def test_models_that_transform_the_head_logits_are_refused():
    model = build_tiny_llama()[0]
    check_direct_head_calls(model, "this test")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="this test calls the LM head directly.*final_logit_softcapping"):
        check_direct_head_calls(model, "this test")


@pytest.mark.smollm
def test_smollm2_converts_to_a_plain_float32_checkpoint():
    path = resolve_model("smollm2-135m")
    config = json.loads(open(f"{path}/config.json").read())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    assert model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, batch["input_ids"].shape[1] :])
