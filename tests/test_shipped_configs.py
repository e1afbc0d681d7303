"""Every config shipped under configs/ parses: no unknown key, a known method, valid TRL options. The one place
where the shipped configs are parsed."""

import sys
from types import ModuleType

import pytest
import yaml

from tokenweave.config import RunArguments, parse_run_config
from tokenweave.pipelines.critical import parse_pipeline_config, training_runs
from tokenweave.trainers import TokenDPOConfig, TokenGRPOConfig, TokenSFTConfig

from .conftest import CONFIGS

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
# A run config names its method; the critical-token pipeline's configs do not.
TRAIN_CONFIGS = [path for path in ALL_CONFIGS if "method" in yaml.safe_load(path.read_text())]
PIPELINE_CONFIGS = [path for path in ALL_CONFIGS if path not in TRAIN_CONFIGS]


def config_id(path):
    return str(path.relative_to(CONFIGS))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=config_id)
def test_train_config_parses(path):
    # GPU configs ask for bf16, which TRL refuses on a machine without a GPU: parse them as CPU runs (and they log to
    # tensorboard, which the tests do not install).
    cpu_overrides = ["--bf16", "false", "--use_cpu", "true", "--report_to", "none"] if path.parent.name == "gpu" else []
    run_args, training_args, model_args = parse_run_config(["--config", str(path), *cpu_overrides])
    assert run_args.method in {"sft", "dpo", "grpo"} and model_args.model_name_or_path


@pytest.mark.parametrize(
    "name, config_class", [("sft_tiny", TokenSFTConfig), ("dpo_tiny", TokenDPOConfig), ("grpo_tiny", TokenGRPOConfig)]
)
def test_tiny_configs_parse_to_the_method_config(name, config_class):
    run_args, training_args, model_args = parse_run_config(["--config", str(CONFIGS / f"{name}.yaml")])
    assert isinstance(run_args, RunArguments)
    assert type(training_args) is config_class
    assert model_args.model_name_or_path == "tiny-llama"
    assert training_args.use_cpu and not training_args.bf16


def as_cpu_run(path, directory):
    """The run config at ``path`` as a CPU run (bf16 off, no logging backend), written under ``directory``: how a GPU
    config parses here."""
    copy = directory / path.name
    copy.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"bf16": False, "use_cpu": True,
                                                                        "report_to": "none"}))
    return copy


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=config_id)
def test_pipeline_config_parses_with_its_training_runs(path, tmp_path, monkeypatch):
    cpu_overrides = []
    if path.parent.name == "gpu":  # its run configs ask for bf16: parse them as CPU runs
        monkeypatch.setitem(sys.modules, "vllm", ModuleType("vllm"))  # and it samples with vLLM, not installed here
        values = yaml.safe_load(path.read_text())
        for key in ("warm_start_config", "sft_config", "cdpo_config"):
            if values.get(key):
                cpu_overrides += [f"--{key}", str(as_cpu_run(CONFIGS.parent / values[key], tmp_path))]
    config = parse_pipeline_config(["--config", str(path), *cpu_overrides])
    assert config.work_dir
    runs = training_runs(config)  # parses its run configs: on the pipeline's model, each the method it is there for
    sft = runs["sft"].model_args
    assert sft.use_peft and (sft.lora_r, sft.lora_alpha) == (8, 16)  # cDPO's positive/negative LoRA
    assert all(run.model_args.model_name_or_path == config.model for run in runs.values())
    assert ("dpo" in runs) == config.compare_dpo and ("cdpo_shuffled" in runs) == config.compare_shuffled
    assert ("warm_start" in runs) == (config.warm_start_config is not None)
    if "warm_start" in runs:  # on other questions than the pipeline samples on
        assert runs["warm_start"].run_args.task_seed != config.task_seed


def test_every_config_is_checked():
    assert len(TRAIN_CONFIGS) >= 15 and len(PIPELINE_CONFIGS) == 4


def test_every_gpu_run_config_logs_somewhere():
    gpu_runs = [path for path in TRAIN_CONFIGS if path.parent.name == "gpu"]
    assert len(gpu_runs) >= 10
    assert {config_id(path): yaml.safe_load(path.read_text()).get("report_to") for path in gpu_runs
            if yaml.safe_load(path.read_text()).get("report_to") in (None, "none", [])} == {}
