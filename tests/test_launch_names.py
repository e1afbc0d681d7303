"""``--accelerate_config`` and the other launch flags as ``trl`` has them: TRL's config names next to tokenweave's own,
launch keys in the run's YAML config, and every other ``accelerate launch`` flag passed through, except those that are
also training options (TRL's rule: the training parser reads first). No process is launched: ``launch_command`` is
replaced by one that records what it was given."""

import subprocess
import sys
from pathlib import Path

import pytest
import trl
import yaml
from trl import ModelConfig

from tokenweave.config import RunArguments, config_keys, parse_run_config
from tokenweave.launch import (
    accelerate_config_names,
    launch_argv,
    launch_settings,
    launch_settings_from_config,
    relaunch,
    resolve_accelerate_config,
    split_launch_arguments,
    trl_accelerate_config_names,
)
from tokenweave.trainers import METHODS

from .conftest import CONFIGS, LAUNCH

TRL_CONFIGS = Path(trl.__file__).parent / "accelerate_configs"
DPO_OPTIONS = config_keys(RunArguments, METHODS["dpo"][1], ModelConfig)
"""The options of a DPO run's config, which stay training options where ``accelerate launch`` has a flag of the same
name (``gradient_accumulation_steps``, ``debug``)."""


def test_importing_the_launch_module_imports_neither_torch_nor_trl():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, tokenweave.launch; print(sorted({'torch', 'trl', 'accelerate', "
         "'transformers'} & set(sys.modules)))"], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"


def test_trl_names_resolve_to_trl_configs_and_tokenweave_names_to_its_own():
    assert resolve_accelerate_config("multi_gpu") == TRL_CONFIGS / "multi_gpu.yaml"
    assert resolve_accelerate_config("zero2") == LAUNCH / "zero2.yaml"  # tokenweave's first
    assert {"multi_gpu", "single_gpu", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"} <= set(
        trl_accelerate_config_names())
    for name in trl_accelerate_config_names():  # every name trl takes works here
        own = name in accelerate_config_names()
        assert resolve_accelerate_config(name) == (LAUNCH if own else TRL_CONFIGS) / f"{name}.yaml"


def test_an_unknown_name_is_refused_with_both_sets_of_names():
    with pytest.raises(ValueError, match="'zero4' is neither a file nor") as refused:
        resolve_accelerate_config("zero4")
    message = str(refused.value)
    assert "\n" not in message
    assert all(name in message for name in ["cpu_zero2", "zero3_offload", "multi_gpu", "single_gpu", "fsdp1"])


def test_config_keys_become_launch_settings_and_the_run_keeps_its_own():
    config = {"method": "dpo", "accelerate_config": "zero3", "num_processes": 8, "mixed_precision": "bf16",
              "multi_gpu": False, "gradient_accumulation_steps": 4, "debug": "underflow_overflow",
              "learning_rate": 1e-5, "env": {"WANDB_MODE": "offline"}}
    launch, rest = launch_settings_from_config(config, DPO_OPTIONS)
    assert launch == {"accelerate_config": "zero3", "num_processes": 8, "mixed_precision": "bf16"}
    assert rest == {"method": "dpo", "gradient_accumulation_steps": 4, "debug": "underflow_overflow",
                    "learning_rate": 1e-5, "env": {"WANDB_MODE": "offline"}}
    with pytest.raises(ValueError, match="Config key multi_gpu: 'yes please'.*switch"):
        launch_settings_from_config({"multi_gpu": "yes please"}, DPO_OPTIONS)


def test_command_line_flags_override_config_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "dpo", "accelerate_config": "zero3", "num_processes": 8,
                                      "mixed_precision": "bf16"}))
    launch, rest = launch_settings(["--config", str(config), "--accelerate_config", "multi_gpu", "--num_processes",
                                    "2", "--max_steps", "3"], DPO_OPTIONS)
    assert launch == {"accelerate_config": "multi_gpu", "num_processes": 2, "mixed_precision": "bf16"}
    assert rest == ["--config", str(config), "--max_steps", "3"]


def test_accelerate_flags_pass_through_unless_they_are_training_options():
    launch, rest = split_launch_arguments(
        ["--config", "c.yaml", "--mixed_precision", "bf16", "--gradient_accumulation_steps", "4", "--zero-stage=2",
         "--debug", "underflow_overflow", "--multi_gpu", "--env", "A=1", "--env", "B=2", "--config_file", "x.yaml",
         "--max_steps", "3"], DPO_OPTIONS)
    assert launch == {"mixed_precision": "bf16", "zero_stage": 2, "multi_gpu": True, "env": ["A=1", "B=2"],
                      "accelerate_config": "x.yaml"}
    assert rest == ["--config", "c.yaml", "--gradient_accumulation_steps", "4", "--debug", "underflow_overflow",
                    "--max_steps", "3"]
    # the pipelines hand launch settings on as flags: they read back as they were
    assert split_launch_arguments(launch_argv(launch), DPO_OPTIONS) == (launch, [])
    with pytest.raises(ValueError, match="--num_processes 'two': not a valid value"):
        split_launch_arguments(["--num_processes", "two"], DPO_OPTIONS)
    with pytest.raises(ValueError, match="--mixed_precision needs a value"):
        split_launch_arguments(["--mixed_precision", "--max_steps", "3"], DPO_OPTIONS)


@pytest.fixture
def launched(monkeypatch):
    """The arguments ``accelerate launch`` is called with (a list, one per call), instead of launching."""
    import accelerate.commands.launch

    calls = []
    monkeypatch.setattr(accelerate.commands.launch, "launch_command", calls.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return calls


def test_relaunch_gives_accelerate_launch_the_config_keys_and_the_pass_through_flags(tmp_path, launched):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "dpo", "accelerate_config": "multi_gpu", "num_processes": 4}))
    argv = ["--config", str(config), "--num_processes", "2", "--mixed_precision", "bf16",
            "--gradient_accumulation_steps", "2", "--max_steps", "3"]
    assert relaunch("tokenweave.train", argv, DPO_OPTIONS)
    (args,) = launched
    assert args.config_file == str(TRL_CONFIGS / "multi_gpu.yaml")
    assert args.num_processes == 2 and args.mixed_precision == "bf16"
    assert args.gradient_accumulation_steps is None  # a training option: not accelerate's
    assert args.module and args.training_script == "tokenweave.train"
    assert args.training_script_args == ["--config", str(config), "--gradient_accumulation_steps", "2",
                                         "--max_steps", "3"]


def test_relaunch_under_a_launcher_leaves_config_keys_to_it_and_refuses_flags(tmp_path, launched, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "dpo", "accelerate_config": "zero3", "num_processes": 8}))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not relaunch("tokenweave.train", ["--config", str(config)], DPO_OPTIONS)
    with pytest.raises(ValueError, match=r"\['mixed_precision'\] given to a process that a launcher already started"):
        relaunch("tokenweave.train", ["--config", str(config), "--mixed_precision", "bf16"], DPO_OPTIONS)
    assert launched == []


def test_a_run_config_with_launch_keys_parses_without_a_did_you_mean(tmp_path):
    """The run's parser drops the launch keys before its unknown-key check: no "did you mean accelerator_config"."""
    config = yaml.safe_load((CONFIGS / "dpo_tiny.yaml").read_text())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**config, "accelerate_config": "zero3", "num_processes": 2,
                                    "mixed_precision": "bf16"}))
    _, training_args, _ = parse_run_config(["--config", str(path)])
    assert training_args.accelerator_config.split_batches is False  # TRL's own key untouched
