"""Tests of TokenSFTTrainer: with no token signal it is TRL's SFTTrainer (loss, gradients, logged metrics, a training
run), padded and padding-free, with and without gradient accumulation; token weights enter its loss as a weighted
NLL worked out by hand; per-token columns are checked and truncated with the labels; span rules weigh the matched
tokens; frozen models (a reference by path, the history model) give the log-probs of their own forward."""

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from tokenweave.models import build_tiny_llama
from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer
from tokenweave.trainers.signals import TOKEN_SIGNALS, TokenSignal, register_token_signal

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What TRL 1.16's SFTTrainer logs (sft_trainer.py, compute_loss lines 1639-1663)
TRL_SFT_METRICS = {"entropy", "mean_token_accuracy", "num_tokens"}


def sft_dataset(count: int = 6) -> Dataset:
    """Conversational prompt-completion rows of unequal lengths (so a batch is padded)."""
    rows = []
    for a, b in [(12, 7), (3, 45), (100, 23), (8, 8), (61, 5), (2, 990)][:count]:
        answer = "\n".join([f"{a} + {b} = {a + b}"] * (1 + a % 3)) + f"\nThe answer is {a + b}."
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "completion": [{"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def make_trainer(model_dir, tmp_path, trainer_class=TokenSFTTrainer, config_class=TokenSFTConfig, dataset=None,
                 **config):
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                    per_device_train_batch_size=6, activation_checkpointing=False, logging_steps=1, seed=0,
                    shuffle_dataset=False)
    peft_config = config.pop("peft_config", None)
    trainer = trainer_class(model=model_dir, args=config_class(**(defaults | config)),
                            train_dataset=sft_dataset() if dataset is None else dataset, peft_config=peft_config)
    trainer.model.train()
    return trainer


def collate(trainer, rows) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def loss_and_grads(trainer, batches, num_items_in_batch=None):
    """Σ of the micro-batch losses (each through the public ``compute_loss``, as Trainer calls it) and the
    accumulated gradients, by parameter name."""
    trainer.model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
        loss.backward()
        total += loss.item()
    return total, {name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.grad is not None}


def assert_same(actual, expected, atol=1e-6):
    assert actual[0] == pytest.approx(expected[0], abs=atol)
    assert actual[1].keys() == expected[1].keys()
    for name, grad in actual[1].items():
        torch.testing.assert_close(grad, expected[1][name], atol=atol, rtol=0, msg=name)


def logged_metrics(trainer) -> dict:
    trainer.log({})
    return {key: value for key, value in trainer.state.log_history[-1].items() if key not in ("step", "epoch")}


# ---------------------------------------------------------------------------------------------------------------
# No signal: TRL's SFTTrainer, through the mirror of its loss.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, accumulation, loss_type", [
    ("padded", 1, "nll"), ("padded", 2, "nll"), ("padded", 1, "dft"), ("padding_free", 1, "nll"),
    ("padding_free", 2, "nll"),
])
def test_no_signal_equals_trl_sft(model_dir, tmp_path, path, accumulation, loss_type):
    """The same batch (or the same two micro-batches of an accumulation window, normalised by the window's label
    count as Trainer passes it): the same loss, gradients (1e-6) and logged metrics as TRL's SFTTrainer."""
    options = dict(loss_type=loss_type, padding_free=path == "padding_free",
                   max_length=None if path == "padding_free" else 1024)
    trl = make_trainer(model_dir, tmp_path, SFTTrainer, SFTConfig, **options)
    ours = make_trainer(model_dir, tmp_path, **options)
    assert ours.mirrors_trl_loss and not ours.signals
    rows = [range(6)] if accumulation == 1 else [range(3), range(3, 6)]
    trl_batches, batches = [collate(trl, r) for r in rows], [collate(ours, r) for r in rows]
    for trl_batch, batch in zip(trl_batches, batches):
        assert trl_batch.keys() == batch.keys()
        for key, value in trl_batch.items():
            assert torch.equal(torch.as_tensor(batch[key]), torch.as_tensor(value)), key
    window = None if accumulation == 1 else sum((batch["labels"][:, 1:] != -100).sum() for batch in batches)
    assert_same(loss_and_grads(ours, batches, window), loss_and_grads(trl, trl_batches, window))
    trl_metrics, metrics = logged_metrics(trl), logged_metrics(ours)
    assert set(trl_metrics) == set(metrics) == TRL_SFT_METRICS
    assert metrics == pytest.approx(trl_metrics, rel=1e-6, abs=1e-7)


def test_no_signal_trains_as_trl_sft(model_dir, tmp_path):
    """Three optimizer steps with gradient accumulation 2 through ``Trainer.train``: the logged losses and metrics,
    and the trained weights, are TRL's."""
    options = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=5e-3)
    runs = []
    for trainer_class, config_class in ((SFTTrainer, SFTConfig), (TokenSFTTrainer, TokenSFTConfig)):
        trainer = make_trainer(model_dir, tmp_path, trainer_class, config_class, **options)
        trainer.train()
        runs.append(trainer)
    trl_logs, logs = ([entry for entry in run.state.log_history if "loss" in entry] for run in runs)
    assert len(logs) == len(trl_logs) == 3
    for entry, expected in zip(logs, trl_logs):
        assert set(entry) == set(expected)
        for key in ("loss", "grad_norm", *TRL_SFT_METRICS):
            assert entry[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    for (name, param), (_, expected) in zip(runs[1].model.named_parameters(), runs[0].model.named_parameters()):
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Token weights: a weighted NLL, by hand.
# ---------------------------------------------------------------------------------------------------------------
def labelled_counts(model_dir, tmp_path, dataset=None, **options) -> list[int]:
    """The labelled tokens of each row as TRL's SFTTrainer prepares them (before truncation)."""
    trl = make_trainer(model_dir, tmp_path, SFTTrainer, SFTConfig, dataset=dataset, **options)
    return [sum(label != -100 for label in row["labels"]) for row in trl.train_dataset]


def with_weights(model_dir, tmp_path, values, **options) -> Dataset:
    """``sft_dataset()`` with a ``token_weights`` column: ``values(n, row)`` for a row of n labelled tokens."""
    counts = labelled_counts(model_dir, tmp_path, **options)
    return sft_dataset().add_column("token_weights", [values(n, row) for row, n in enumerate(counts)])


def random_weights(n, row):
    return torch.rand(n, generator=torch.Generator().manual_seed(10 + row)).tolist()


def test_a_weight_column_gives_the_weighted_nll(model_dir, tmp_path):
    """loss = Σ_t w_t·(−log p(y_t)) / N with N the label count: log-probs from the model's full logits, each label
    token's weight from its row's column, in order; ``weights/mean`` is the mean weight of the label tokens."""
    dataset = with_weights(model_dir, tmp_path, random_weights)
    trainer = make_trainer(model_dir, tmp_path, dataset=dataset, token_signals=["weights"])
    batch = collate(trainer, range(6))
    loss = trainer.compute_loss(trainer.model, dict(batch))

    model, _ = build_tiny_llama()
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    weights = torch.zeros_like(logps)
    for row, values in enumerate(dataset["token_weights"]):
        weights[row, labels[row] != -100] = torch.tensor(values)
    mask = labels != -100
    expected = -(weights * logps)[mask].sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)
    assert logged_metrics(trainer)["weights/mean"] == pytest.approx(weights[mask].mean().item(), rel=1e-5)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_columns_are_truncated_with_the_labels(model_dir, tmp_path, truncation_mode):
    """A column of each label token's rank (0, 1, 2, ...): after truncation to 40 tokens the ids and labels are
    TRL's (its own truncation), and the column holds the ranks of the label tokens kept."""
    options = dict(max_length=40, truncation_mode=truncation_mode)
    trl = make_trainer(model_dir, tmp_path, SFTTrainer, SFTConfig, **options)
    ranks = with_weights(model_dir, tmp_path, lambda n, row: [float(t) for t in range(n)])
    ours = make_trainer(model_dir, tmp_path, dataset=ranks, token_signals=["weights"], **options)
    assert len(ours.train_dataset) == len(trl.train_dataset)
    counts = labelled_counts(model_dir, tmp_path)
    for row, (kept, expected) in enumerate(zip(ours.train_dataset, trl.train_dataset)):
        assert kept["input_ids"] == expected["input_ids"] and kept["labels"] == expected["labels"]
        left = sum(label != -100 for label in kept["labels"])
        first = 0 if truncation_mode == "keep_start" else counts[row] - left
        assert kept["token_weights"] == [float(t) for t in range(first, first + left)]
    assert any(len(row["input_ids"]) == 40 for row in ours.train_dataset)  # truncation did act
    batch = collate(ours, range(len(ours.train_dataset)))
    assert torch.equal(batch["weights"] > 0, (batch["labels"] != -100) & (batch["weights"] != 0))


def test_a_misaligned_column_or_packing_is_refused(model_dir, tmp_path):
    dataset = with_weights(model_dir, tmp_path, lambda n, row: [1.0] * (n + (row == 2)))
    with pytest.raises(ValueError, match=r"row 2 of the tokenised train dataset has \d+ values in column "
                                         r"'token_weights', but it has \d+ labelled tokens"):
        make_trainer(model_dir, tmp_path, dataset=dataset, token_signals=["weights"])
    for packing in ({"packing": True}, {"eval_packing": True}):
        with pytest.raises(ValueError, match="packing joins examples"):
            TokenSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, token_signals=["weights"], **packing)


@pytest.mark.parametrize("control", ["none", "shuffle"])
def test_padding_free_signals_see_one_row_per_example(model_dir, tmp_path, control):
    """Padding-free packs the batch into one row; the signals still see one row per example (the random control
    permutes each example's weights within it, seeded by its dataset row), so the loss is the padded batch's."""
    dataset = with_weights(model_dir, tmp_path, random_weights)
    options = dict(dataset=dataset, token_signals=["weights"], signal_control=control)
    padded = make_trainer(model_dir, tmp_path, **options)
    flat = make_trainer(model_dir, tmp_path, padding_free=True, max_length=None, **options)
    torch.testing.assert_close(loss_and_grads(flat, [collate(flat, range(6))])[0],
                               loss_and_grads(padded, [collate(padded, range(6))])[0], atol=1e-5, rtol=0)


def test_padding_free_lays_the_column_out_like_the_labels(model_dir, tmp_path):
    """Padding-free concatenates the rows: the column's values sit at the labels of each row, and the loss is the
    padded batch's (the same weighted NLL)."""
    dataset = with_weights(model_dir, tmp_path, random_weights)
    padded = make_trainer(model_dir, tmp_path, dataset=dataset, token_signals=["weights"])
    flat = make_trainer(model_dir, tmp_path, dataset=dataset, token_signals=["weights"], padding_free=True,
                        max_length=None)
    flat_batch, padded_batch = collate(flat, range(6)), collate(padded, range(6))
    assert flat_batch["weights"].shape == flat_batch["input_ids"].shape == (1, padded_batch["attention_mask"].sum())
    torch.testing.assert_close(flat_batch["weights"][0], padded_batch["weights"][padded_batch["attention_mask"].bool()])
    torch.testing.assert_close(loss_and_grads(flat, [flat_batch])[0], loss_and_grads(padded, [padded_batch])[0],
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Span rules.
# ---------------------------------------------------------------------------------------------------------------
def spans_of(ids: list[int], pattern: list[int]) -> set[int]:
    """The positions of every occurrence of the id sequence ``pattern`` in ``ids``."""
    return {start + k for start in range(len(ids) - len(pattern) + 1) if ids[start:start + len(pattern)] == pattern
            for k in range(len(pattern))}


def test_weight_rules_weigh_the_tokens_of_each_match(model_dir, tmp_path):
    """``The answer is N`` gets 3, each ``a + b`` of the working 0.5, every other label token 1 (the tiny tokenizer
    has a token per character, so a match's tokens are its characters' ids, found among the label tokens)."""
    rules = {r"The answer is \d+": 3.0, r"\d+ \+ \d+": 0.5}
    trainer = make_trainer(model_dir, tmp_path, token_signals=["weight_rules"], weight_rules=rules)
    tokenizer = trainer.processing_class
    for row, source in zip(trainer.train_dataset, sft_dataset()):
        ids = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
        a, b = (int(x) for x in source["prompt"][0]["content"][8:-1].split("+"))
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        answer, working = spans_of(ids, encode(f"The answer is {a + b}")), spans_of(ids, encode(f"{a} + {b}"))
        expected = [3.0 if t in answer else 0.5 if t in working else 1.0 for t in range(len(ids))]
        assert answer and working and row["rule_weights"] == expected


def test_weight_rules_refuse_a_match_that_truncation_cuts(model_dir, tmp_path):
    long_answer = sft_dataset(1).map(lambda row: {"completion": [
        {"role": "assistant", "content": "Working it out: The answer is 12345678901234567890."}]})
    with pytest.raises(ValueError, match=r"truncation to max_length 60 cuts the match of 'The answer is .*' in row 0 "
                                         r"of the train dataset \(tokens 48-81 of 85\)"):
        make_trainer(model_dir, tmp_path, dataset=long_answer, token_signals=["weight_rules"],
                     weight_rules={r"The answer is \d+": 2.0}, max_length=60)
    with pytest.raises(ValueError, match="is not a regular expression"):
        TokenSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, token_signals=["weight_rules"],
                       weight_rules={"(unclosed": 2.0})


# ---------------------------------------------------------------------------------------------------------------
# Frozen models: the reference by path, the history model (snapshot, EMA, with LoRA), their state.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def frozen_reader():
    """A toy SFT signal that reads the frozen models named in ``reads`` and records their log-probs (weights 1)."""

    @register_token_signal("frozen_reader_test")
    class FrozenReader(TokenSignal):
        supports = frozenset({"sft"})
        provides = frozenset({"token_weights"})
        reads: tuple[str, ...] = ()
        seen: list[dict] = []

        @classmethod
        def frozen_models(cls, args):
            return cls.reads

        def token_inputs(self, batch):
            type(self).seen.append({name: batch.frozen.logps(name) for name in self.reads})
            return {"token_weights": torch.ones_like(batch.logps)}

    yield FrozenReader
    TOKEN_SIGNALS.pop("frozen_reader_test")


def model_logps(model, batch) -> torch.Tensor:
    """The fused head's log-probs ``[B, L-1]`` of ``batch``'s labels under ``model`` (TRL's forward, as the trainer
    runs it)."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     fused_lm_head=True).log_probs


def test_a_reference_by_path_gives_its_own_log_probs(model_dir, tmp_path, frozen_reader):
    reference = tmp_path / "reference"
    model, tokenizer = build_tiny_llama(seed=1)
    model.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    frozen_reader.reads = ("reference",)
    trainer = make_trainer(model_dir, tmp_path, token_signals=["frozen_reader_test"], reference_model_path=str(reference))
    batch = collate(trainer, range(6))
    trainer.compute_loss(trainer.model, dict(batch))
    loaded = trainer.frozen_models.loaded["reference"]
    assert not any(param.requires_grad for param in loaded.parameters())
    expected = model_logps(loaded, batch)
    torch.testing.assert_close(frozen_reader.seen[-1]["reference"], expected)
    policy = model_logps(trainer.model, batch)
    assert (policy - expected).abs().max() > 1e-3  # another model than the policy


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_the_history_model_follows_the_policy(model_dir, tmp_path, frozen_reader, alpha):
    """Full fine-tuning: after each optimizer step (history_sync_steps 1) θ_h ← (1 − α)·θ_h + α·θ: a snapshot with
    α = 1 (the history's log-probs are the policy's), an EMA with α = 0.5."""
    frozen_reader.reads = ("history",)
    trainer = make_trainer(model_dir, tmp_path, token_signals=["frozen_reader_test"], history_sync_steps=1,
                           history_mixup_alpha=alpha, max_steps=2, learning_rate=1e-2)
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    after_first = {}

    class AfterFirstStep(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_first.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(AfterFirstStep())
    trainer.train()
    history = dict(trainer.frozen_models.loaded["history"].named_parameters())
    final = dict(trainer.model.named_parameters())
    for name, param in history.items():
        step_one = (1 - alpha) * initial[name] + alpha * after_first[name]
        torch.testing.assert_close(param, (1 - alpha) * step_one + alpha * final[name], atol=1e-6, rtol=0)
    if alpha == 1.0:
        batch = collate(trainer, range(6))
        torch.testing.assert_close(model_logps(trainer.frozen_models.loaded["history"], batch),
                                   model_logps(trainer.model, batch))


def test_the_history_of_a_lora_policy_holds_its_adapted_weights_and_survives_a_checkpoint(model_dir, tmp_path,
                                                                                         frozen_reader):
    """LoRA: the history model takes W + ΔW of each adapted layer (its log-probs are the adapted policy's, not the
    base's); the checkpoint carries it (frozen_models.pt) and a new trainer restores it."""
    from tokenweave.trainers.host import FROZEN_STATE_FILE

    frozen_reader.reads = ("history",)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    options = dict(token_signals=["frozen_reader_test"], history_sync_steps=1, peft_config=lora)
    trainer = make_trainer(model_dir, tmp_path, **options)
    trainer.frozen_models.sync_history()
    batch = collate(trainer, range(6))
    history = trainer.frozen_models.loaded["history"]
    torch.testing.assert_close(model_logps(history, batch), model_logps(trainer.model, batch), atol=1e-5, rtol=0)
    with trainer.model.disable_adapter():
        base = model_logps(trainer.model, batch)
    assert (model_logps(history, batch) - base).abs().max() > 1e-3

    trainer._save_rng_state(str(tmp_path))
    assert (tmp_path / FROZEN_STATE_FILE).exists()
    fresh = make_trainer(model_dir, tmp_path, **options)
    assert (model_logps(fresh.frozen_models.loaded["history"], batch) - base).abs().max() < 1e-6  # the base weights
    fresh._load_rng_state(str(tmp_path))
    torch.testing.assert_close(model_logps(fresh.frozen_models.loaded["history"], batch), model_logps(history, batch))


def test_a_history_model_of_a_lora_variant_is_refused_before_training(model_dir, tmp_path, frozen_reader):
    frozen_reader.reads = ("history",)
    dora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    with pytest.raises(NotImplementedError, match="only plain LoRA .W \+ ΔW., not DoRA"):
        make_trainer(model_dir, tmp_path, token_signals=["frozen_reader_test"], history_sync_steps=1,
                     peft_config=dora)


def test_a_lora_policy_reads_its_initial_weights_with_the_adapter_off(model_dir, tmp_path, frozen_reader):
    """With PEFT and no path, the reference (and a history model that is never updated) is the policy with its
    adapter off: nothing is loaded, and its log-probs are the base model's."""
    frozen_reader.reads = ("reference", "history")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(model_dir, tmp_path, token_signals=["frozen_reader_test"], peft_config=lora)
    assert trainer.frozen_models.loaded == {}
    batch = collate(trainer, range(6))
    trainer.compute_loss(trainer.model, dict(batch))
    base = copy.deepcopy(build_tiny_llama()[0])
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base)
    for name in ("reference", "history"):
        torch.testing.assert_close(frozen_reader.seen[-1][name], model_logps(base, batch), atol=1e-5, rtol=0)
