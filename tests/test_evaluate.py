"""Evaluation scores parsed answers; preference pairs pick trajectories by answer frequency."""

import json

import pytest
import torch
from datasets import Dataset

from tokenweave.data.arithmetic import load_arithmetic
from tokenweave.data.preferences import build_preference_pairs, build_sft_sets, select_by_answer_frequency
from tokenweave.inference.evaluate import evaluate_accuracy, evaluate_model
from tokenweave.inference.generation import generate_completions
from tokenweave.inference.sampling import sample_trajectories
from tokenweave.models import build_tiny_tokenizer


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends a fixed reply per prompt (chosen by prompt text)."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.replies = replies

    def generate(self, input_ids, attention_mask, max_new_tokens, num_return_sequences=1, **kwargs):
        rows = []
        for ids in input_ids:
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            reply = next(text for key, text in self.replies.items() if key in prompt)
            new = self.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
            for _ in range(num_return_sequences):
                rows.append(ids.tolist() + new + [self.tokenizer.eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])


def test_accuracy_compares_parsed_answers():
    dataset = load_arithmetic("test", "prompt", num_examples=4)
    answers = dataset["answer"]
    replies = {
        dataset["question"][0]: f"x = {answers[0]}\nThe answer is {answers[0]}.",  # correct
        dataset["question"][1]: f"The answer is {int(answers[1]) + 1}.",  # wrong number
        dataset["question"][2]: f"so it is {answers[2]}",  # correct, parsed without the answer line
        dataset["question"][3]: "I do not know.",  # no number
    }
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "left"
    result = evaluate_accuracy(ScriptedModel(tokenizer, replies), tokenizer, dataset, batch_size=3)
    assert [sample["correct"] for sample in result["samples"]] == [True, False, True, False]
    assert result["accuracy"] == 0.5 and result["num_correct"] == 2 and result["num_examples"] == 4
    assert result["samples"][1]["parsed"] == str(int(answers[1]) + 1)
    assert result["samples"][3]["parsed"] is None


def test_generation_keeps_input_order_across_length_sorted_batches():
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "left"
    prompts = [[{"role": "user", "content": "q" * length}] for length in (9, 1, 5, 3)]
    replies = {"q" * length: f"reply {length}" for length in (9, 5, 3, 1)}  # longest key matched first
    completions = generate_completions(ScriptedModel(tokenizer, replies), tokenizer, prompts, batch_size=2)
    assert completions == [["reply 9"], ["reply 1"], ["reply 5"], ["reply 3"]]


def test_generation_requires_left_padding():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="padding_side='left'"):
        generate_completions(None, tokenizer, [[{"role": "user", "content": "x"}]])


def test_eval_command_writes_json_for_the_tiny_model(tmp_path):
    output = tmp_path / "eval.json"
    result = evaluate_model("tiny-llama", num_examples=3, max_new_tokens=4, output=str(output))
    written = json.loads(output.read_text())
    assert written["num_examples"] == 3 and len(written["samples"]) == 3
    assert written["accuracy"] == result["accuracy"] == sum(s["correct"] for s in written["samples"]) / 3


def sample_row(question_id, text, parsed, correct):
    return {
        "question_id": question_id,
        "prompt": [{"role": "user", "content": f"q{question_id}"}],
        "answer": "10",
        "completion": [{"role": "assistant", "content": text}],
        "parsed": parsed,
        "correct": correct,
        "solution": "5 + 5 = 10\nThe answer is 10.",
    }


def test_pairs_take_the_most_frequent_correct_and_incorrect_answers():
    samples = Dataset.from_list(
        [
            sample_row(0, "a: 7", "7", False),
            sample_row(0, "b: 10", "10", True),
            sample_row(0, "c: 9", "9", False),
            sample_row(0, "d: 9", "9", False),
            sample_row(1, "all right: 10", "10", True),  # no incorrect trajectory: no pair
            sample_row(2, "wrong: 3", "3", False),  # no correct trajectory: pair only with the fallback
        ]
    )
    pairs = build_preference_pairs(samples)
    assert pairs["question_id"] == [0]
    assert pairs[0]["chosen"][0]["content"] == "b: 10" and pairs[0]["rejected"][0]["content"] == "c: 9"

    with_fallback = build_preference_pairs(samples, reference_fallback=True)
    assert with_fallback["question_id"] == [0, 2]
    assert with_fallback[1]["chosen"][0]["content"] == "5 + 5 = 10\nThe answer is 10."


def test_sft_selection_by_answer_frequency():
    # 8 incorrect samples of one question: answers 5 (x3), 7 (x2), 9 (x2), 4 (x1); 7 is seen before 9.
    rows = [{"id": i, "parsed": answer} for i, answer in enumerate(["7", "5", "9", "5", "7", "4", "5", "9"])]

    def ids(selected):
        return [row["id"] for row in selected]

    assert ids(select_by_answer_frequency(rows, top_p=0.5)) == [0, 1, 3, 4, 6]  # 5: 3/8 < 0.5, then 7: 5/8 >= 0.5
    assert ids(select_by_answer_frequency(rows, top_p=0.375)) == [1, 3, 6]  # 5: 3/8 reaches it
    assert ids(select_by_answer_frequency(rows)) == list(range(8))  # top_p 1: every row, in order
    assert ids(select_by_answer_frequency(rows, max_rows=1)) == [1]  # cDPO's positive set: top-1
    assert ids(select_by_answer_frequency(rows, top_p=0.5, max_rows=4)) == [1, 3, 6, 0]  # by answer rank
    assert select_by_answer_frequency([], max_rows=1) == []
    with pytest.raises(ValueError, match="top_p"):
        select_by_answer_frequency(rows, top_p=0.0)


def test_pairs_reject_a_dataset_that_is_not_samples():
    with pytest.raises(ValueError, match="lacks columns"):
        build_preference_pairs(Dataset.from_list([{"prompt": "x"}]))


def test_sft_sets_select_per_question_by_answer_frequency():
    rows = [
        sample_row(0, "a: 7", "7", False),
        sample_row(0, "b: 10", "10", True),
        sample_row(0, "c: 9", "9", False),
        sample_row(0, "d: 9", "9", False),
        sample_row(1, "all right: 10", "10", True),
        sample_row(2, "wrong: 3", "3", False),
    ]
    samples = Dataset.from_list(rows)

    def texts(sft_rows):
        assert all(set(row) == {"prompt", "completion"} for row in sft_rows)
        return [row["completion"][0]["content"] for row in sft_rows]

    positive, negative = build_sft_sets(samples, positive_per_question=1, negative_top_p=0.5, reference_fallback=False)
    assert texts(positive) == ["b: 10", "all right: 10"]
    assert texts(negative) == ["c: 9", "d: 9", "wrong: 3"]  # question 0: 9 (2 of 3) covers half; 7 is left out
    assert positive[0]["prompt"] == rows[1]["prompt"]
    positive, negative = build_sft_sets(samples, positive_per_question=None, negative_top_p=1.0, reference_fallback=True)
    assert texts(positive) == ["b: 10", "all right: 10"] + [rows[0]["solution"]] * 3  # plus each question's reference
    assert texts(negative) == ["a: 7", "c: 9", "d: 9", "wrong: 3"]
    with pytest.raises(ValueError, match="'solution' column"):
        build_sft_sets(samples.remove_columns("solution"), positive_per_question=1, negative_top_p=0.5,
                       reference_fallback=True)
    with pytest.raises(ValueError, match="lacks columns"):
        build_sft_sets(Dataset.from_list([{"prompt": "x"}]), positive_per_question=1, negative_top_p=0.5,
                       reference_fallback=False)


def test_sampling_labels_every_trajectory_with_the_reward():
    samples = sample_trajectories(
        "tiny-llama", split="train", num_examples=2, num_samples_per_prompt=3, max_new_tokens=4, seed=0
    )
    assert len(samples) == 6 and samples["question_id"] == [0, 0, 0, 1, 1, 1]
    assert set(samples.column_names) >= {"prompt", "answer", "completion", "parsed", "correct", "solution"}
    again = sample_trajectories(
        "tiny-llama", split="train", num_examples=2, num_samples_per_prompt=3, max_new_tokens=4, seed=0
    )
    assert samples["completion"] == again["completion"]  # deterministic for a seed


def test_ranking_evaluation_scores_each_list_by_hand():
    import math

    from tokenweave.data.recommendation import load_recommendation
    from tokenweave.inference.evaluate import evaluate_ranking
    from tokenweave.rewards.ranking import load_catalog

    dataset = load_recommendation("test", num_examples=2, list_length=3)
    first, second = dataset[0], dataset[1]
    other = next(item for item in first["candidate_items"] if item not in first["relevant_items"])
    replies = {  # keyed by the history, which tells the two prompts apart
        first["history_items"][0]: f"1. {other}\n2. {first['relevant_items'][0]}\n3. {first['relevant_items'][1]}",
        second["history_items"][0]: f"{second['history_items'][0]}\nNot a movie",  # owned, then malformed
    }
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "left"
    result = evaluate_ranking(ScriptedModel(tokenizer, replies), tokenizer, dataset, catalog=load_catalog("recommendation"),
                              max_new_tokens=200)
    assert [sample["hits"] for sample in result["samples"]] == [[0.0, 1.0, 1.0], [0.0, 0.0]]
    r = len(first["relevant_items"])
    ideal = sum(1 / math.log2(j + 2) for j in range(min(r, 3)))
    assert result["recall@1"] == 0.0
    assert result["recall@3"] == pytest.approx(2 / r / 2)  # the mean over the two requests
    assert result["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / ideal / 2)
    assert result["well_formed"] == 0.5 and result["num_examples"] == 2


def test_eval_takes_any_dataset_with_prompt_and_answer_columns_and_refuses_a_missing_split(tmp_path):
    from tokenweave.cli import main as cli_main

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "answer": str(a + 1)} for a in range(3)]
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    output = tmp_path / "eval.json"
    cli_main(["eval", "--model", "tiny-llama", "--task", str(tmp_path / "questions.jsonl"), "--split", "train",
              "--max_new_tokens", "4", "--output", str(output)])
    written = json.loads(output.read_text())
    assert [sample["answer"] for sample in written["samples"]] == ["1", "2", "3"] and written["num_examples"] == 3
    with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train'\]"):
        cli_main(["eval", "--model", "tiny-llama", "--task", str(tmp_path / "questions.jsonl"), "--debug"])
