"""``tokenweave evidence``'s SFT rows (:mod:`tokenweave.pipelines.evidence.sft`): the R-precision of the planted tokens
among a row's lowest weights and its exact random control on hand-made rows, ties broken by the row's seeded
permutation, the weights of the rows read alone equal to those of the whole task, and the part end to end on the tiny
budget (``--parts sft``)."""

import json

import numpy as np
import pytest
import torch

from tokenweave.cli import main as cli_main
from tokenweave.data.loading import load_run_dataset
from tokenweave.data.noisy_arithmetic import planted_label_masks
from tokenweave.models import build_tiny_llama
from tokenweave.pipelines.evidence import BUDGETS
from tokenweave.pipelines.evidence.sft import SIGNALS, _parsed, label_token_weights, method_argv, r_precision
from tokenweave.tokens.controls import row_generator
from tokenweave.train import build_trainer, run_dataset_kwargs

from .conftest import CONFIGS


@pytest.mark.parametrize(("weights", "planted", "expected"), [
    # m = 2 of n = 4: the two lowest are tokens 1 (0.1) and 2 (0.2), one of them planted
    ([0.3, 0.1, 0.2, 0.9], [1, 1, 0, 0], (1 / 2, 2 / 4)),
    # m = 2 of n = 5: the two lowest (0.01, 0.05) are both planted
    ([0.05, 0.9, 0.01, 0.8, 0.7], [1, 0, 1, 0, 0], (2 / 2, 2 / 5)),
    # m = 1 of n = 3: the lowest (0.1) is clean
    ([0.9, 0.1, 0.2], [1, 0, 0], (0 / 1, 1 / 3)),
    # a selection's weights (0 dropped, 1 / 0.6 kept): m = 3 of n = 6, the three dropped tokens are the lowest
    ([0.0, 1 / 0.6, 0.0, 1 / 0.6, 0.0, 1 / 0.6], [1, 1, 0, 0, 1, 0], (2 / 3, 3 / 6)),
])
def test_r_precision_and_its_exact_control_on_hand_made_rows(weights, planted, expected):
    assert r_precision(weights, planted, 0, 0) == pytest.approx(expected)


def test_equal_weights_are_ordered_by_the_rows_seeded_permutation():
    # token 1 is the lowest; the second of the m = 2 lowest is one of the tied tokens 0, 2, 4 (weight 0.5): the one
    # whose entry in torch.randperm(5) drawn with row_generator(seed, row) is the lowest
    weights, planted = [0.5, 0.1, 0.5, 0.9, 0.5], [0, 1, 1, 0, 0]
    outcomes = set()
    for seed in range(8):
        permutation = torch.randperm(5, generator=row_generator(seed, 3)).tolist()
        second = min((0, 2, 4), key=lambda token: permutation[token])
        value, control = r_precision(weights, planted, seed, 3)
        assert (value, control) == ((1 + (second == 2)) / 2, 2 / 5)
        # the same draw for another signal of the same row: the same tie order
        assert r_precision([0.7, 0.2, 0.7, 1.0, 0.7], planted, seed, 3)[0] == value
        outcomes.add(value)
    assert outcomes == {0.5, 1.0}  # the seed changes which tied token ranks lower
    # uniformly random: over many seeds the tied token is the planted one a third of the time
    mean = np.mean([r_precision(weights, planted, seed, 3)[0] for seed in range(3000)])
    assert mean == pytest.approx((1 + 1 / 3) / 2, abs=0.02)
    # a row whose weights are all equal (a selection that keeps all of it) scores m / n on average, as chance does
    mean = np.mean([r_precision([1.0] * 6, [1, 0, 0, 1, 0, 0], seed, 0)[0] for seed in range(3000)])
    assert mean == pytest.approx(2 / 6, abs=0.02)


def test_r_precision_refuses_a_row_without_planted_token_or_with_mismatched_lengths():
    with pytest.raises(ValueError, match="one planted token at least"):
        r_precision([0.1, 0.2], [0, 0], 0, 0)
    with pytest.raises(ValueError, match="3 weights, 2 flags"):
        r_precision([0.1, 0.2, 0.3], [1, 0], 0, 0)


def test_the_weights_of_the_rows_read_alone_are_those_of_the_whole_task(tmp_path, tiny_model_cache, one_torch_thread):
    """DFT's weights are per token: reading the noisy rows only (as the part does for every signal but Rho-1) gives
    each row the weights it gets among all the rows."""
    counts = BUDGETS["tiny"]
    run_args, training_args, model_args = _parsed(method_argv("dft", counts, 0), tmp_path / "unused")
    dataset = load_run_dataset(run_args.dataset_name, run_args.dataset_train_split,
                               num_examples=run_args.num_train_examples, **run_dataset_kwargs(run_args))
    masks, ids = planted_label_masks(dataset, build_tiny_llama()[1])
    noisy = [row for row, mask in enumerate(masks) if any(mask)]
    assert 0 < len(noisy) < len(masks)
    trainer = build_trainer(run_args, training_args, model_args)
    every = label_token_weights(trainer, ids, 4)["none"]
    alone = label_token_weights(trainer, ids, 4, rows=noisy)["none"]
    assert [row for row, weights in enumerate(alone) if weights is not None] == noisy
    for row in noisy:
        assert len(alone[row]) == len(masks[row])
        np.testing.assert_allclose(alone[row], every[row], rtol=1e-5, atol=1e-7)
        assert not np.allclose(alone[row], alone[row][0])  # weights that vary (the test would pass on constants)
    # a trainer whose rows carry no identity is refused
    plain = build_trainer(*_parsed(method_argv("dft", counts, 0) + ["--signal_control", "none"], tmp_path / "plain"))
    with pytest.raises(ValueError, match="signal_control: shuffle"):
        label_token_weights(plain, ids, 4)


@pytest.mark.slow
def test_the_sft_part_writes_one_row_per_signal_over_the_noisy_rows(tmp_path, tiny_model_cache, one_torch_thread,
                                                                      capsys):
    work = tmp_path / "evidence"
    argv = ["evidence", "--budget", "tiny", "--seeds", "0", "1", "--critical_config",
            str(CONFIGS / "critical_tiny.yaml"), "--parts", "sft", "--work_dir", str(work)]
    cli_main(argv)
    rows = json.loads((work / "evidence.json").read_text())
    assert [row["signal"] for row in rows] == [f"{label} token weights (lowest)" for label in SIGNALS.values()]
    table = (work / "evidence.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and all("noisy rows" in line for line in table[2:])
    tokenizer = build_tiny_llama()[1]
    for seed in (0, 1):  # the units: the seed's task rows with a planted label token, each with its m / n
        dataset = load_run_dataset("noisy_arithmetic", "train", "sft", num_examples=BUDGETS["tiny"].sft_rows, seed=seed)
        masks, _ = planted_label_masks(dataset, tokenizer)
        controls = [sum(mask) / len(mask) for mask in masks if any(mask)]
        assert len(controls) == 5  # 30 % of 16 rows
        for row in rows:
            assert row["measurement"].startswith("planted tokens among the row's m lowest-weighted label tokens")
            assert row["control"] == "a random ranking of the same tokens (exact, m / n)"
            assert row["unit"] == "noisy rows" and row["percent"] and not row["shared_units"]
            units = row["pairs"][str(seed)]
            assert [control for _, control in units] == pytest.approx(controls)
            assert all(0 <= value <= 1 for value, _ in units)
            assert set(row["summary"]) >= {"signal_mean", "control_mean", "effect", "low", "high", "seeds",
                                           "num_units"} and row["summary"]["num_units"] == 10
    # TokenCleaning's labels came from score-tokens, per seed; the reference was trained once
    assert (work / "sft_token_cleaning_seed1" / "step_config.json").exists()
    assert (work / "sft_reference" / "adapter" / "adapter_config.json").exists()
    before = (work / "evidence.json").read_text()
    capsys.readouterr()
    cli_main(argv)  # every step reused: the same table
    assert (work / "evidence.json").read_text() == before
