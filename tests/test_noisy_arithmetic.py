"""The built-in ``noisy_arithmetic`` task: the share of noisy train rows, clean and disjoint test/clean splits, planted
spans that are exactly the differing characters, wrong steps carried on to a wrong answer, the planted-token mask on
a hand-made example, and the oracle weight column aligned with TRL 1.16's own SFT tokenisation."""

import re

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from tokenweave.checks import ConfigError
from tokenweave.config import RunArguments, parse_run_config
from tokenweave.data.arithmetic import _split_of, load_arithmetic
from tokenweave.data import BUILTIN_TASKS
from tokenweave.data.loading import load_run_dataset
from tokenweave.data.noisy_arithmetic import (
    NOISE_KINDS,
    load_noisy_arithmetic,
    noisy_split_of,
    oracle_weights_column,
    planted_label_mask,
    planted_spans,
    tokenize_like_sft,
)
from tokenweave.models import build_tiny_llama
from tokenweave.models.registry import _TINY_SPECIAL_TOKENS, CHATML_TEMPLATE
from tokenweave.train import build_trainer
from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer

from .conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_llama()[1]


def content(row) -> str:
    return row["completion"][0]["content"]


def planted_characters(row) -> set[int]:
    return {index for start, end in row["planted_spans"] for index in range(start, end)}


# ---------------------------------------------------------------------------------------------------------------
# Rows and splits
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share, num_examples", [(0.0, 40), (0.3, 40), (0.3, 25), (0.5, 40), (1.0, 40)])
def test_the_share_of_noisy_train_rows_is_the_setting(share, num_examples):
    """Exactly round(share × rows) noisy rows (0.3 × 25 = 7.5 → 8): those have a noise kind and planted spans, the
    others neither, and their solution is the clean one."""
    dataset = load_noisy_arithmetic("train", num_examples, seed=3, noise_share=share)
    clean = load_noisy_arithmetic("train", num_examples, seed=3, noise_share=0.0)
    assert dataset["prompt"] == clean["prompt"]  # the noise never changes which problems are drawn
    noisy = [row for row in dataset if row["noise_kind"] != "none"]
    assert len(noisy) == int(share * num_examples + 0.5)
    for row, clean_row in zip(dataset, clean, strict=True):
        assert row["noise_kind"] in ("none", *NOISE_KINDS)
        assert (row["noise_kind"] != "none") == bool(row["planted_spans"]) == (row["completion"] != clean_row["completion"])
    assert load_noisy_arithmetic("train", num_examples, seed=3, noise_share=share)[:] == dataset[:]  # deterministic


def test_noise_kinds_are_drawn_from_the_setting():
    both = load_noisy_arithmetic("train", 60, noise_share=1.0)
    assert set(both["noise_kind"]) == set(NOISE_KINDS)
    assert set(load_noisy_arithmetic("train", 20, noise_share=1.0, noise_kinds=["junk"])["noise_kind"]) == {"junk"}
    with pytest.raises(ValueError, match="noise kind"):
        load_noisy_arithmetic("train", 5, noise_kinds=["typo"])
    with pytest.raises(ValueError, match=r"noise_share must be a number in \[0, 1\]"):
        load_noisy_arithmetic("train", 5, noise_share=1.5)


def test_the_sft_format_is_the_arithmetic_tasks():
    """Clean rows are the arithmetic task's SFT rows (same prompt, same completion); the test split is the
    arithmetic task's test split, clean, whatever the noise setting."""
    test = load_noisy_arithmetic("test", 30, seed=1, noise_share=1.0)
    arithmetic_test = load_arithmetic("test", "sft", 30, seed=1)
    assert test["prompt"] == arithmetic_test["prompt"] and test["completion"] == arithmetic_test["completion"]
    assert set(test["noise_kind"]) == {"none"} and test["planted_spans"] == [[]] * 30
    train = load_noisy_arithmetic("train", 30, seed=1, noise_share=0.0)
    arithmetic_train = {row["prompt"][0]["content"]: row["completion"] for row in load_arithmetic("train", "sft", 60,
                                                                                                   seed=1)}
    for row in train:
        assert row["completion"] == arithmetic_train[row["prompt"][0]["content"]]


def questions(dataset) -> set[str]:
    return {row["prompt"][0]["content"] for row in dataset}


def test_train_test_and_clean_splits_are_disjoint_and_the_clean_split_is_clean():
    train = load_noisy_arithmetic("train", 400, seed=2)
    test = load_noisy_arithmetic("test", 150, seed=2)
    clean = load_noisy_arithmetic("clean", 150, seed=2, noise_share=1.0)
    assert set(clean["noise_kind"]) == {"none"} and clean["planted_spans"] == [[]] * 150
    assert not questions(train) & questions(test) and not questions(train) & questions(clean)
    assert not questions(clean) & questions(test)
    for split, dataset in (("train", train), ("test", test), ("clean", clean)):
        assert {noisy_split_of(q.split("\n\n", 1)[1]) for q in questions(dataset)} == {split}
    # the clean split is carved out of the arithmetic task's train questions, never its test ones
    assert {_split_of(q.split("\n\n", 1)[1]) for q in questions(clean)} == {"train"}
    # through the run loader: the split name `clean`, 200 rows by default
    loaded = load_run_dataset("noisy_arithmetic", "clean", "sft", seed=2)
    assert "noisy_arithmetic" in BUILTIN_TASKS and len(loaded) == 200 and set(loaded["noise_kind"]) == {"none"}


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_only_sft_can_load_the_task(method):
    with pytest.raises(ValueError, match=f"noisy_arithmetic task is SFT only.*method '{method}'") as error:
        load_run_dataset("noisy_arithmetic", "train", method, num_examples=4)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Planted spans
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clean, noisy, expected", [
    # a wrong digit (68 → 63) copied on to the next line and to the answer: only the differing "3"s
    ("23 + 45 = 68\n68 - 10 = 58\nThe answer is 58.", "23 + 45 = 63\n63 - 10 = 53\nThe answer is 53.",
     [[11, 12], [14, 15], [24, 25], [41, 42]]),
    # a wrong operator: the operator and the results that follow from it
    ("62 - 27 = 35\nThe answer is 35.", "62 + 27 = 89\nThe answer is 89.", [[3, 4], [10, 12], [27, 29]]),
    # a junk span before the line break
    ("12 + 7 = 19\nThe answer is 19.", "12 + 7 = 19q#Z\nThe answer is 19.", [[11, 14]]),
    # a number that only got shorter (100 → 10): nothing differs there, the number is planted
    ("50 + 50 = 100", "50 + 50 = 10", [[10, 12]]),
    ("12 + 7 = 19", "12 + 7 = 19", []),
])
def test_planted_spans_are_the_differing_characters(clean, noisy, expected):
    assert planted_spans(clean, noisy) == expected


def test_junk_rows_plant_exactly_the_inserted_characters():
    dataset = load_noisy_arithmetic("train", 40, seed=5, noise_share=1.0, noise_kinds=["junk"])
    clean = load_noisy_arithmetic("train", 40, seed=5, noise_share=0.0)
    for row, clean_row in zip(dataset, clean, strict=True):
        [[start, end]] = row["planted_spans"]
        text = content(row)
        assert 3 <= end - start <= 6 and not any(c.isspace() or c.isdigit() for c in text[start:end])
        assert text[:start] + text[end:] == content(clean_row)


CALCULATION = re.compile(r"^(\d+) ([+×-]) (\d+) = (\d+)$")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_a_wrong_step_is_carried_on_to_a_wrong_answer_and_every_changed_number_is_planted(difficulty):
    """Each wrong_step row: one line is wrong (a result off from its own calculation, or another operator than the
    clean line's), the later lines compute correctly from the wrong value, the final answer differs from the clean
    one; the words (numbers, operators) that differ from the clean solution are exactly the words with a planted
    character."""
    noisy = load_noisy_arithmetic("train", 60, difficulty, seed=4, noise_share=1.0, noise_kinds=["wrong_step"])
    clean = load_noisy_arithmetic("train", 60, difficulty, seed=4, noise_share=0.0)
    kinds = set()
    for row, clean_row in zip(noisy, clean, strict=True):
        assert row["noise_kind"] == "wrong_step"
        text, clean_text = content(row), content(clean_row)
        lines, clean_lines = text.split("\n"), clean_text.split("\n")
        assert len(lines) == len(clean_lines)
        assert lines[-1] != clean_lines[-1] and lines[-1].startswith("The answer is ")
        calculations = [CALCULATION.match(line).groups() for line in lines[:-1]]
        clean_calculations = [CALCULATION.match(line).groups() for line in clean_lines[:-1]]
        off = [i for i, (a, op, b, r) in enumerate(calculations) if OPERATIONS[op](int(a), int(b)) != int(r)]
        swapped = [i for i, (mine, theirs) in enumerate(zip(calculations, clean_calculations)) if mine[1] != theirs[1]]
        assert len(off) + len(swapped) == 1  # one wrong line, every other one computes
        kinds.add("digit" if off else "operator")
        assert lines[-1] == f"The answer is {calculations[-1][3]}."
        planted = planted_characters(row)
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        clean_words = re.findall(r"\S+", clean_text)
        assert len(words) == len(clean_words)
        for (start, end), clean_word in zip(words, clean_words):
            assert (text[start:end] != clean_word) == bool(planted & set(range(start, end))), (text, clean_word)
    assert kinds == {"digit", "operator"}
    if difficulty == "easy":  # an easy solution gets no new symbol
        assert "×" not in "".join(content(row) for row in noisy)


# ---------------------------------------------------------------------------------------------------------------
# Per-token ground truth
# ---------------------------------------------------------------------------------------------------------------
def merging_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny ChatML tokenizer with a few multi-character tokens ("12", "18", "The", " answer"), so a token can
    overlap a planted span in part."""
    merged = ["12", "18", "The", " answer"]
    characters = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(_TINY_SPECIAL_TOKENS + characters + merged)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(merged) + r"|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(_TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", unk_token="<|unk|>",
                                   eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)


HAND_MADE = {"prompt": [{"role": "user", "content": "What is 12 + 7?"}],
             "completion": [{"role": "assistant", "content": "12 + 7 = 18\nThe answer is 18."}]}
# the labelled tokens: the completion's, then the template's end of turn
HAND_MADE_TOKENS = ["12", " ", "+", " ", "7", " ", "=", " ", "18", "\n", "The", " answer", " ", "i", "s", " ", "18", ".",
                    "<|im_end|>", "\n"]


@pytest.mark.parametrize("spans, expected_ones", [
    ([[10, 11], [27, 28]], [8, 16]),  # the "8" of each "18": the whole merged token
    ([[28, 29]], [17]),  # the final "."
    ([[0, 1]], [0]),  # the "1" of "12"
    ([[13, 15]], [10]),  # "he" inside "The"
    ([[15, 16], [16, 18]], [11]),  # two spans in " answer"
    ([[11, 12]], [9]),  # the line break
    ([], []),
])
def test_planted_label_mask_on_a_hand_made_example(spans, expected_ones):
    tokenizer = merging_tokenizer()
    tokens = tokenize_like_sft(HAND_MADE, tokenizer)
    labelled = [token for token, label in zip(tokens["input_ids"], tokens["labels"], strict=True) if label != -100]
    assert [tokenizer.decode([token]) for token in labelled] == HAND_MADE_TOKENS
    mask = planted_label_mask(tokenizer, tokens["input_ids"], tokens["labels"], HAND_MADE["completion"], spans)
    assert mask == [int(index in expected_ones) for index in range(len(HAND_MADE_TOKENS))]
    # every token labelled (completion_only_loss=False): the same ones, after the prompt's tokens
    everything = tokenize_like_sft(HAND_MADE, tokenizer, completion_only_loss=False)
    prompt_length = len(tokens["labels"]) - len(labelled)
    full_mask = planted_label_mask(tokenizer, everything["input_ids"], everything["labels"], HAND_MADE["completion"],
                                   spans)
    assert full_mask == [0] * prompt_length + mask


def test_planted_label_mask_needs_the_whole_assistant_text(tokenizer):
    tokens = tokenize_like_sft(HAND_MADE, tokenizer)
    with pytest.raises(ValueError, match="not in the tokenised sequence"):
        planted_label_mask(tokenizer, tokens["input_ids"][:-8], tokens["labels"][:-8], HAND_MADE["completion"],
                           [[0, 1]])


def make_trainer(trainer_class, config_class, model_dir, tmp_path, dataset, **options):
    args = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                        per_device_train_batch_size=4, activation_checkpointing=False, max_length=None, seed=0,
                        shuffle_dataset=False, dataset_num_proc=None, **options)
    return trainer_class(model=model_dir, args=args, train_dataset=dataset)


@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_the_oracle_column_aligns_with_trls_tokenisation(model_dir, tmp_path, tokenizer, completion_only_loss):
    """TRL's SFTTrainer prepares the rows: for every row, the oracle column has one weight per token it labels,
    the same ids as tokenize_like_sft, and zeros exactly at the labelled tokens whose characters are planted (the
    junk itself, for a junk row). TokenSFTTrainer accepts the column for the weights signal and weighs its loss."""
    raw = load_noisy_arithmetic("train", 16, seed=6, noise_share=0.5)
    dataset = oracle_weights_column(raw, tokenizer, completion_only_loss=completion_only_loss is not False)
    trl = make_trainer(SFTTrainer, SFTConfig, model_dir, tmp_path, dataset, completion_only_loss=completion_only_loss)
    assert len(trl.train_dataset) == len(dataset)
    noisy_rows = 0
    for row, prepared in zip(dataset, trl.train_dataset, strict=True):
        ids, labels = prepared["input_ids"], prepared["labels"]
        labelled = [index for index, label in enumerate(labels) if label != -100]
        weights = row["token_weights"]
        assert len(weights) == len(labelled)
        mine = tokenize_like_sft(row, tokenizer, completion_only_loss is not False)
        assert mine == {"input_ids": ids, "labels": labels}
        mask = planted_label_mask(tokenizer, ids, labels, row["completion"], row["planted_spans"])
        zeros = [index for index, weight in zip(labelled, weights, strict=True) if weight == 0]
        assert zeros == [index for index, planted in zip(labelled, mask, strict=True) if planted]
        assert set(weights) <= {0.0, 1.0} and bool(zeros) == (row["noise_kind"] != "none")
        noisy_rows += row["noise_kind"] != "none"
        if row["noise_kind"] == "junk":  # a character per token: the zeroed tokens spell the junk
            [[start, end]] = row["planted_spans"]
            assert tokenizer.decode([ids[index] for index in zeros]) == content(row)[start:end]
    assert noisy_rows == 8

    ours = make_trainer(TokenSFTTrainer, TokenSFTConfig, model_dir, tmp_path, dataset,
                        completion_only_loss=completion_only_loss, token_signals=["weights"])
    batch = ours.data_collator([ours.train_dataset[index] for index in range(4)])
    loss = ours.compute_loss(ours.model, dict(batch))
    assert loss.isfinite()


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
def test_the_noise_options_are_checked_and_reach_a_training_run(tmp_path, tiny_model_cache):
    assert RunArguments().task_noise_share == 0.3 and RunArguments().task_noise_kinds == list(NOISE_KINDS)
    with pytest.raises(ConfigError, match=r"task_noise_share must be in \[0, 1\], got 1.5"):
        RunArguments(task_noise_share=1.5)
    with pytest.raises(ConfigError, match="task_noise_kinds must be one or more of"):
        RunArguments(task_noise_kinds=["typo"])
    with pytest.raises(ConfigError, match="task_noise_kinds must be one or more of"):
        RunArguments(task_noise_kinds=[])
    configs = parse_run_config([
        "--config", str(CONFIGS / "sft_tiny.yaml"), "--output_dir", str(tmp_path), "--dataset_name", "noisy_arithmetic",
        "--num_train_examples", "8", "--task_noise_share", "0.5", "--task_noise_kinds", "junk",
        "--max_length", "1024",  # sft_tiny's 256 cuts some of these prompts short: TRL drops those rows
    ])
    trainer = build_trainer(*configs)
    kinds = list(trainer.train_dataset["noise_kind"])
    assert len(kinds) == 8 and kinds.count("junk") == 4 and kinds.count("none") == 4
    trainer.args.max_steps = 1  # the extra columns (planted_spans, noise_kind) do not reach the batches
    assert trainer.train().global_step == 1
