"""Options that only the model or the generated text can check, refused (or warned about) with a message that names
them, where they used to pass the config checks and fail late or train on the wrong tokens: attention credit's layers
against the model's (before any generation), FAI's horizon against the completions' length, and what a user's
Rank-GRPO item parser and gain function return."""

import logging

import pytest
import torch

from tokenweave.data.arithmetic import load_arithmetic
from tokenweave.inference import attention_credit as view
from tokenweave.rewards.ranking import RankedItem, checked_gains, get_item_parser
from tokenweave.trainers.attention import AttentionCreditConfig, short_for_horizon

from .grpo_harness import make_trainer

PROMPTS = load_arithmetic("train", "prompt", 2)


# ---------------------------------------------------------------------------------------------------------------
# attention_credit_layers against the model's layers (the tiny model has 2), before any generation.
# ---------------------------------------------------------------------------------------------------------------
def test_attention_credit_layers_beyond_the_model_are_refused_by_the_trainer(model_dir, tmp_path):
    with pytest.raises(ValueError) as refused:  # raised building the trainer: no generation ran
        make_trainer(model_dir, tmp_path, policy_loss="dapo", token_signals=["attention_credit"],
                     attention_credit_layers=[5])
    message = str(refused.value)
    assert "\n" not in message
    assert "attention_credit_layers [5]" in message and "model's 2 layers" in message
    assert "choose layers below 2" in message


def test_attention_credit_layers_beyond_the_model_are_refused_by_the_heatmap(tiny_model_cache, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("sampled before the layers were checked")

    monkeypatch.setattr(view, "generate_with_shared_prefix", no_generation)
    with pytest.raises(ValueError, match=r"attention_credit_layers \[1, 5\]: \[5\] beyond the model's 2 layers"):
        view.sample_credit_trajectories("tiny-llama", options=AttentionCreditConfig(attention_credit_layers=[1, 5]),
                                        num_examples=1)


# ---------------------------------------------------------------------------------------------------------------
# FAI's horizon against the completions' length.
# ---------------------------------------------------------------------------------------------------------------
def test_completions_shorter_than_the_horizon_are_warned_about_once(model_dir, tmp_path, caplog):
    # completions of at most 6 tokens (the harness's max_completion_length) under the default horizon [10, 100]:
    # their FAI is 0 everywhere, so the coupled rule credits their first tokens
    trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo", token_signals=["attention_credit"])
    rows = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    with caplog.at_level(logging.WARNING, logger="tokenweave.trainers.attention"):
        output = trainer._generate_and_score_completions(rows)
        trainer._generate_and_score_completions(rows)
    warnings = [record.getMessage() for record in caplog.records if record.name == "tokenweave.trainers.attention"]
    assert len(warnings) == 1
    assert warnings[0].startswith("attention_credit_horizon [10, 100]: 8 of 8 completions have 10 tokens or fewer")
    assert "set H_lo below the completions' length" in warnings[0]
    assert output["completion_mask"].sum(-1).max() <= 10


def test_short_for_horizon_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # lengths 3, 4 and an empty completion
    assert short_for_horizon(mask, AttentionCreditConfig(attention_credit_horizon=[3, 8])).startswith(
        "attention_credit_horizon [3, 8]: 1 of 3 completions have 3 tokens or fewer")
    assert short_for_horizon(mask, AttentionCreditConfig(attention_credit_horizon=[2, 8])) is None
    # local_chunk reads WAAD only
    assert short_for_horizon(mask, AttentionCreditConfig(attention_credit_rule="local_chunk")) is None


def test_the_heatmap_warns_about_completions_shorter_than_the_horizon(tiny_model_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenweave.inference.attention_credit"):
        view.sample_credit_trajectories("tiny-llama", num_examples=1, num_samples_per_prompt=2, max_new_tokens=6,
                                        batch_size=2)
    warnings = [record.getMessage() for record in caplog.records
                if record.name == "tokenweave.inference.attention_credit"]
    assert warnings == [warnings[0]] and warnings[0].startswith("attention_credit_horizon [10, 100]: 2 of 2")


# ---------------------------------------------------------------------------------------------------------------
# What a user's item parser and gain function return.
# ---------------------------------------------------------------------------------------------------------------
def decreasing_items(text):
    """A bad user parser (named as 'tests.test_option_checks_late:decreasing_items'): the starts go down."""
    return [RankedItem(4, text[4:]), RankedItem(0, text[:4])]


def repeated_items(text):
    """A bad user parser: two items start at the same character."""
    return [RankedItem(0, text), RankedItem(0, text)]


def items_past_the_text(text):
    """A bad user parser: an item starts past the text's last character."""
    return [RankedItem(0, text), RankedItem(len(text), "")]


def tuple_items(text):
    """A bad user parser: (start, text) tuples, not RankedItem."""
    return [(0, text)]


def no_items(text):
    """A bad user parser: returns a string."""
    return text


@pytest.mark.parametrize(("parser", "problem"), [
    ("decreasing_items", r"starts \[4, 0\] that do not strictly increase"),
    ("repeated_items", r"starts \[0, 0\] that do not strictly increase"),
    ("items_past_the_text", r"starts \[0, 17\] outside the text's characters 0\.\.16"),
    ("tuple_items", r"items of type \['tuple'\]"),
    ("no_items", "a str, not a list"),
])
def test_a_user_item_parser_returning_bad_items_is_refused(parser, problem):
    name = f"tests.test_option_checks_late:{parser}"
    with pytest.raises(ValueError, match=f"rank_item_parser '{name}' returned {problem}") as refused:
        get_item_parser(name)("A (1990)\nB (1991)")
    assert "\n" not in str(refused.value)


def gains_per_answer(items, **columns):
    """A bad user gain function (named as 'tests.test_option_checks_late:gains_per_answer'): one number per answer,
    not one per item."""
    return [1.0 for _ in items]


def test_a_gain_function_of_a_wrong_return_type_is_refused_by_the_trainer(model_dir, tmp_path):
    name = "tests.test_option_checks_late:gains_per_answer"
    trainer = make_trainer(model_dir, tmp_path, policy_loss="rank_grpo", rank_list_length=3, rank_gain_func=name)
    with pytest.raises(ValueError, match=f"rank_gain_func '{name}' returned a float for answer 0"):
        trainer._generate_and_score_completions([PROMPTS[0]] * 4 + [PROMPTS[1]] * 4)


def test_a_user_item_parser_is_checked_in_the_trainer(model_dir, tmp_path):
    name = "tests.test_option_checks_late:repeated_items"
    trainer = make_trainer(model_dir, tmp_path, policy_loss="rank_grpo", rank_list_length=3, rank_item_parser=name)
    with pytest.raises(ValueError, match=f"rank_item_parser '{name}' returned starts"):
        trainer._generate_and_score_completions([PROMPTS[0]] * 4 + [PROMPTS[1]] * 4)


def test_gains_are_one_finite_number_per_item():
    items = [["A (1990)", "B (1991)"], ["C (1992)"]]
    assert checked_gains([[1, 0.5], (0.0,)], items, "mine") == [[1.0, 0.5], [0.0]]
    for gains, problem in [({"a": 1}, "a dict, not a list"), ([[1.0, 0.0]], "1 rows for 2 answers"),
                           ([[1.0], [0.0]], "1 gains for the 2 items of answer 0"),
                           ([[1.0, float("nan")], [0.0]], r"gains \[1\.0, nan\] for answer 0, not all finite"),
                           ([[1.0, "1"], [0.0]], r"gains \[1\.0, '1'\] for answer 0, not all finite numbers")]:
        with pytest.raises(ValueError, match=f"rank_gain_func 'mine' returned {problem}"):
            checked_gains(gains, items, "mine")
