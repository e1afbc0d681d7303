"""What a run reads, as a TRL user gives it: TRL's dataset mixture (``datasets:``), ``test_split_size`` and
``dataset_streaming`` on the tiny model, with the same column and null checks as any dataset; and the inputs that used
to fail late or silently, refused before the model loads, leaving no output_dir behind: a GRPO prompt that is empty,
fewer GRPO prompts than one generation batch (0 steps trained, the base model saved), an output_dir that cannot be
written (found only when saving, after training)."""

import json
import re

import pytest
import transformers
from datasets import Dataset

from tokenweave.config import parse_run_config
from tokenweave.data.loading import check_dataset
from tokenweave.train import train_from_args

from .conftest import CONFIGS


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sft_rows(start: int, count: int) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}", "source": "x"} for i in range(start, start + count)]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_a_trl_mixture_recipe_with_a_test_split_trains_the_tiny_model(tmp_path, tiny_model_cache):
    first = write_jsonl(tmp_path / "a.jsonl", sft_rows(0, 24))
    second = write_jsonl(tmp_path / "b.jsonl", sft_rows(100, 16))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
method: sft
model_name_or_path: tiny-llama
datasets:
  - path: json
    data_files: {first}
    columns: [prompt, completion]
  - path: json
    data_files: {second}
    split: train
test_split_size: 0.25
output_dir: {tmp_path / "run"}
use_cpu: true
bf16: false
max_steps: 2
per_device_train_batch_size: 4
eval_strategy: steps
eval_steps: 2
report_to: none
""")
    info = train_from_args(*parse_run_config(["--config", str(recipe)]))
    assert info["global_step"] == 2 and any("eval_loss" in entry for entry in info["log_history"])
    from tokenweave.train import load_run_splits

    run_args, training_args, _ = parse_run_config(["--config", str(recipe)])
    train_rows, eval_rows = load_run_splits(run_args, training_args)
    assert (len(train_rows), len(eval_rows)) == (30, 10)  # the 40 rows of both files, 25 % held out
    source = {row["prompt"]: row["source"] for split in (train_rows, eval_rows) for row in split}
    assert len(source) == 40 and source["What is 0 + 1?"] is None and source["What is 115 + 1?"] == "x"  # columns: [prompt, completion] of the first file only


def test_a_mixture_gets_the_null_check_of_any_dataset(tmp_path):
    rows = sft_rows(0, 8)
    rows[5]["completion"] = None
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    run_args, training_args, _ = parse_run_config(["--config", str(CONFIGS / "sft_tiny.yaml"),
                                                   "--output_dir", str(tmp_path / "run")])
    run_args.datasets = [{"path": "json", "data_files": data}]
    from tokenweave.train import load_run_splits

    with pytest.raises(ValueError, match=r"Dataset mixture of \['json'\]: row 5 has no value \(null\) in column "
                                         "'completion'"):
        load_run_splits(run_args, training_args)


def test_dataset_streaming_trains_and_needs_max_steps(tmp_path, tiny_model_cache):
    data = write_jsonl(tmp_path / "a.jsonl", sft_rows(0, 32))
    argv = ["--config", str(CONFIGS / "sft_tiny.yaml"), "--dataset_name", data, "--dataset_streaming", "true",
            "--max_steps", "2", "--output_dir", str(tmp_path / "run")]
    info = train_from_args(*parse_run_config(argv))
    assert info["global_step"] == 2
    with pytest.raises(ValueError, match="A streamed dataset has no length: set max_steps"):
        parse_run_config([*argv[:-4], "--max_steps", "-1", "--num_train_epochs", "1"])


def test_an_empty_grpo_prompt_is_refused_naming_its_row():
    rows = Dataset.from_dict({"prompt": ["What is 1 + 1?", "", "What is 2 + 2?"]})
    with pytest.raises(ValueError, match="Dataset d: row 1 has an empty prompt; GRPO generates from each prompt"):
        check_dataset(rows, "grpo", "d")
    chats = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi"}], []]})
    with pytest.raises(ValueError, match="row 1 has an empty prompt"):
        check_dataset(chats, "grpo", "d")
    check_dataset(rows.select([0, 2]), "grpo", "d")


def test_fewer_grpo_prompts_than_a_generation_batch_is_refused_before_load(tmp_path, no_model_loads):
    output_dir = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "grpo_tiny.yaml"), "--num_train_examples", "0", "--output_dir", str(output_dir)]
    argv[argv.index("0")] = "1"  # 1 prompt; a generation batch of 4 completions, 4 a prompt, takes 1: trains
    argv += ["--per_device_train_batch_size", "8"]  # now a batch takes 2 prompts: 0 steps
    with pytest.raises(ValueError, match=r"The train data has 1 prompts, fewer than one generation batch takes \(2: "
                                         "generation_batch_size 8 / num_generations 4\\): the run would train 0 steps"):
        train_from_args(*parse_run_config(argv))
    assert not output_dir.exists()


def test_an_output_dir_that_cannot_be_written_is_refused_before_load(tmp_path, no_model_loads):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for output_dir, where in ((blocker / "run", f"the folder above it that exists, {str(blocker)!r},"),
                              ("/proc/tokenweave_run", "the folder above it that exists, '/proc',")):
        argv = ["--config", str(CONFIGS / "sft_tiny.yaml"), "--output_dir", str(output_dir)]
        with pytest.raises(ValueError, match=re.escape(f"output_dir {str(output_dir)!r}: {where} cannot be written")):
            train_from_args(*parse_run_config(argv))
