"""The gsm8k task: GSM8K's rows (``openai/gsm8k``'s layout) formatted like the arithmetic task, so the answer reward
reads the reference solutions and the pipeline samples on it. No hub here: the loader's hub read is replaced by
rows in the hub's layout."""

import pytest
from datasets import Dataset, DatasetDict

import tokenweave.data.loading as loading
from tokenweave.data.arithmetic import build_prompt
from tokenweave.data.gsm8k import format_gsm8k, parse_gsm8k_answer
from tokenweave.rewards.math import is_correct

HUB_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A shop sold 1,200 pens at $2 each. How much money did it make?",
     "answer": "It made 1,200 * 2 = <<1200*2=2400>>2,400 dollars.\n#### 2,400"},
]


def test_the_answer_line_and_the_annotations():
    solution, answer = parse_gsm8k_answer(HUB_ROWS[0]["answer"])
    assert answer == "72"
    assert solution == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April "
                        "and May.\nThe answer is 72.")
    assert parse_gsm8k_answer(HUB_ROWS[1]["answer"])[1] == "2400"
    with pytest.raises(ValueError, match="ends with '#### <number>'"):
        parse_gsm8k_answer("no final line")


def test_rows_are_formatted_like_the_arithmetic_task_and_their_solutions_are_correct():
    rows = format_gsm8k(Dataset.from_list(HUB_ROWS), "prompt")
    assert rows.column_names == ["prompt", "question", "answer", "solution"]
    assert rows[0]["prompt"] == build_prompt(HUB_ROWS[0]["question"])
    assert all(is_correct(row["solution"], row["answer"]) for row in rows)
    assert not is_correct(rows[0]["solution"], "73")
    sft = format_gsm8k(Dataset.from_list(HUB_ROWS), "sft")
    assert sft[1]["completion"] == [{"role": "assistant", "content": rows[1]["solution"]}]


def test_the_task_reads_the_hub_dataset_and_has_no_preference_format(monkeypatch):
    asked = []

    def hub(name, config, streaming=False):
        asked.append((name, config, streaming))
        return DatasetDict({"train": Dataset.from_list(HUB_ROWS), "test": Dataset.from_list(HUB_ROWS[:1])})

    monkeypatch.setattr(loading, "load_dataset", hub)
    train = loading.load_run_dataset("gsm8k", "train", "grpo", num_examples=1)
    assert asked == [("openai/gsm8k", "main", False)] and len(train) == 1 and train[0]["answer"] == "72"
    assert loading.load_run_dataset("gsm8k", "test", "sft").column_names == ["prompt", "completion"]
    with pytest.raises(ValueError, match="no format for method 'dpo'"):
        loading.load_run_dataset("gsm8k", "train", "dpo")
