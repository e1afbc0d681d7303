"""Run configs: YAML values, command-line overrides, the method's config class, and bad keys named."""

import pytest
import yaml

from tokenweave.config import parse_run_config
from tokenweave.trainers import TokenSFTConfig


def write_config(tmp_path, **values):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_values_are_read_and_command_line_wins(tmp_path):
    path = write_config(
        tmp_path, method="dpo", model_name_or_path="tiny-llama", output_dir=str(tmp_path), use_cpu=True, beta=0.2,
        lora_r=4, num_train_examples=10,
    )
    run_args, training_args, model_args = parse_run_config(["--config", path, "--beta", "0.3"])
    assert training_args.beta == 0.3  # CLI override
    assert model_args.lora_r == 4  # ModelConfig key from the same YAML
    assert run_args.num_train_examples == 10 and run_args.method == "dpo"


def test_method_on_the_command_line_overrides_the_yaml(tmp_path):
    path = write_config(tmp_path, method="dpo", output_dir=str(tmp_path), use_cpu=True)
    run_args, training_args, _ = parse_run_config(["--config", path, "--method", "sft"])
    assert run_args.method == "sft" and type(training_args) is TokenSFTConfig


def test_unknown_config_key_is_named(tmp_path):
    path = write_config(tmp_path, method="sft", output_dir=str(tmp_path), use_cpu=True, learning_rat=1e-3)
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['learning_rat'\]"):
        parse_run_config(["--config", path])


def test_key_of_another_method_is_unknown(tmp_path):
    path = write_config(tmp_path, method="sft", output_dir=str(tmp_path), use_cpu=True, num_generations=4)
    with pytest.raises(ValueError, match="num_generations"):
        parse_run_config(["--config", path])


def test_unknown_command_line_flag_is_named(tmp_path):
    path = write_config(tmp_path, method="sft", output_dir=str(tmp_path), use_cpu=True)
    with pytest.raises(ValueError, match="--no_such_flag"):
        parse_run_config(["--config", path, "--no_such_flag", "1"])
    with pytest.raises(ValueError, match="Did you mean: 'learning_rtae' -> 'learning_rate'"):
        parse_run_config(["--config", path, "--learning_rtae", "1e-3"])


def test_missing_or_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="No method given"):
        parse_run_config(["--config", write_config(tmp_path, output_dir=str(tmp_path))])
    with pytest.raises(ValueError, match="Unknown method 'ppo'"):
        parse_run_config(["--config", write_config(tmp_path, method="ppo", output_dir=str(tmp_path))])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_run_config(["--config", str(tmp_path / "nope.yaml")])
