"""The SmolLM2-135M-Instruct LoRA configs run a step through `tokenweave train` (a real model, offline)."""

import pytest
from safetensors.torch import load_file

from tokenweave.train import train

from .conftest import CONFIGS

pytestmark = [pytest.mark.smollm, pytest.mark.slow]


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_smollm2_lora_config_takes_a_step_and_saves_an_adapter(method, tmp_path):
    overrides = ["--max_steps", "1", "--num_train_examples", "16", "--learning_rate", "1e-3", "--warmup_steps", "0"]
    if method == "grpo":
        overrides += ["--per_device_train_batch_size", "4", "--max_completion_length", "16"]
    else:
        overrides += ["--per_device_train_batch_size", "2"]
    info = train(["--config", str(CONFIGS / f"{method}_smollm2_lora.yaml"), "--output_dir", str(tmp_path), *overrides])
    assert info["global_step"] == 1 and info["use_peft"]
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.isfinite().all() for tensor in adapter.values())
    if method != "grpo":  # GRPO's first step can have all-equal rewards, hence zero advantages
        assert any(tensor.abs().sum() > 0 for tensor in lora_b), "one step at lr 1e-3 left every LoRA B at zero"
