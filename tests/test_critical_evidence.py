"""The evidence layer of the critical-token pipeline: the arithmetic task's first-error rule, hit@k / MRR against a
random ranking, the localization report of a pairs dataset, the random-signal shuffle, and the rollout test's
forbidden token."""

import json
import random

import pytest
import torch
from datasets import Dataset

from tokenweave.cli import main as cli_main
from tokenweave.data.arithmetic import generate_problems
from tokenweave.data.arithmetic_errors import FirstError, Unreadable, first_error
from tokenweave.data.token_columns import content_tokens, token_texts, tokenize_like_dpo
from tokenweave.inference.generation import generate_with_shared_prefix
from tokenweave.inference.rollout import ForbidFirstToken, rollout_correct_share
from tokenweave.models import build_tiny_llama
from tokenweave.pipelines.localization import first_error_token, localization_report
from tokenweave.tokens.controls import row_generator, shuffle_within_mask
from tokenweave.tokens.localization import random_rank_metrics, rank_metrics

SOLUTION = "23 + 45 = 68\nThe answer is 68."
TWO_STEPS = "6 × 12 = 72\n50 - 72 = 0\nThe answer is 0."  # the rule does not check the story, only the lines


def error_char(completion, solution=SOLUTION):
    error = first_error(completion, solution)
    assert isinstance(error, FirstError), error
    return error.kind, error.step, completion[error.offset]


# ---------------------------------------------------------------------------------------------------
# The first-error rule


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("23 + 45 = 67\nThe answer is 67.", ("result", 0, "7")),  # a wrong result digit
        ("23 + 45 = 58\nThe answer is 58.", ("result", 0, "5")),  # the first wrong digit, not the last
        ("23 - 45 = 68\nThe answer is 68.", ("operator", 0, "-")),  # a wrong operator
        ("24 + 45 = 69\nThe answer is 69.", ("operand", 0, "4")),  # a wrong left operand
        ("23 + 44 = 67\nThe answer is 67.", ("operand", 0, "4")),  # a wrong right operand: its wrong digit
        ("45 + 23 = 67\nThe answer is 67.", ("result", 0, "7")),  # swapped operands of + are right
        ("45 + 24 = 69\nThe answer is 69.", ("operand", 0, "4")),  # swapped, then a wrong operand
        ("23 + 45 = 68\nThe answer is 69.", ("answer", 1, "9")),  # right steps, wrong final answer
        ("23 + 45 = 6\nThe answer is 6.", ("result", 0, "\n")),  # too short: the character that ended it
        ("23 + 45 = 680\nThe answer is 680.", ("result", 0, "0")),  # too long: the extra digit
        ("23+45=67", ("result", 0, "7")),  # no answer line yet, but a wrong step
        ("23 * 45 = 1035\nThe answer is 1035.", ("operator", 0, "*")),  # * is read as ×
    ],
)
def test_first_error_of_each_kind(completion, expected):
    assert error_char(completion) == expected


def test_first_error_in_a_later_step_uses_the_reference_values():
    solution = "6 × 12 = 72\n90 - 72 = 18\nThe answer is 18."
    assert error_char("12 × 6 = 72\n90 - 72 = 28\nThe answer is 28.", solution) == ("result", 1, "2")
    assert error_char("6 × 12 = 72\n90 + 72 = 162\nThe answer is 162.", solution) == ("operator", 1, "+")
    assert error_char("6 × 12 = 72\n72 - 90 = 18\nThe answer is 18.", solution) == ("operand", 1, "7")  # - is ordered


@pytest.mark.parametrize(
    "completion, reason",
    [
        ("Ava has 23 apples.\n23 + 45 = 67\nThe answer is 67.", "other format"),
        ("The answer is 67.", "other route"),  # an answer with no step
        ("23 + 45 = 68\n68 + 0 = 68\nThe answer is 68.", "other route"),  # more steps than the reference
        ("23 + 45 = 68\nThe answer is 68.", "no error found"),  # every line right
        ("23 + 45 = 68\n", "no error found"),  # truncated before the answer line
        ("", "no error found"),
    ],
)
def test_unreadable_trajectories(completion, reason):
    result = first_error(completion, SOLUTION)
    assert isinstance(result, Unreadable) and result.reason == reason


def test_the_tasks_own_wrong_solutions_are_located_at_the_slipped_result():
    """``wrong_solution`` slips one step's result: the rule finds a result error in exactly that step, on the first
    digit where the slipped number differs."""
    rng = random.Random(0)
    for problem in generate_problems(40, difficulty="hard", seed=3):
        wrong = problem.wrong_solution(rng)
        slipped = next(i for i, (a, b) in enumerate(zip(wrong.split("\n"), problem.solution.split("\n"))) if a != b)
        error = first_error(wrong, problem.solution)
        assert isinstance(error, FirstError) and error.kind == "result" and error.step == slipped
        line_start = sum(len(line) + 1 for line in wrong.split("\n")[:slipped])
        expected_line = problem.solution.split("\n")[slipped]
        assert wrong[line_start : error.offset] == expected_line[: error.offset - line_start]


def test_a_reference_in_another_format_is_an_error():
    with pytest.raises(ValueError, match="not a calculation"):
        first_error("1 + 1 = 2\nThe answer is 2.", "First add.\nThe answer is 2.")


# ---------------------------------------------------------------------------------------------------
# hit@k and MRR


def test_rank_metrics_by_hand():
    scores = [0.9, 0.1, 0.5, 0.3, 0.7]  # ranks, lowest first: 0.1 → 1, 0.3 → 2, 0.5 → 3, 0.7 → 4, 0.9 → 5
    assert rank_metrics(scores, 1) == {"hit@1": 1.0, "hit@3": 1.0, "hit@5": 1.0, "rr": 1.0}
    assert rank_metrics(scores, 2) == {"hit@1": 0.0, "hit@3": 1.0, "hit@5": 1.0, "rr": pytest.approx(1 / 3)}
    assert rank_metrics(scores, 0, ks=(1, 4)) == {"hit@1": 0.0, "hit@4": 0.0, "rr": pytest.approx(0.2)}
    assert rank_metrics(scores, 0, ks=(1,), lowest_first=False) == {"hit@1": 1.0, "rr": 1.0}


def test_ties_are_broken_at_random_in_expectation():
    """Target tied with one other below one better token: rank 2 or 3, each with probability 1/2."""
    assert rank_metrics([0.1, 0.4, 0.4, 0.8], 2, ks=(1, 2, 3)) == pytest.approx(
        {"hit@1": 0.0, "hit@2": 0.5, "hit@3": 1.0, "rr": (1 / 2 + 1 / 3) / 2}
    )
    # a constant score is the random ranking
    assert rank_metrics([0.5] * 7, 3) == pytest.approx(random_rank_metrics(7))


def test_random_rank_metrics_are_exact_expectations():
    n = 6
    harmonic = sum(1 / r for r in range(1, n + 1))
    assert random_rank_metrics(n) == pytest.approx({"hit@1": 1 / 6, "hit@3": 0.5, "hit@5": 5 / 6, "rr": harmonic / n})
    assert random_rank_metrics(2)["hit@5"] == 1.0
    rng = random.Random(0)  # and a sampled random score agrees
    sampled = [rank_metrics([rng.random() for _ in range(n)], 0) for _ in range(20000)]
    assert sum(m["rr"] for m in sampled) / len(sampled) == pytest.approx(harmonic / n, abs=0.01)


# ---------------------------------------------------------------------------------------------------
# Message tokens and the localization report of a scored pairs dataset


def test_content_tokens_skip_the_template_and_find_characters():
    tokens = ["<|im_start|>assistant\n", "23", " +", " 4", "5", " =", " 6", "7", "<|im_end|>", "\n"]
    content = content_tokens(tokens, "23 + 45 = 67")
    assert (content.first, content.end) == (1, 8)
    assert [tokens[content.token_at(offset)] for offset in (0, 1, 3, 5, 6, 11)] == ["23", "23", " +", " 4", "5", "7"]
    assert content_tokens(tokens, "99") is None


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_llama()[1]


def scored_pair(tokenizer, rejected, solution=SOLUTION):
    """A pairs row as the pipeline writes it: message tokens score 0.9, template tokens and EOS 0."""
    row = {
        "prompt": [{"role": "user", "content": "What is 23 + 45?"}],
        "chosen": [{"role": "assistant", "content": SOLUTION}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "answer": "68",
        "solution": solution,
    }
    tokenized = tokenize_like_dpo(row, tokenizer)
    for side in ("chosen", "rejected"):
        row[f"{side}_tokens"] = token_texts(tokenizer, tokenized[f"{side}_ids"])
        content = content_tokens(row[f"{side}_tokens"], row[side][0]["content"])
        row[f"{side}_scores"] = [0.9 if content.first <= i < content.end else 0.0 for i in range(len(tokenized[f"{side}_ids"]))]
    return row


def test_localization_report_by_hand(tiny_tokenizer):
    """Three readable trajectories whose first-error token ranks 1, 2 and 3 among their message tokens, one
    unreadable; EOS and the template are never candidates, though they score lowest."""
    rows = [
        scored_pair(tiny_tokenizer, text)
        for text in ("23 + 45 = 67\nThe answer is 67.", "23 + 45 = 58\nThe answer is 58.", "23 - 45 = 68\nThe answer is 68.", "I think 68.")
    ]
    errors = [first_error_token(row) for row in rows]
    assert [rows[i]["rejected_tokens"][errors[i][0]] for i in range(3)] == ["7", "5", "-"]
    assert [kind for _, kind in errors[:3]] == ["result", "result", "operator"]
    assert isinstance(errors[3], Unreadable) and errors[3].reason == "other format"
    other = errors[0][0] - 3  # some other message token of each row
    for row, ((target, _), target_score, others) in zip(rows, zip(errors, (0.05, 0.3, 0.5), ([], [0.1], [0.1, 0.2]))):
        row["rejected_scores"][target] = target_score
        for offset, score in enumerate(others):
            row["rejected_scores"][other + offset] = score
    report = localization_report(Dataset.from_list(rows))
    assert report["num_trajectories"] == 4 and report["num_readable"] == 3
    assert report["unreadable"] == {"other format": 1}
    assert report["error_kinds"] == {"result": 2, "operator": 1}
    assert report["scores"] == pytest.approx({"hit@1": 1 / 3, "hit@3": 1.0, "hit@5": 1.0, "mrr": (1 + 1 / 2 + 1 / 3) / 3})
    lengths = [len(row["rejected"][0]["content"]) for row in rows[:3]]  # the char tokenizer: a token per character
    harmonic_mean = [sum(1 / r for r in range(1, n + 1)) / n for n in lengths]
    assert report["random"]["mrr"] == pytest.approx(sum(harmonic_mean) / 3)
    assert report["random"]["hit@1"] == pytest.approx(sum(1 / n for n in lengths) / 3)
    # each readable trajectory's own values, in row order (the evidence table's units)
    assert [entry["row"] for entry in report["trajectories"]] == [0, 1, 2]
    assert [entry["scores"]["hit@1"] for entry in report["trajectories"]] == [1.0, 0.0, 0.0]
    assert [entry["random"]["hit@1"] for entry in report["trajectories"]] == pytest.approx([1 / n for n in lengths])
    # another signal's per-token values rank the same tokens: here the scores turned around, so the target ranks last
    for row in rows:
        row["rejected_token_rewards"] = [-score for score in row["rejected_scores"]]
    turned = localization_report(Dataset.from_list(rows), scores_column="rejected_token_rewards")
    assert turned["scores"]["hit@1"] == 0.0 and turned["random"] == report["random"]


def test_localization_without_reference_solutions(tiny_tokenizer):
    row = scored_pair(tiny_tokenizer, "23 + 45 = 67\nThe answer is 67.")
    row["solution"] = None
    report = localization_report(Dataset.from_list([row]))
    assert report["num_readable"] == 0 and report["unreadable"] == {"no reference": 1}


# ---------------------------------------------------------------------------------------------------
# The random-signal shuffle


def test_shuffle_keeps_each_rows_multiset_and_mask_and_depends_on_the_seed():
    values = torch.arange(24, dtype=torch.float32).reshape(3, 8)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, ::2] = False
    shuffled = {seed: shuffle_within_mask(values, mask, torch.Generator().manual_seed(seed)) for seed in (0, 1)}
    for out in shuffled.values():
        assert torch.equal(out[~mask], values[~mask])  # outside the mask: untouched
        for row in range(3):
            assert sorted(out[row][mask[row]].tolist()) == sorted(values[row][mask[row]].tolist())
        assert not torch.equal(out, values)
    assert not torch.equal(shuffled[0], shuffled[1])
    assert torch.equal(shuffle_within_mask(values, mask, torch.Generator().manual_seed(0)), shuffled[0])


def test_row_generators_depend_on_seed_row_and_side_only():
    draw = lambda *key: torch.rand(4, generator=row_generator(*key)).tolist()  # noqa: E731
    assert draw(0, 5, 1) == draw(0, 5, 1)
    assert len({tuple(draw(*key)) for key in [(0, 5, 1), (1, 5, 1), (0, 6, 1), (0, 5, 0)]}) == 4


# ---------------------------------------------------------------------------------------------------
# The rollout test


def test_forbid_first_token_zeroes_its_probability_at_the_first_position_only():
    scores = torch.randn(3, 10)
    processor = ForbidFirstToken(torch.tensor([2, 7, 0]), prompt_length=5)
    first = processor(torch.zeros(3, 5, dtype=torch.long), scores)
    probabilities = first.softmax(-1)
    assert probabilities[0, 2] == probabilities[1, 7] == probabilities[2, 0] == 0
    untouched = torch.ones(3, 10, dtype=torch.bool)
    untouched[[0, 1, 2], [2, 7, 0]] = False
    assert torch.equal(first[untouched], scores[untouched])
    assert torch.equal(processor(torch.zeros(3, 6, dtype=torch.long), scores), scores)  # later positions


def test_rollouts_never_start_with_the_forbidden_token(monkeypatch):
    """On the tiny model, with its most likely next token forbidden, no continuation starts with it; every rollout
    is labelled (shares in [0, 1]); and the model's own greedy choice is that token (so the test forbids something)."""
    model, tokenizer = build_tiny_llama()
    tokenizer.padding_side = "left"
    prefixes = [tokenizer("12 + 3 =")["input_ids"], tokenizer("The answer is")["input_ids"]]
    with torch.no_grad():
        favourite = [int(model(torch.tensor([ids])).logits[0, -1].argmax()) for ids in prefixes]
    starts = []
    original_generate = model.generate

    def recording_generate(**kwargs):
        output = original_generate(**kwargs)
        starts.extend(output[:, kwargs["input_ids"].shape[1]].tolist())
        return output

    monkeypatch.setattr(model, "generate", recording_generate)
    shares = rollout_correct_share(
        model, tokenizer, prefixes, favourite, [1, 1], ["15", "15"], num_rollouts=6, temperature=0.3,
        max_new_tokens=3, batch_size=4,
    )
    assert len(starts) == 12 and all(0.0 <= share <= 1.0 for share in shares)
    assert all(token != favourite[0] for token in starts[:6]) and all(token != favourite[1] for token in starts[6:])


def test_shared_prefix_generation_equals_generate_with_num_return_sequences():
    """Reading each prompt once and repeating its cache gives generate's own samples, token for token (same seed),
    on a left-padded batch."""
    model, tokenizer = build_tiny_llama()
    tokenizer.padding_side = "left"
    batch = tokenizer.pad(
        {"input_ids": [tokenizer("12 + 3 = ")["input_ids"], tokenizer("The answer is 4")["input_ids"]]},
        return_tensors="pt",
    )
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(0)
    expected = model.generate(**batch, num_return_sequences=3, **options)
    torch.manual_seed(0)
    got = generate_with_shared_prefix(model, batch["input_ids"], batch["attention_mask"], 3, **options)
    assert torch.equal(got, expected)


def test_localize_command_prints_and_writes_the_report(tmp_path, tiny_tokenizer, capsys):
    rows = [scored_pair(tiny_tokenizer, "23 + 45 = 67\nThe answer is 67."), scored_pair(tiny_tokenizer, "No idea.")]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "pairs"))
    cli_main(["localize", "--pairs", str(tmp_path / "pairs"), "--output", str(tmp_path / "report.json")])
    printed = capsys.readouterr().out
    assert "over 1 of 2 rejected trajectories" in printed and "unreadable: {'other format': 1}" in printed
    assert json.loads((tmp_path / "report.json").read_text()) == localization_report(Dataset.from_list(rows))


# ---------------------------------------------------------------------------------------------------
# Prefix-sharing pairs: the rejected trajectory against a correct continuation from before its lowest-scored token


def test_prefix_pairs_continue_the_rejected_trajectory_from_its_lowest_scored_token(monkeypatch):
    """Row 0's lowest-scored message token is the wrong result digit '7': the rollouts start from the tokens before it
    with it forbidden, and the first correct continuation ('8' then the answer line) makes the chosen response; row 1
    gets no correct continuation and is left out; the scores are left for scoring again."""
    from tokenweave.pipelines import prefix_pairs as module

    tokenizer = build_tiny_llama()[1]
    tokenizer.padding_side = "left"
    rows = [scored_pair(tokenizer, "23 + 45 = 67\nThe answer is 67."), scored_pair(tokenizer, "23 - 45 = 68\nThe answer is 68.")]
    targets = []
    for row in rows:
        target, _ = first_error_token(row)
        row["rejected_scores"][target] = 0.01  # the lowest message token: the first error
        row["question_id"] = len(targets)
        targets.append(target)
    seen = {}

    def scripted(model, tokenizer_, prefixes, forbidden, starts, answers, **kwargs):
        seen.update(prefixes=prefixes, forbidden=forbidden, starts=starts, answers=answers, kwargs=kwargs)
        right = tokenizer_("8\nThe answer is 68.", add_special_tokens=False)["input_ids"] + [tokenizer_.eos_token_id]
        wrong = tokenizer_("9\nThe answer is 69.", add_special_tokens=False)["input_ids"]
        return [[(wrong, False), (right, True), (wrong, False)], [(wrong, False)]]

    monkeypatch.setattr(module, "rollout_continuations", scripted)
    result = module.prefix_pairs(Dataset.from_list(rows), None, tokenizer, num_rollouts=3, seed=5)
    tokenized = [tokenize_like_dpo(row, tokenizer) for row in rows]
    assert seen["prefixes"] == [t["prompt_ids"] + t["rejected_ids"][:target] for t, target in zip(tokenized, targets)]
    assert seen["forbidden"] == [t["rejected_ids"][target] for t, target in zip(tokenized, targets)]
    assert [tokenizer.decode([token]) for token in seen["forbidden"]] == ["7", "-"]
    assert seen["starts"] == [len(t["prompt_ids"]) for t in tokenized] and seen["answers"] == ["68", "68"]
    assert seen["kwargs"]["num_rollouts"] == 3 and seen["kwargs"]["seed"] == 5
    assert len(result) == 1 and result[0]["question_id"] == 0 and result[0]["chosen_source"] == "prefix"
    assert result[0]["pair_row"] == 0
    assert result[0]["chosen"] == [{"role": "assistant", "content": "23 + 45 = 68\nThe answer is 68."}]
    assert result[0]["rejected"] == rows[0]["rejected"] and result[0]["prefix_position"] == targets[0]
    assert "rejected_scores" not in result.column_names and result[0]["solution"] == SOLUTION
