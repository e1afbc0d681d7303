"""Tests for the offline arithmetic word-problem task."""

import json
import operator
import os
import re
import subprocess
import sys

import pytest

from tokenweave.data.arithmetic import (
    DIFFICULTIES,
    FORMATS,
    INSTRUCTION,
    build_instruction,
    build_prompt,
    generate_problems,
    load_arithmetic,
)

STEP_LINE = re.compile(r"(\d+) ([+\-×]) (\d+) = (-?\d+)")
FINAL_LINE = re.compile(r"The answer is (-?\d+)\.")
PYTHON_OPS = {"+": operator.add, "-": operator.sub, "×": operator.mul}


def parse_solution(solution: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """Split a worked solution into (left, op, right, shown result) steps and the final answer."""
    *step_lines, final_line = solution.split("\n")
    steps = []
    for line in step_lines:
        match = STEP_LINE.fullmatch(line)
        assert match, f"malformed step line {line!r}"
        left, op, right, result = match.groups()
        steps.append((int(left), op, int(right), int(result)))
    final = FINAL_LINE.fullmatch(final_line)
    assert final, f"malformed final line {final_line!r}"
    return steps, int(final.group(1))


def question_numbers(question: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", question)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_gives_identical_datasets(fmt):
    first = load_arithmetic("train", fmt, num_examples=50, difficulty="medium", seed=3)
    second = load_arithmetic("train", fmt, num_examples=50, difficulty="medium", seed=3)
    assert first.to_list() == second.to_list()


def test_different_seeds_give_different_datasets():
    first = load_arithmetic("train", "prompt", num_examples=50, seed=0)
    second = load_arithmetic("train", "prompt", num_examples=50, seed=1)
    assert first["question"] != second["question"]
    assert len(set(first["question"]) & set(second["question"])) < 5


def test_deterministic_across_python_runs():
    """String hashing is salted per process: a different PYTHONHASHSEED must not change the data."""
    code = (
        "import json\n"
        "from tokenweave.data.arithmetic import generate_problems\n"
        "print(json.dumps([p.to_dict() for p in generate_problems(30, 'hard', 'test', seed=7)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    output = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout
    assert json.loads(output) == [p.to_dict() for p in generate_problems(30, "hard", "test", seed=7)]


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_train_and_test_questions_are_disjoint(difficulty):
    train = set(load_arithmetic("train", "prompt", num_examples=400, difficulty=difficulty)["question"])
    test = set(load_arithmetic("test", "prompt", num_examples=150, difficulty=difficulty)["question"])
    # The split is a property of the question, so it also holds across seeds.
    other_seed_test = set(
        load_arithmetic("test", "prompt", num_examples=150, difficulty=difficulty, seed=1)["question"]
    )
    assert len(train) == 400 and len(test) == 150
    assert not train & test
    assert not train & other_seed_test


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_answers_match_worked_solutions(difficulty):
    for problem in generate_problems(300, difficulty, seed=11):
        example = problem.to_dict()
        assert set(example) == {"question", "answer", "solution", "difficulty"}
        assert example["difficulty"] == difficulty
        steps, final = parse_solution(example["solution"])
        results = []
        for left, op, right, shown in steps:
            assert PYTHON_OPS[op](left, right) == shown, example["solution"]
            results.append(shown)
        for i, result in enumerate(results[:-1]):  # a chain: each result feeds a later step
            assert any(result in (left, right) for left, _, right, _ in steps[i + 1 :]), example["solution"]
        assert final == results[-1] == int(example["answer"])
        assert example["answer"] == str(final)
        assert min(results) > 0
        operands = {x for left, _, right, _ in steps for x in (left, right)}
        assert set(question_numbers(example["question"])) <= operands, example


def test_difficulty_ranges():
    ops_seen = {d: set() for d in DIFFICULTIES}
    for difficulty, (min_steps, max_steps), (low, high) in [
        ("easy", (1, 1), (2, 99)),
        ("medium", (1, 2), (10, 99)),
        ("hard", (2, 3), (10, 999)),
    ]:
        for problem in generate_problems(300, difficulty, seed=5):
            steps, _ = parse_solution(problem.solution)
            assert min_steps <= len(steps) <= max_steps, problem.solution
            multipliers = {left for left, op, _, _ in steps if op == "×"}
            assert all(2 <= k <= 9 for k in multipliers)
            for number in question_numbers(problem.question):
                assert low <= number <= high or number in multipliers, (number, problem.question)
            ops_seen[difficulty] |= {op for _, op, _, _ in steps}
    assert ops_seen == {"easy": {"+", "-"}, "medium": {"+", "-", "×"}, "hard": {"+", "-", "×"}}


def test_rejected_solution_goes_wrong_and_propagates():
    for difficulty in DIFFICULTIES:
        dataset = load_arithmetic("train", "preference", num_examples=200, difficulty=difficulty)
        for row in dataset:
            chosen_steps, chosen_final = parse_solution(row["chosen"][0]["content"])
            rejected_steps, rejected_final = parse_solution(row["rejected"][0]["content"])
            assert chosen_final == int(row["answer"])
            assert rejected_final != int(row["answer"])
            assert rejected_final == rejected_steps[-1][3]
            assert len(rejected_steps) == len(chosen_steps)
            wrong = [s for s in rejected_steps if PYTHON_OPS[s[1]](s[0], s[2]) != s[3]]
            assert len(wrong) == 1, row["rejected"]  # one slip; later steps carry it consistently
            assert all(x >= 0 for step in rejected_steps for x in (step[0], step[2], step[3]))


def test_formats_columns_and_roles():
    sft = load_arithmetic("train", "sft", num_examples=5)
    prompt = load_arithmetic("train", "prompt", num_examples=5)
    preference = load_arithmetic("train", "preference", num_examples=5)
    assert sft.column_names == ["prompt", "completion"]
    assert prompt.column_names == ["prompt", "question", "answer", "solution"]
    assert preference.column_names == ["prompt", "chosen", "rejected", "answer"]

    problems = generate_problems(5)
    for problem, s, p, d in zip(problems, sft, prompt, preference, strict=True):
        expected_prompt = [{"role": "user", "content": build_instruction(problem.question)}]
        assert s["prompt"] == p["prompt"] == d["prompt"] == expected_prompt
        assert s["completion"] == [{"role": "assistant", "content": problem.solution}]
        assert p["question"] == problem.question and p["answer"] == problem.answer
        assert d["chosen"] == s["completion"]
        assert d["rejected"][0]["role"] == "assistant" and d["answer"] == problem.answer


def test_instruction():
    question = "Ava has 3 apples. How many apples does Ava have?"
    assert "step by step" in INSTRUCTION and '"The answer is <number>."' in INSTRUCTION
    assert build_instruction(question) == f"{INSTRUCTION}\n\n{question}"
    assert build_prompt(question) == [{"role": "user", "content": build_instruction(question)}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "validation"}, "split"),
        ({"fmt": "dpo"}, "fmt"),
        ({"difficulty": "extreme"}, "difficulty"),
        ({"num_examples": 0}, "num_examples"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_arithmetic(**kwargs)
