"""Tests for the math reward functions and the reward registry."""

import threading

import pytest

from tokenweave.data.arithmetic import load_arithmetic
from tokenweave.rewards import (
    REWARD_FUNCS,
    closeness_reward,
    correctness_reward,
    extract_answer,
    format_reward,
    get_reward_func,
    is_correct,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("23 + 45 = 68\nThe answer is 68.", "68"),
        ("The answer is 1,234.", "1234"),
        ("The answer is -5.", "-5"),
        ("The answer is: $68$", "68"),
        ("The answer is \\boxed{68}.", "68"),
        ("The answer is 68 apples, since 20 + 48 = 68", "68"),
        ("The answer is 12. Wait, no. The answer is 14.", "14"),
        ("So the total is \\boxed{68}", "68"),
        ("Altogether she has 1,234 stamps", "1234"),
        ("I end up with 68.", "68"),
        ("no number here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("12 + 56 = 68\nThe answer is 68.", "68", 1.0),
        ("12 + 56 = 69\nThe answer is 69.", "68", 0.0),
        ("The answer is 1,234.", "1234", 1.0),
        ("The answer is 1234", "1234", 1.0),
        ("The answer is 68.0", "68", 1.0),
        ("Final: \\boxed{68}", "68", 1.0),
        ("Final: \\boxed{67}", "68", 0.0),
        ("The answer is -5.", "-5", 1.0),
        ("The answer is 5.", "-5", 0.0),
        ("I don't know.", "68", 0.0),
        ("", "68", 0.0),
        (None, "68", 0.0),
    ],
)
def test_correctness_reward_plain_and_conversational(completion, gold, expected):
    assert correctness_reward(["q"], [completion], answer=[gold]) == [expected]
    conversational = None if completion is None else chat(completion)
    assert correctness_reward([chat("q")], [conversational], answer=[gold]) == [expected]
    assert is_correct(completion, gold) is bool(expected)


def test_correctness_reward_reads_last_assistant_message_and_text_parts():
    tool_turns = [
        {"role": "assistant", "content": "The answer is 3."},
        {"role": "tool", "content": "The answer is 99."},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is 68."}]},
    ]
    no_content = [{"role": "assistant", "content": None}]
    assert correctness_reward([None, None], [tool_turns, no_content], answer=["68", "68"]) == [1.0, 0.0]


def test_correctness_reward_gold_handling():
    # A missing or unparseable gold answer skips the row (TRL treats None as "no reward").
    assert correctness_reward([None] * 3, ["The answer is 4."] * 3, answer=["4", None, "n/a"]) == [
        1.0,
        None,
        None,
    ]
    assert is_correct("The answer is 4.", None) is False
    assert is_correct("The answer is 4.", 4) is True
    with pytest.raises(ValueError, match="answer"):
        correctness_reward(["q"], ["The answer is 4."])
    with pytest.raises(ValueError):
        correctness_reward(["q", "q"], ["The answer is 4.", "The answer is 5."], answer=["4"])


def test_correctness_reward_accepts_trainer_kwargs():
    """GRPOTrainer passes every dataset column and a few extras as keyword arguments."""
    rewards = correctness_reward(
        prompts=[chat("q")],
        completions=[chat("The answer is 7.")],
        completion_ids=[[1, 2, 3]],
        answer=["7"],
        question=["q"],
        trainer_state=None,
        log_extra=None,
        log_metric=None,
    )
    assert rewards == [1.0]


def test_rewards_work_outside_the_main_thread():
    """math-verify's signal-based timeout cannot run in a worker thread; the rewards must still work."""
    results = {}

    def run():
        results["correct"] = correctness_reward(["q"], ["The answer is \\boxed{68}"], answer=["68"])
        results["extract"] = extract_answer("so it is \\boxed{68}")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert results == {"correct": [1.0], "extract": "68"}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("12 + 56 = 68\nThe answer is 68.", 1.0),
        ("The answer is 68.", 1.0),
        ("12 + 56 = 68\nThe answer is 68.  \n\n", 1.0),
        ("The answer is 1,234.", 1.0),
        ("The answer is -5.", 1.0),
        ("12 + 56 = 68\nThe answer is 68", 0.0),  # no period
        ("The answer is 68.\nHope this helps!", 0.0),  # not the last line
        ("So the answer is 68.", 0.0),  # not a line of its own
        ("The answer is sixty-eight.", 0.0),
        ("\\boxed{68}", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(["q"], [completion]) == [expected]
    if completion is not None:
        assert format_reward([chat("q")], [chat(completion)]) == [expected]


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_rewards_on_arithmetic_pairs(difficulty):
    data = load_arithmetic("train", "preference", num_examples=30, difficulty=difficulty)
    prompts = data["prompt"]
    assert correctness_reward(prompts, data["chosen"], answer=data["answer"]) == [1.0] * 30
    assert correctness_reward(prompts, data["rejected"], answer=data["answer"]) == [0.0] * 30
    assert format_reward(prompts, data["chosen"]) == [1.0] * 30
    assert format_reward(prompts, data["rejected"]) == [1.0] * 30


def test_registry():
    from tokenweave.rewards import ndcg_reward, recall_reward

    assert REWARD_FUNCS == {"correctness": correctness_reward, "format": format_reward, "closeness": closeness_reward,
                            "ndcg": ndcg_reward, "recall": recall_reward}
    assert get_reward_func("correctness") is correctness_reward
    assert get_reward_func("format") is format_reward
    assert get_reward_func("tokenweave.rewards.math:format_reward") is format_reward


@pytest.mark.parametrize(
    "name",
    [
        "accuracy",  # unknown name
        "tokenweave.rewards.math:no_such_fn",
        "no_such_module:fn",
        "tokenweave.rewards:REWARD_FUNCS",  # not callable
    ],
)
def test_registry_errors(name):
    with pytest.raises(ValueError, match="reward function") as error:
        get_reward_func(name)
    if ":" not in name:
        assert "correctness" in str(error.value) and "format" in str(error.value)


def test_closeness_reward_gives_partial_credit():
    from tokenweave.rewards import closeness_reward, get_reward_func

    completions = ["The answer is 50.", "The answer is 75.", "The answer is 200.", "no number", "The answer is 1,010."]
    rewards = closeness_reward(None, completions, answer=["50", "50", "50", "50", "1000"])
    assert rewards == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.99])
    assert closeness_reward(None, ["The answer is 3."], answer=["x"]) == [None]
    assert get_reward_func("closeness") is closeness_reward
    with pytest.raises(ValueError, match="answer"):
        closeness_reward(None, ["1"])
