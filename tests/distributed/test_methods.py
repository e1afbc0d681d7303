"""Two-process `accelerate launch` runs on CPU under DeepSpeed ZeRO-2 and ZeRO-3."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tokenweave.inference.loading import load_model_and_tokenizer
from tokenweave.models import build_tiny_llama
from tokenweave.train import RUN_INFO_FILE

from ..conftest import CONFIGS, REPO_ROOT
from .runs import accelerate_launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_two_process_deepspeed_run(method, zero_stage, tmp_path):
    accelerate_launch(
        f"cpu_zero{zero_stage}.yaml",
        ["-m", "tokenweave.train", "--config", str(CONFIGS / f"{method}_tiny.yaml"), "--output_dir", str(tmp_path)],
    )
    info = json.loads((tmp_path / RUN_INFO_FILE).read_text())
    assert info["model_wrapper"] == "DeepSpeedEngine"
    assert info["zero_stage"] == zero_stage and info["num_processes"] == 2 and info["global_step"] == 4
    trained = AutoModelForCausalLM.from_pretrained(tmp_path)
    initial, _ = build_tiny_llama()
    assert all(torch.isfinite(weight).all() for weight in trained.state_dict().values())
    assert any(
        not torch.equal(weight, initial.state_dict()[name]) for name, weight in trained.state_dict().items()
    ), "the saved model equals the initial one: the ZeRO gather on save or the training did not happen"


def test_lora_dpo_under_zero3_saves_an_adapter_that_reloads_to_the_trained_model(tmp_path):
    accelerate_launch(
        "cpu_zero3.yaml",
        [str(REPO_ROOT / "tests" / "distributed" / "saved_model_probe.py"), "--config", str(CONFIGS / "dpo_tiny.yaml"),
         "--output_dir", str(tmp_path), "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16",
         "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"],
    )
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert len(lora_b) == 2 * 4  # 2 layers x 4 target modules
    assert all(tensor.numel() > 0 for tensor in adapter.values())
    assert any(tensor.abs().sum() > 0 for tensor in lora_b), "LoRA B is still zero: the adapter was not trained"

    probe = torch.load(tmp_path / "probe_logits.pt")
    model, _ = load_model_and_tokenizer(str(tmp_path))  # the adapter, merged into its base model
    base_path = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
    base, _ = load_model_and_tokenizer(base_path)
    with torch.no_grad():
        reloaded = model(input_ids=probe["input_ids"]).logits
        untouched = base(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(reloaded, probe["logits"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(untouched, probe["logits"], atol=1e-5), "the adapter changes nothing"
