"""Single-process runs of the shipped tiny configs through `tokenweave train`, and bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenweave.cli import main as cli_main
from tokenweave.models import build_tiny_llama
from tokenweave.train import RUN_INFO_FILE, train

from .conftest import CONFIGS


# Each tiny config trains once, in one module fixture, for every test of a trained run below: sft and dpo with
# the steps (and, for dpo, the learning rate) their loss-curve tests need.
OVERRIDES = {"sft": ["--max_steps", "12"], "dpo": ["--max_steps", "12", "--learning_rate", "5e-3"], "grpo": []}
STEPS = {"sft": 12, "dpo": 12, "grpo": 4}


def losses(info):
    return [entry["loss"] for entry in info["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(method)``: ``(output_dir, run info)`` of the method's tiny config with :data:`OVERRIDES`, trained
    through `tokenweave train` on first use."""
    runs = {}

    def run(method):
        if method not in runs:
            output_dir = tmp_path_factory.mktemp(method)
            config = str(CONFIGS / f"{method}_tiny.yaml")
            runs[method] = output_dir, train(["--config", config, "--output_dir", str(output_dir), *OVERRIDES[method]])
        return runs[method]

    return run


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_tiny_config_trains_and_saves_a_changed_model(method, trained):
    output_dir, info = trained(method)
    assert info["method"] == method and info["global_step"] == STEPS[method] and info["num_processes"] == 1
    assert json.loads((output_dir / RUN_INFO_FILE).read_text())["global_step"] == STEPS[method]
    assert len(losses(info)) == STEPS[method]
    trained_model = AutoModelForCausalLM.from_pretrained(output_dir)
    initial, _ = build_tiny_llama()
    changed = [
        name for name, weight in trained_model.state_dict().items()
        if not torch.equal(weight, initial.state_dict()[name])
    ]
    assert changed, "training did not change any weight"


def test_sft_loss_decreases_on_the_arithmetic_task(trained):
    history = losses(trained("sft")[1])
    # Uniform over the 100-symbol vocabulary is ln(100) = 4.6 nats; learning the character statistics of
    # the solutions takes it well below the first steps' loss.
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.3


def test_dpo_rewards_separate_chosen_from_rejected(trained):
    steps = [entry for entry in trained("dpo")[1]["log_history"] if "rewards/margins" in entry]
    assert steps[0]["rewards/margins"] == 0.0 and steps[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy = ref
    late = steps[-6:]
    assert sum(entry["rewards/margins"] for entry in late) / 6 > 0.01
    assert sum(entry["loss"] for entry in late) / 6 < 0.69


def test_cli_train_runs_the_same_entry_point(tmp_path):
    cli_main(["train", "--config", str(CONFIGS / "sft_tiny.yaml"), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
    assert json.loads((tmp_path / "o" / RUN_INFO_FILE).read_text())["global_step"] == 1


def test_missing_dataset_column_fails_before_training_and_leaves_nothing(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1?", "response": "2"}\n' * 4)
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=r"method 'dpo' needs columns \[prompt, chosen, rejected\]"):
        train(["--config", str(CONFIGS / "dpo_tiny.yaml"), "--dataset_name", str(data), "--output_dir", str(output_dir)])
    assert not output_dir.exists()


def test_missing_model_fails_before_training_and_leaves_nothing(tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(
            ["--config", str(CONFIGS / "sft_tiny.yaml"), "--model_name_or_path", str(tmp_path / "no-model"),
             "--output_dir", str(output_dir)]
        )
    assert not output_dir.exists()


def test_unknown_reward_fails_before_training(tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="no_such_reward"):
        train(
            ["--config", str(CONFIGS / "grpo_tiny.yaml"), "--reward_funcs", "no_such_reward", "--output_dir",
             str(output_dir)]
        )
    assert not output_dir.exists()


def test_existing_output_dir_is_kept_on_failure(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileNotFoundError):
        train(
            ["--config", str(CONFIGS / "sft_tiny.yaml"), "--model_name_or_path", "./no-model", "--output_dir",
             str(tmp_path)]
        )
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_local_jsonl_dataset_trains(tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}], "completion": [{"role": "assistant", "content": str(i + 1)}]} for i in range(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    info = train(
        ["--config", str(CONFIGS / "sft_tiny.yaml"), "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"),
         "--max_steps", "2"]
    )
    assert info["global_step"] == 2


def test_lora_layers_put_adapters_on_those_layers_only(tmp_path):
    """``lora_layers: [1]``: adapters in the tiny model's layer 1 only (PEFT's layers_to_transform); the layer-0
    projections keep no LoRA weights, and only the layer-1 adapters are saved."""
    output_dir = tmp_path / "out"
    train(
        ["--config", str(CONFIGS / "sft_tiny.yaml"), "--output_dir", str(output_dir), "--max_steps", "1",
         "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj", "--lora_layers", "1"]
    )
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [1]
    from safetensors.torch import load_file

    names = load_file(str(output_dir / "adapter_model.safetensors")).keys()
    assert names and all(".layers.1." in name for name in names)
    assert {name.split(".layers.1.")[1].split(".")[1] for name in names} == {"q_proj", "v_proj"}


def test_lora_layers_need_use_peft(tmp_path):
    with pytest.raises(ValueError, match="lora_layers .* needs use_peft: true"):
        train(["--config", str(CONFIGS / "sft_tiny.yaml"), "--output_dir", str(tmp_path / "o"), "--lora_layers", "1"])
    assert not (tmp_path / "o").exists()


def test_resume_from_the_newest_complete_checkpoint(tmp_path, caplog):
    # `true` (YAML) and "true" (the command line) resume from the newest checkpoint with trainer_state.json (written
    # last); a half-written newer one is skipped with a message
    from tokenweave.resume import resume_checkpoint

    for step, complete in ((2, True), (10, True), (12, False)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        if complete:
            (checkpoint / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(tmp_path, True) == str(tmp_path / "checkpoint-10")
    assert "Skipping the checkpoint checkpoint-12" in caplog.text and "trainer_state.json: missing" in caplog.text
    assert resume_checkpoint(tmp_path, "true") == resume_checkpoint(tmp_path, "True") == str(tmp_path / "checkpoint-10")
    assert resume_checkpoint(tmp_path, "false") is None and resume_checkpoint(tmp_path, None) is None
    assert resume_checkpoint(tmp_path, False) is None
    assert resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no checkpoint that can be resumed from"):
        resume_checkpoint(empty, "true")
