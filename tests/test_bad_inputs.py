"""The bad-input matrix: options and data a run cannot train on are refused before any model loads, with a message
naming the problem, and leave no output directory behind, across the trainers (SFT, DPO / cDPO / TDPO, GRPO / HAPO /
Rank-GRPO / attention credit), the critical-token pipeline, ``tokenweave eval`` and ``tokenweave sample``.

Each case is a config (or command line) with one thing wrong; loading a model raises ``AssertionError`` here, so a
check that is missing or comes too late fails its case."""

import json
import re

import pytest
import yaml
from transformers import AutoModelForCausalLM

from tokenweave.checks import Range, option_problems
from tokenweave.cli import main as cli_main
from tokenweave.train import train

from .conftest import CONFIGS


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch, tiny_model_cache):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def data_file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


PAIR = {"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "chosen_scores": [0.5], "rejected_scores": [0.2]}

# (case id, base config, YAML values on top, the message expected); "{data}" in a value: a data file of the case
TRAIN_CASES = [
    ("zero-train-examples", "sft_tiny", {"num_train_examples": 0}, "num_train_examples must be >= 1, got 0"),
    ("negative-test-examples", "sft_tiny", {"num_test_examples": -5}, "num_test_examples must be >= 1"),
    ("zero-batch", "sft_tiny", {"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
    ("float-batch", "sft_tiny", {"per_device_train_batch_size": 8.5}, "per_device_train_batch_size must be int, got 8.5"),
    ("list-batch", "grpo_tiny", {"per_device_train_batch_size": [8]}, r"per_device_train_batch_size must be int, got \[8\]"),
    ("zero-accumulation", "dpo_tiny", {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
    ("negative-lr", "sft_tiny", {"learning_rate": -1.0}, "learning_rate must be >= 0"),
    ("nan-lr", "sft_tiny", {"learning_rate": float("nan")}, "learning_rate must be >= 0, got nan"),
    ("zero-max-steps", "sft_tiny", {"max_steps": 0}, r"max_steps must be >= 1 \(or -1\)"),
    ("string-for-float", "sft_tiny", {"weight_decay": [0.1]}, "weight_decay must be float"),
    ("mistyped-key", "sft_tiny", {"learning_rat": 1e-3}, "Did you mean: 'learning_rat' -> 'learning_rate'"),
    ("lora-rank-zero", "sft_tiny", {"use_peft": True, "lora_r": 0}, "lora_r must be >= 1"),
    ("lora-dropout-one", "sft_tiny", {"use_peft": True, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ("dpo-negative-beta", "dpo_tiny", {"beta": -0.1}, "beta must be > 0, got -0.1"),
    ("dpo-zero-beta", "dpo_tiny", {"beta": 0.0}, "beta must be > 0, got 0.0"),
    ("dpo-label-smoothing", "dpo_tiny", {"label_smoothing": 0.7}, r"label_smoothing must be in \[0, 0.5\]"),
    ("tdpo-alpha", "tdpo_tiny", {"tdpo_alpha": -1.0}, "tdpo_alpha must be >= 0"),
    ("tdpo-chunk", "tdpo_tiny", {"tdpo_kl_chunk_size": 0}, "tdpo_kl_chunk_size must be >= 1"),
    ("cdpo-control", "cdpo_tiny", {"signal_control": "random"}, "signal_control must be one of"),
    ("renamed-control", "dpo_tiny", {"token_weight_control": "shuffle"}, "'token_weight_control' -> signal_control"),
    ("grpo-zero-temperature", "grpo_tiny", {"temperature": 0.0}, "temperature must be > 0"),
    ("grpo-one-generation", "grpo_tiny", {"num_generations": 1}, "num_generations must be >= 2"),
    ("grpo-top-p", "grpo_tiny", {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ("grpo-negative-epsilon", "grpo_tiny", {"epsilon": -0.2}, "epsilon must be >= 0"),
    ("grpo-negative-beta", "grpo_tiny", {"beta": -0.04}, "beta must be >= 0"),
    ("grpo-zero-completion", "grpo_tiny", {"max_completion_length": 0}, "max_completion_length must be >= 1"),
    ("hapo-negative-tau", "hapo_tiny", {"temperature_tau": -2.0}, r"temperature_tau must be in \(-1, 1\)"),
    ("hapo-tau-above-one", "hapo_tiny", {"temperature_tau": 1.5}, r"temperature_tau must be in \(-1, 1\)"),
    ("hapo-stats", "hapo_tiny", {"hapo_entropy_stats": "batch"}, "hapo_entropy_stats must be one of"),
    ("hapo-dual-clip", "hapo_tiny", {"dual_clip_c": 0.5}, "dual_clip_c must be > 1"),
    ("hapo-pivot", "hapo_tiny", {"entropy_pivot": 1.5}, r"entropy_pivot must be in \[0, 1\]"),
    ("rank-list-zero", "rank_grpo_tiny", {"rank_list_length": 0}, "rank_list_length must be >= 1"),
    ("rank-credit", "rank_grpo_tiny", {"rank_credit": "dcg"}, "rank_credit must be one of"),
    ("task-candidates", "rank_grpo_tiny", {"task_num_candidates": 3}, "task_num_candidates .3. must exceed"),
    ("attention-quantile", "attention_credit_tiny", {"attention_credit_quantile": 1.5},
     r"attention_credit_quantile must be in \[0, 1\]"),
    ("attention-heads", "attention_credit_tiny", {"attention_credit_head_fraction": 0.7},
     r"attention_credit_head_fraction must be in \(0, 0.5\]"),
    ("attention-horizon", "attention_credit_tiny", {"attention_credit_horizon": [12, 2]},
     "attention_credit_horizon must be two integers"),
    ("attention-rule", "attention_credit_tiny", {"attention_credit_rule": "anchors"}, "attention_credit_rule must be one of"),
    ("attention-layers", "attention_credit_tiny", {"attention_credit_layers": [-1]}, "attention_credit_layers must be"),
    ("empty-data-file", "sft_tiny", {"dataset_name": "{data}"}, "has no rows"),
    ("null-completion", "sft_tiny", {"dataset_name": "{data}"}, "row 1 has no value .null. in column 'completion'"),
    ("missing-columns", "dpo_tiny", {"dataset_name": "{data}"}, "needs columns"),
    ("cdpo-nan-score", "cdpo_tiny", {"dataset_name": "{data}"}, "row 0, column 'rejected_scores' has the value nan"),
    ("cdpo-score-above-one", "cdpo_tiny", {"dataset_name": "{data}"}, r"'chosen_scores' has the value 4.0; .* \[0, 1\]"),
]
CASE_DATA = {
    "empty-data-file": [],
    "null-completion": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
    "missing-columns": [{"prompt": "a", "completion": "b"}],
    "cdpo-nan-score": [PAIR | {"rejected_scores": [float("nan")]}],
    "cdpo-score-above-one": [PAIR, PAIR | {"chosen_scores": [4.0]}],
}


@pytest.mark.parametrize("case, base, values, message", TRAIN_CASES, ids=[case[0] for case in TRAIN_CASES])
def test_a_bad_run_is_refused_before_the_model_loads(tmp_path, case, base, values, message):
    config = yaml.safe_load((CONFIGS / f"{base}.yaml").read_text())
    output_dir = tmp_path / "run"
    config |= {"output_dir": str(output_dir)}
    if case in CASE_DATA:
        values = {**values, "dataset_name": data_file(tmp_path, "data.jsonl", CASE_DATA[case])}
    config |= values
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message):
        train(["--config", str(path)])
    assert not output_dir.exists()


def refused_by_cli(argv: list[str], capsys) -> str:
    """The one line ``tokenweave <argv>`` refuses its input with (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and line.startswith(f"tokenweave {argv[0]}: error: ")
    return line


PIPELINE_CASES = [
    ("one-sample", {"num_samples_per_prompt": 1}, "num_samples_per_prompt must be >= 2"),
    ("zero-questions", {"num_examples": 0}, "num_examples must be >= 1"),
    ("top-p", {"negative_top_p": 0.0}, r"negative_top_p must be in \(0, 1\]"),
    ("temperature", {"temperature": -0.7}, "temperature must be > 0"),
    ("float-tokens", {"max_new_tokens": 2.5}, "max_new_tokens must be int, got 2.5"),
    ("rollout-samples", {"rollout_samples": 0}, "rollout_samples must be >= 1"),
    ("sampler", {"sampler": "sglang"}, "sampler must be one of"),
    ("inference-dtype", {"inference_dtype": "int8"}, "inference_dtype must be one of"),
    ("vllm-memory", {"sampler": "vllm", "vllm_gpu_memory_utilization": 1.5},
     r"vllm_gpu_memory_utilization must be in \(0, 1\]"),
    ("vllm-tensor-parallel", {"sampler": "vllm", "vllm_tensor_parallel_size": 0},
     "vllm_tensor_parallel_size must be >= 1"),
]


@pytest.mark.parametrize("case, values, message", PIPELINE_CASES, ids=[case[0] for case in PIPELINE_CASES])
def test_a_bad_pipeline_is_refused_before_the_model_loads(tmp_path, capsys, case, values, message):
    config = yaml.safe_load((CONFIGS / "critical_tiny.yaml").read_text())
    work_dir = tmp_path / "work"
    config |= {"work_dir": str(work_dir), **values}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert re.search(message, refused_by_cli(["critical", "--config", str(path)], capsys))
    assert not work_dir.exists()


COMMAND_CASES = [
    ("eval-zero-examples", ["eval", "--num_examples", "0"], "num_examples must be >= 1"),
    ("eval-zero-tokens", ["eval", "--max_new_tokens", "0"], "max_new_tokens must be >= 1"),
    ("eval-zero-batch", ["eval", "--batch_size", "0"], "batch_size must be >= 1"),
    ("eval-empty-file", ["eval", "--task", "{empty}"], "has no rows"),
    ("sample-zero-samples", ["sample", "--num_samples_per_prompt", "0", "--output", "{out}"],
     "num_samples_per_prompt must be >= 1"),
    ("sample-temperature", ["sample", "--temperature", "0", "--output", "{out}"], "temperature must be > 0"),
]


@pytest.mark.parametrize("case, argv, message", COMMAND_CASES, ids=[case[0] for case in COMMAND_CASES])
def test_a_bad_command_is_refused_before_the_model_loads(tmp_path, capsys, case, argv, message):
    empty = data_file(tmp_path, "empty.jsonl", [])
    output = tmp_path / "out"
    argv = [arg.format(empty=empty, out=output) for arg in argv]
    assert re.search(message, refused_by_cli([*argv, "--model", "tiny-llama"], capsys))
    assert not output.exists()


def test_the_matrix_covers_at_least_30_kinds():
    assert len(TRAIN_CASES) + len(PIPELINE_CASES) + len(COMMAND_CASES) >= 30


def test_every_problem_is_listed_at_once():
    from tokenweave.trainers import TokenGRPOConfig

    config = TokenGRPOConfig.__new__(TokenGRPOConfig)  # the values only, without __post_init__
    for name, item in TokenGRPOConfig.__dataclass_fields__.items():
        if item.init:
            setattr(config, name, item.default_factory() if callable(item.default_factory) else item.default)
    config.temperature, config.num_generations, config.attention_credit_quantile = -1.0, 1, 2.0
    problems = option_problems(config)
    assert [problem.split(" must")[0] for problem in problems] == ["num_generations", "temperature",
                                                                  "attention_credit_quantile"]


def test_range_bounds_and_descriptions():
    half_open = Range(0, 1, high_open=True)
    assert half_open.holds(0) and half_open.holds(0.5) and not half_open.holds(1) and not half_open.holds(-0.1)
    assert not half_open.holds(float("inf")) and not half_open.holds(True) and half_open.holds(None)
    assert str(half_open) == "in [0, 1)" and str(Range(1, special=(None, -1))) == ">= 1 (or -1)"
    assert str(Range(0, low_open=True)) == "> 0"
