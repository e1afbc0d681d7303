"""TL-Training's key-token weighting (weight_rule_set: tl_key_tokens of the weight_rules signal): the key characters
and weights by hand, then through the tiny tokenizer (one token per character, so a key character is a key token) into
the ``rule_weights`` column, truncation, the combination with regular expressions, the refusals naming the row or the
trainer, and the shipped tiny config training."""

import json
import math

import pytest
from datasets import Dataset

from tokenweave.checks import ConfigError
from tokenweave.data import key_tokens
from tokenweave.models.registry import build_tiny_tokenizer
from tokenweave.train import train
from tokenweave.trainers import TokenDPOConfig, TokenSFTConfig
from tokenweave.trainers.weight_rules import WeightRulesSignal

from .conftest import CONFIGS, REPO_ROOT, prompt_and_completion_lengths
from .test_sft_trainer import make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEATHER_TOOLS = ["get_weather", "get_weather_forecast", "get_time", "calculate"]


# ---------------------------------------------------------------------------------------------------------------
# The pure rule: which characters, which weights.
# ---------------------------------------------------------------------------------------------------------------
def test_key_characters_by_hand():
    # get_weather vs get_weather_forecast: "get_weather" shared, the answer leaves it at "(" (11); vs get_time: "get_"
    # shared, "w" (4); calculate shares nothing; the first character (0) always
    assert key_tokens.key_characters("get_weather(city='Paris')", WEATHER_TOOLS) == [0, 4, 11]
    # the other name a prefix of the called one: it leaves get_weather at "_forecast" (11); get_time at "w" (4)
    assert key_tokens.key_characters("get_weather_forecast(city='Oslo', days=3)", WEATHER_TOOLS) == [0, 4, 11]
    # no tool shares a prefix: the first character only; leading whitespace skipped
    assert key_tokens.key_characters("  calculate(expression='2+2')", WEATHER_TOOLS) == [2]
    # two other names leaving it at the same character count once
    assert key_tokens.key_characters("search_web(query='x')", ["search_news", "search_nearby", "search_web"]) == [0, 7]
    # a name listed twice is the called tool, not another one
    assert key_tokens.key_characters("get_time(timezone='UTC')", ["get_time", "get_time", "get_timer"]) == [0, 8]


def test_key_token_weights_by_hand():
    # 3 key tokens, 24 others: 24 / 3 = 8 (under the cap)
    flags = [i in (0, 4, 11) for i in range(27)]
    assert key_tokens.key_token_weights(flags) == [8.0 if flag else 1.0 for flag in flags]
    # 1 key token, 20 others: 20 capped at 9, or at a given cap
    assert key_tokens.key_token_weight(1, 20) == 9.0 and key_tokens.key_token_weight(1, 20, max_weight=4.0) == 4.0
    # N_key >= N_other: every weight 1
    assert key_tokens.key_token_weights([True, True, False]) == [1.0, 1.0, 1.0]
    assert key_tokens.key_token_weights([True, False]) == [1.0, 1.0]
    assert key_tokens.key_token_weight(2, 3) == 1.5 and key_tokens.key_token_weight(0, 5) == 1.0


def test_tool_names_read_trls_tools_column():
    nested = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}, {"name": "calculate"}]
    assert key_tokens.tool_names(nested) == key_tokens.tool_names(json.dumps(nested)) == ["get_time", "calculate"]
    # a flat schema in a column Arrow filled with the other rows' keys
    assert key_tokens.tool_names([{"type": None, "function": None, "name": "search_web"}]) == ["search_web"]
    for bad, message in [(None, "has no tools"), ([], "has no tools"), (["get_time"], "has a tool without a name"),
                         ("[oops", "not JSON")]:
        with pytest.raises(ValueError, match=message):
            key_tokens.tool_names(bad)
    assert key_tokens.called_tool(" get_time(x=1)", ["get_timer", "get_time"]) == (1, "get_time")
    with pytest.raises(ValueError, match=r"does not start with a call name\(...\) of one of its tools"):
        key_tokens.called_tool("I will call get_time(x=1)", ["get_time"])


# ---------------------------------------------------------------------------------------------------------------
# Through the tiny tokenizer into the rule_weights column.
# ---------------------------------------------------------------------------------------------------------------
def tool_row(answer, names, question="Which tool?"):
    return {"prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}],
            "tools": json.dumps([{"type": "function", "function": {"name": name}} for name in names])}


ROWS = [
    # 25 answer characters + <|im_end|> + "\n": 27 label tokens, keys 0, 4, 11: 24 / 3 = 8
    (tool_row("get_weather(city='Paris')", WEATHER_TOOLS), {0: 8.0, 4: 8.0, 11: 8.0}),
    # 43 label tokens, keys 0 and 11 (vs get_weather); search_web shares nothing: 41 / 2 capped at 9
    (tool_row("get_weather_forecast(city='Oslo', days=3)", ["get_weather", "get_weather_forecast", "search_web"]),
     {0: 9.0, 11: 9.0}),
    # keys 0, 1, 2, 3 ("(", vs abcx) against ")", <|im_end|>, "\n": N_key 4 >= N_other 3, every weight 1
    (tool_row("abc()", ["ax", "abx", "abc", "abcx"]), {}),
]


def expected_weights(row, keys):
    return [keys.get(i, 1.0) for i in range(len(row["completion"][0]["content"]) + 2)]


def test_key_token_weights_in_the_rule_weights_column(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, dataset=Dataset.from_list([row for row, _ in ROWS]),
                           token_signals=["weight_rules"], weight_rule_set="tl_key_tokens")
    assert trainer.args.key_token_max_weight == 9.0
    for prepared, (row, keys) in zip(trainer.train_dataset, ROWS, strict=True):
        assert prepared["rule_weights"] == expected_weights(row, keys)


def test_truncation_counts_the_kept_label_tokens(model_dir, tmp_path):
    """12 of the 27 label tokens kept: keys 0, 4, 11 against 9 others weigh 3."""
    row = ROWS[0][0]
    prompt_length, _ = prompt_and_completion_lengths(build_tiny_tokenizer(), row, "completion")
    trainer = make_trainer(model_dir, tmp_path, dataset=Dataset.from_list([row]), token_signals=["weight_rules"],
                           weight_rule_set="tl_key_tokens", max_length=prompt_length + 12)
    assert trainer.train_dataset[0]["rule_weights"] == [3.0 if i in (0, 4, 11) else 1.0 for i in range(12)]


def test_regular_expressions_and_the_rule_set_multiply(model_dir, tmp_path):
    dataset = Dataset.from_list([row for row, _ in ROWS[:2]])
    rules = {r"city='\w+'": 2.0, r"get_": 0.5}
    weights = {}
    for name, options in [("rules", {"weight_rules": rules}), ("set", {"weight_rule_set": "tl_key_tokens"}),
                          ("both", {"weight_rules": rules, "weight_rule_set": "tl_key_tokens"})]:
        trainer = make_trainer(model_dir, tmp_path / name, dataset=dataset, token_signals=["weight_rules"], **options)
        weights[name] = [row["rule_weights"] for row in trainer.train_dataset]
    for by_rules, by_set, both in zip(weights["rules"], weights["set"], weights["both"], strict=True):
        assert both == [a * b for a, b in zip(by_rules, by_set, strict=True)]
    # "get_" 0.5, its "g" a key token (8, row 1: 9), then "w" a key token; city='Paris' 2
    assert weights["both"][0][:5] == [4.0, 0.5, 0.5, 0.5, 8.0] and weights["both"][0][12:24] == [2.0] * 12
    assert weights["both"][1][:5] == [4.5, 0.5, 0.5, 0.5, 1.0]


def test_the_micro_batch_normalizer_is_tl_trainings_loss_at_batch_one(model_dir, tmp_path):
    """TL-Training's per-sequence loss Σ w·ℓ / Σ w (its code runs at per-device batch 1): the trainer's loss with
    ``token_weight_normalizer: micro_batch`` on a batch of one row, from the model's log-probs by hand."""
    import torch

    from .test_sft_signals import full_forward

    trainer = make_trainer(model_dir, tmp_path, dataset=Dataset.from_list([ROWS[0][0]]), token_signals=["weight_rules"],
                           weight_rule_set="tl_key_tokens", token_weight_normalizer="micro_batch",
                           per_device_train_batch_size=1)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    logps, mask = full_forward(trainer.model, batch)[2:]
    weights = torch.tensor(expected_weights(*ROWS[0]))
    expected = (weights * -logps[mask]).sum() / weights.sum()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert weights.sum() > mask.sum()  # the key tokens weigh more than 1: not the plain mean


# ---------------------------------------------------------------------------------------------------------------
# Refusals.
# ---------------------------------------------------------------------------------------------------------------
def test_a_row_without_tools_is_refused_naming_the_row(model_dir, tmp_path):
    rows = [row for row, _ in ROWS] + [{**ROWS[0][0], "tools": None}]
    dataset = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"^weight_rule_set tl_key_tokens: row 3 of the train dataset has no tools"):
        make_trainer(model_dir, tmp_path, dataset=dataset, token_signals=["weight_rules"],
                     weight_rule_set="tl_key_tokens")
    # when the dataset is loaded, before any model: the same row; a dataset without the column at all, row 0
    args = TokenSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                          token_signals=["weight_rules"], weight_rule_set="tl_key_tokens")
    with pytest.raises(ValueError, match=r"row 3 of the tools.jsonl dataset has no tools") as raised:
        WeightRulesSignal.check_dataset(dataset, args, "tools.jsonl")
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=r"row 0 of the tools.jsonl dataset has no tools \(the dataset has no "):
        WeightRulesSignal.check_dataset(dataset.remove_columns("tools"), args, "tools.jsonl")
    wrong_call = Dataset.from_list([ROWS[0][0], tool_row("get_temperature(city='Rome')", WEATHER_TOOLS)])
    with pytest.raises(ValueError, match=r"row 1 of the tools.jsonl dataset has an answer that does not start with"):
        WeightRulesSignal.check_dataset(wrong_call, args, "tools.jsonl")
    WeightRulesSignal.check_dataset(Dataset.from_list([row for row, _ in ROWS]), args, "tools.jsonl")


def test_config_refusals(tmp_path):
    options = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "activation_checkpointing": False,
               "token_signals": ["weight_rules"]}
    with pytest.raises(ConfigError, match="is for the sft trainer, not dpo"):
        TokenDPOConfig(**options, weight_rule_set="tl_key_tokens")
    with pytest.raises(ConfigError, match=r"weight_rule_set must be one of \['tl_key_tokens'\]"):
        TokenSFTConfig(**options, weight_rule_set="key_tokens")
    with pytest.raises(ConfigError, match="key_token_max_weight must be >= 1"):
        TokenSFTConfig(**options, weight_rule_set="tl_key_tokens", key_token_max_weight=0.5)
    with pytest.raises(ConfigError, match="needs weight_rules: .* or a weight_rule_set"):
        TokenSFTConfig(**options)
    # a rule set turns the signal on
    del options["token_signals"]
    assert TokenSFTConfig(**options, weight_rule_set="tl_key_tokens").token_signals == ["weight_rules"]
    assert not TokenSFTConfig(**options).token_signals
    with pytest.raises(ConfigError, match="is for the sft trainer, not dpo"):
        TokenDPOConfig(**options, weight_rule_set="tl_key_tokens")


# ---------------------------------------------------------------------------------------------------------------
# The shipped tiny config.
# ---------------------------------------------------------------------------------------------------------------
def test_key_tokens_tiny_config_trains(tmp_path, tiny_model_cache, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the config names its dataset from the repository root
    info = train(["--config", str(CONFIGS / "sft_key_tokens_tiny.yaml"), "--output_dir", str(tmp_path / "out"),
                  "--max_steps", "2"])
    assert info["global_step"] == 2 and math.isfinite(info["train_metrics"]["train_loss"])
    assert info["method_options"]["weight_rule_set"] == "tl_key_tokens"
    assert info["method_options"]["key_token_max_weight"] == 9.0
    weights = [entry["weights/mean"] for entry in info["log_history"] if "weights/mean" in entry]
    assert len(weights) == 2 and all(weight > 1 for weight in weights)
