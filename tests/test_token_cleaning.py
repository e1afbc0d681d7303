"""Tests of TokenCleaning (arXiv 2502.01968): ``tokenweave score-tokens`` (tokenweave.pipelines.token_scores) and the
``token_cleaning`` signal. The scores are the two models' per-token losses worked out by hand (a plain forward and
log_softmax); the global and per-row selections keep exact, hand-made sets; the columns align with the tokens TRL's
SFTTrainer labels, row by row; training weighs each label token by label / ratio under TRL's normaliser, and with
ratio 1 is TRL's SFT; the command writes a dataset the training config reads, reuses it, and refuses a changed config.
"""

import copy
import json

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, load_from_disk
from trl import SFTConfig, SFTTrainer

from tokenweave.cli import main as cli_main
from tokenweave.config import parse_run_config
from tokenweave.models import build_tiny_llama
from tokenweave.pipelines.steps import StepConfigChanged
from tokenweave.pipelines.token_scores import (
    REFERENCE_LOGPS_COLUMN,
    kept_count,
    score_tokens,
    select_tokens,
)
from tokenweave.train import train
from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer
from tokenweave.trainers.token_cleaning import TokenCleaningSignal

from .conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS, SCORES = "token_cleaning_labels", "token_cleaning_scores"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny Llamas with different weights (seeds 0 and 1) and the same tokenizer: the base and the reference."""
    paths = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"tiny-llama-{seed}")
        model, tokenizer = build_tiny_llama(seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def run_configs(tmp_path, base, reference, **overrides):
    """The three config dataclasses of a small SFT run of ``base`` with the token_cleaning signal."""
    config = {"method": "sft", "model_name_or_path": base, "reference_model_path": reference,
              "dataset_name": "arithmetic", "num_train_examples": 8, "output_dir": str(tmp_path / "run"),
              "token_signals": ["token_cleaning"], "use_cpu": True, "bf16": False, "report_to": "none",
              "save_strategy": "no", "activation_checkpointing": False, "per_device_eval_batch_size": 3,
              "seed": 0} | overrides
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return parse_run_config(["--config", str(path)])


def label_logps_by_hand(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """log π of each labelled token (not at position 0) of one unpadded row: a plain forward and log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[torch.tensor(labels[1:]) != -100]


def trl_rows(model_dir, tmp_path, dataset: Dataset):
    """The dataset as TRL's own SFTTrainer prepares it (untruncated, unshuffled): its input_ids and labels."""
    trainer = SFTTrainer(model=model_dir, train_dataset=dataset, args=SFTConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none", max_length=None,
        shuffle_dataset=False, activation_checkpointing=False))
    return trainer.train_dataset


# ---------------------------------------------------------------------------------------------------------------
# score-tokens
# ---------------------------------------------------------------------------------------------------------------
def test_scores_are_the_two_models_losses_by_hand(two_models, tmp_path):
    """Each row's scores are L_base − L_ref of its completion tokens, from plain forwards of the two models (1e-5);
    reference_logps is log π_ref; the labels keep int(0.6·N) tokens, none scoring below a dropped one."""
    base_path, reference_path = two_models
    summary = score_tokens(*run_configs(tmp_path, base_path, reference_path), tmp_path / "scored")
    scored = load_from_disk(str(tmp_path / "scored"))
    assert summary["rows"] == len(scored) == 8 and not summary["reused"]
    base, tokenizer = build_tiny_llama(0)
    reference, _ = build_tiny_llama(1)
    kept, dropped, count = [], [], 0
    for row in scored:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"])["input_ids"]
        assert ids[: len(prompt)] == prompt  # the char tokenizer never merges across the boundary
        labels = [-100] * len(prompt) + ids[len(prompt):]
        base_logps, reference_logps = (label_logps_by_hand(model, ids, labels) for model in (base, reference))
        expected = reference_logps - base_logps  # (−log π_base) − (−log π_ref)
        assert len(row[SCORES]) == len(row[LABELS]) == len(row[REFERENCE_LOGPS_COLUMN]) == len(ids) - len(prompt)
        torch.testing.assert_close(torch.tensor(row[SCORES]), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(row[REFERENCE_LOGPS_COLUMN]), reference_logps, atol=1e-5, rtol=0)
        assert set(row[LABELS]) <= {0, 1}
        kept += [score for score, label in zip(row[SCORES], row[LABELS]) if label]
        dropped += [score for score, label in zip(row[SCORES], row[LABELS]) if not label]
        count += len(row[LABELS])
    assert len(set(kept + dropped)) > 1  # the two models disagree: the scores are not all equal
    assert len(kept) == kept_count(count, 0.6) == summary["kept"] and summary["tokens"] == count
    assert min(kept) >= max(dropped)


def test_a_lora_reference_is_merged_into_its_base(two_models, tmp_path):
    """A reference that is a LoRA adapter directory (a use_peft run's output, as the paper's reference) scores as the
    merged model saved as a plain directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_path, _ = two_models
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base_path), build_tiny_llama()[1]
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "lora")
    adapter.merge_and_unload().save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    for name in ("lora", "merged"):
        score_tokens(*run_configs(tmp_path, base_path, str(tmp_path / name)), tmp_path / f"scored-{name}")
    lora, merged = (load_from_disk(str(tmp_path / f"scored-{name}")) for name in ("lora", "merged"))
    for row, expected in zip(lora, merged):
        torch.testing.assert_close(torch.tensor(row[SCORES]), torch.tensor(expected[SCORES]), atol=1e-5, rtol=0)
    assert any(any(row[SCORES]) for row in lora)  # the adapter changed the model


def test_global_and_sample_selection_keep_the_hand_made_sets():
    """Global: the top int(N·ratio) over every ranked token, ties in dataset order; sample: int(n·ratio) per row.
    A token that is not ranked (a label at position 0) is never kept, whatever its score."""
    scores = [np.array([0.5, -1.0, 2.0], dtype=np.float32), np.array([3.0, 0.5, 0.5, 0.1], dtype=np.float32),
              np.array([1.0], dtype=np.float32), np.array([9.0, -2.0, 0.5], dtype=np.float32)]
    ranked = [np.ones(3, bool), np.ones(4, bool), np.ones(1, bool), np.array([False, True, True])]
    # N = 10 ranked tokens, int(10 · 0.5) = 5 kept: 3, 2, 1, then 0.5 at (0, 0) and (1, 1) of the four 0.5s
    global_labels = select_tokens(scores, ranked, 0.5, "global")
    assert [row.tolist() for row in global_labels] == [[1, 0, 1], [1, 1, 0, 0], [1], [0, 0, 0]]
    # per row: int(3 · 0.5) = 1, int(4 · 0.5) = 2 (the tie at 0.5: the earlier position), int(0.5) = 0, int(1) = 1
    sample_labels = select_tokens(scores, ranked, 0.5, "sample")
    assert [row.tolist() for row in sample_labels] == [[0, 0, 1], [1, 1, 0, 0], [0], [0, 0, 1]]
    everything = select_tokens(scores, ranked, 1.0, "global")
    assert [row.tolist() for row in everything] == [mask.astype(int).tolist() for mask in ranked]
    assert [row.tolist() for row in select_tokens(scores, ranked, 1.0, "sample")] == \
        [row.tolist() for row in everything]
    assert kept_count(100, 0.29) == 29 and kept_count(5, 0.6) == 3 and kept_count(1, 0.6) == 0
    with pytest.raises(ValueError, match="token_cleaning_level"):
        select_tokens(scores, ranked, 0.5, "batch")


def language_modelling_rows(path) -> str:
    """Plain-text rows on disk: TRL labels every token, the first one (position 0) included."""
    Dataset.from_list([{"text": f"{a} + {b} = {a + b}" * (1 + a % 3)} for a, b in [(3, 4), (12, 30), (7, 7)]]
                      ).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("data", ["arithmetic", "text"])
def test_the_columns_align_with_trls_labels_row_by_row(two_models, tmp_path, data):
    """Every row's columns have one value per token TRL's SFTTrainer labels (prompt-completion: the completion;
    language modelling: every token, the unpredicted first one with log-prob 0, score 0, label 0), and the ids and
    labels scored are TRL's own; a TokenSFTTrainer with the signal reads the dataset (its column check passes)."""
    base_path, reference_path = two_models
    dataset_name = "arithmetic" if data == "arithmetic" else language_modelling_rows(tmp_path / "text")
    configs = run_configs(tmp_path, base_path, reference_path, dataset_name=dataset_name,
                          token_cleaning_level="sample")
    score_tokens(*configs, tmp_path / "scored")
    scored = load_from_disk(str(tmp_path / "scored"))
    prepared = trl_rows(base_path, tmp_path, scored)
    assert len(prepared) == len(scored)
    for row, trl_row in zip(scored, prepared):
        count = sum(label != -100 for label in trl_row["labels"])
        assert len(row[LABELS]) == len(row[SCORES]) == len(row[REFERENCE_LOGPS_COLUMN]) == count > 0
        if data == "text":
            assert trl_row["labels"][0] != -100
            assert (row[REFERENCE_LOGPS_COLUMN][0], row[SCORES][0], row[LABELS][0]) == (0.0, 0.0, 0)
            assert sum(row[LABELS]) == kept_count(count - 1, 0.6)  # sample level, the first token not ranked
    trainer = TokenSFTTrainer(model=base_path, args=configs[1], train_dataset=scored)
    assert list(trainer.signals) == ["token_cleaning"]
    by_trainer = {tuple(row["input_ids"]): row for row in trainer.train_dataset}
    for row in prepared:
        assert by_trainer[tuple(row["input_ids"])]["labels"] == row["labels"]


# ---------------------------------------------------------------------------------------------------------------
# the token_cleaning signal in training
# ---------------------------------------------------------------------------------------------------------------
def sft_trainer(model_dir, tmp_path, dataset, trainer_class=TokenSFTTrainer, config_class=TokenSFTConfig, **config):
    options = {"output_dir": str(tmp_path / "train"), "use_cpu": True, "bf16": False, "report_to": "none",
               "save_strategy": "no", "per_device_train_batch_size": 6, "activation_checkpointing": False, "seed": 0,
               "shuffle_dataset": False, "max_length": None} | config
    trainer = trainer_class(model=model_dir, args=config_class(**options), train_dataset=dataset)
    trainer.model.train()
    return trainer


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, copy.copy(batch))
    loss.backward()
    return loss.item(), {name: param.grad.clone() for name, param in trainer.model.named_parameters()
                         if param.grad is not None}


def test_the_loss_is_the_label_weighted_nll_by_hand(two_models, tmp_path):
    """On a fixed batch: loss = Σ (label / ratio)·ℓ / N (N: the batch's label tokens, TRL's normaliser without a
    window), from the policy's own plain forward of each row; the signal is a selection ranked by the scores."""
    base_path, reference_path = two_models
    score_tokens(*run_configs(tmp_path, base_path, reference_path, token_cleaning_ratio=0.4), tmp_path / "scored")
    scored = load_from_disk(str(tmp_path / "scored"))
    trainer = sft_trainer(base_path, tmp_path, scored, token_signals=["token_cleaning"], token_cleaning_ratio=0.4)
    signal = type(trainer.signals["token_cleaning"])
    assert signal is TokenCleaningSignal and signal.selection and signal.provides == {"token_weights"}
    rows = [trainer.train_dataset[i] for i in range(6)]
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    total, count = 0.0, 0
    for row in rows:
        logps = label_logps_by_hand(trainer.model, row["input_ids"], row["labels"])
        weights = torch.tensor(row[LABELS], dtype=torch.float32) / 0.4
        total += (weights * -logps).sum().item()
        count += len(logps)
    assert 0 < sum(sum(row[LABELS]) for row in rows) < count  # some tokens kept, some dropped
    assert loss == pytest.approx(total / count, abs=1e-6)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    kept = sum(sum(row[LABELS]) for row in rows)
    assert metrics["weights/mean"] == pytest.approx(kept / 0.4 / count, rel=1e-6)


def test_the_inverse_control_keeps_each_rows_count_from_the_bottom_of_the_scores(two_models, tmp_path):
    """signal_control: inverse puts the 1/ratio weights on each row's lowest-scored tokens, as many as it kept."""
    base_path, reference_path = two_models
    score_tokens(*run_configs(tmp_path, base_path, reference_path), tmp_path / "scored")
    scored = load_from_disk(str(tmp_path / "scored"))
    trainer = sft_trainer(base_path, tmp_path, scored, token_signals=["token_cleaning"], signal_control="inverse")
    rows = [trainer.train_dataset[i] for i in range(6)]
    loss = trainer.compute_loss(trainer.model, dict(trainer.data_collator(rows))).item()
    total, count = 0.0, 0
    for row in rows:
        logps = label_logps_by_hand(trainer.model, row["input_ids"], row["labels"])
        bottom = np.argsort(np.asarray(row[SCORES]), kind="stable")[: sum(row[LABELS])]
        weights = torch.zeros(len(logps))
        weights[torch.from_numpy(bottom)] = 1 / 0.6
        total += (weights * -logps).sum().item()
        count += len(logps)
    assert loss == pytest.approx(total / count, abs=1e-6)


def test_ratio_one_is_trls_sft(two_models, tmp_path):
    """token_cleaning_ratio 1 labels every token 1: the loss and gradients are TRL's plain SFT's (1e-6)."""
    base_path, reference_path = two_models
    summary = score_tokens(*run_configs(tmp_path, base_path, reference_path, token_cleaning_ratio=1.0),
                           tmp_path / "scored")
    assert summary["kept"] == summary["tokens"]
    scored = load_from_disk(str(tmp_path / "scored"))
    ours = sft_trainer(base_path, tmp_path, scored, token_signals=["token_cleaning"], token_cleaning_ratio=1.0)
    trl = sft_trainer(base_path, tmp_path, scored, SFTTrainer, SFTConfig)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(6)])
    trl_batch = trl.data_collator([trl.train_dataset[i] for i in range(6)])
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"]) and torch.equal(batch["labels"],
                                                                                      trl_batch["labels"])
    (loss, grads), (trl_loss, trl_grads) = loss_and_grads(ours, batch), loss_and_grads(trl, trl_batch)
    assert loss == pytest.approx(trl_loss, abs=1e-6)
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], atol=1e-6, rtol=0, msg=name)


def test_the_signal_refuses_a_dataset_without_its_columns_or_with_bad_values(tmp_path):
    configs = run_configs(tmp_path, "tiny-llama", "tiny-llama")
    rows = Dataset.from_list([{"prompt": "1+1=", "completion": "2", LABELS: [1], SCORES: [0.5]}])
    TokenCleaningSignal.check_dataset(rows, configs[1], "rows")
    with pytest.raises(ValueError, match="score-tokens"):
        TokenCleaningSignal.check_dataset(rows.remove_columns(SCORES), configs[1], "rows")
    for column, bad in ((LABELS, [0.5]), (LABELS, [2]), (SCORES, [float("nan")])):
        broken = rows.remove_columns(column).add_column(column, [bad])
        with pytest.raises(ValueError, match=f"column '{column}'"):
            TokenCleaningSignal.check_dataset(broken, configs[1], "rows")


# ---------------------------------------------------------------------------------------------------------------
# the command, end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("tiny_model_cache")
def test_score_tokens_command_writes_what_the_training_config_reads(tmp_path, capsys):
    """``tokenweave score-tokens`` on the shipped tiny config writes a dataset atomically; a second run reuses it, a
    changed ratio is refused naming it; ``tokenweave train`` with the same config trains on it."""
    config = yaml.safe_load((CONFIGS / "sft_token_cleaning_tiny.yaml").read_text())
    config |= {"output_dir": str(tmp_path / "run"), "num_train_examples": 16, "max_steps": 1}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    output = tmp_path / "scored"
    cli_main(["score-tokens", "--config", str(path), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "score-tokens: 16 rows" in printed and f"wrote {output}" in printed
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["config.yaml", "scored"]  # no partial left
    record = json.loads((output / "step_config.json").read_text())
    assert record["token_cleaning_ratio"] == 0.6 and record["reference_model_path"] == "tiny-llama-reference"
    cli_main(["score-tokens", "--config", str(path), "--output", str(output)])
    assert f"reused {output}" in capsys.readouterr().out
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config | {"token_cleaning_ratio": 0.5}))
    with pytest.raises(StepConfigChanged, match="token_cleaning_ratio: 0.6 -> 0.5"):
        cli_main(["score-tokens", "--config", str(changed), "--output", str(output), "--debug"])
    info = train(["--config", str(path), "--dataset_name", str(output)])
    assert info["token_signals"] == ["token_cleaning"] and info["global_step"] == 1
    assert "arXiv:2502.01968" in info["papers"]
