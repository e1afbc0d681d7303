"""Every config shipped under configs/ parses: no unknown key, a known method, valid TRL options."""

import pytest
import yaml

from tokenweave.config import parse_run_config
from tokenweave.data.critical import parse_pipeline_config

from .conftest import CONFIGS

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
# A run config names its method; the critical-token pipeline's configs do not.
TRAIN_CONFIGS = [path for path in ALL_CONFIGS if "method" in yaml.safe_load(path.read_text())]
PIPELINE_CONFIGS = [path for path in ALL_CONFIGS if path not in TRAIN_CONFIGS]


def config_id(path):
    return str(path.relative_to(CONFIGS))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=config_id)
def test_train_config_parses(path):
    # GPU configs ask for bf16, which TRL refuses on a machine without a GPU: parse them as CPU runs.
    cpu_overrides = ["--bf16", "false", "--use_cpu", "true"] if path.parent.name == "gpu" else []
    run_args, training_args, model_args = parse_run_config(["--config", str(path), *cpu_overrides])
    assert run_args.method in {"sft", "dpo", "grpo"} and model_args.model_name_or_path


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=config_id)
def test_pipeline_config_parses(path):
    assert parse_pipeline_config(["--config", str(path)]).work_dir


def test_every_config_is_checked():
    assert len(TRAIN_CONFIGS) >= 15 and len(PIPELINE_CONFIGS) == 2
