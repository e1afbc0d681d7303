"""Tests of TokenDPOTrainer: cDPO and TDPO inside TRL's DPOTrainer, checked against TRL and by hand.

Every comparison runs on the same collated batch and the same model weights. The policy and the
reference are two differently seeded tiny Llamas, so log-ratios and KLs are not zero.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from tokenweave.data.arithmetic import load_arithmetic
from tokenweave.losses.preference import TokenPairs, sequential_kl, tdpo_loss
from tokenweave.models import build_tiny_llama
from tokenweave.train import train
from tokenweave.tokens.controls import row_generator, shuffle_within_mask
from tokenweave.trainers.collators import TokenColumnsCollator
from tokenweave.trainers.dpo import TokenDPOConfig, TokenDPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .conftest import CONFIGS, prompt_and_completion_lengths, with_columns

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BETA = 0.5


@pytest.fixture(scope="module")
def models():
    """(policy, reference, tokenizer): two differently seeded tiny Llamas sharing the char tokenizer."""
    policy, tokenizer = build_tiny_llama(seed=0)
    reference, _ = build_tiny_llama(seed=1)
    return policy, reference, tokenizer


def pairs_dataset() -> Dataset:
    """Four short conversational pairs with completions of different lengths (so the batch is padded)."""
    rows = []
    for a, b, slip in [(12, 7, 1), (3, 45, -10), (100, 23, 2), (8, 8, -1)]:
        right, wrong = a + b, a + b + slip
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {right}\nThe answer is {right}."}],
                "rejected": [{"role": "assistant", "content": f"The answer is {wrong}."}],
            }
        )
    return Dataset.from_list(rows)


def ones(n, index):
    return [1.0] * n


def make_trainer(tmp_path, models, dataset, trainer_class=TokenDPOTrainer, config_class=TokenDPOConfig, **config):
    """A trainer on fresh copies of the policy and the reference (None with ``peft_config``)."""
    policy, reference, tokenizer = models
    peft_config = config.pop("peft_config", None)
    defaults = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        max_length=None,
        activation_checkpointing=False,
        beta=BETA,
    )
    args = config_class(**(defaults | config))
    return trainer_class(
        model=copy.deepcopy(policy),
        ref_model=None if peft_config else copy.deepcopy(reference),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def first_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def loss_and_grads(trainer, batch):
    """The trainer's loss on ``batch`` and the gradients it leaves on the policy's parameters."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_loss_and_grads(actual, expected, atol=1e-5):
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    torch.testing.assert_close(loss, expected_loss, atol=atol, rtol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=atol, rtol=0, msg=name)


def full_logits_and_logps(model, batch):
    """Logits ``[2B, L-1, V]`` for next-token positions and the log-prob of each next token, from the
    model's original forward (the full logits), independently of TRL's fused head."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logits, logps


# ---------------------------------------------------------------------------------------------------
# Equivalences with TRL's DPOTrainer


# What TRL 1.16's DPOTrainer logs for loss_type sigmoid (dpo_trainer.py, _compute_loss lines 1535-1601).
TRL_DPO_METRICS = {
    "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
    "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
}
# The metrics a token-level loss logs on top of TRL's.
EXTRA_METRICS = {"cdpo": {"weights/chosen", "weights/rejected"}, "tdpo2": {"kl/chosen", "kl/rejected"}, "sigmoid": set()}


def logged_metrics(trainer):
    """What the trainer logs at its next logging step, from the losses computed since the last one (``Trainer.log``)."""
    trainer.log({})
    return {key: value for key, value in trainer.state.log_history[-1].items() if key not in ("step", "epoch")}


@pytest.mark.parametrize(
    "loss_type, options",
    [("cdpo", {}), ("tdpo2", {"tdpo_alpha": 0.0}), ("sigmoid", {})],
    ids=["cdpo-unit-weights", "tdpo2-alpha0", "sigmoid-passthrough"],
)
def test_reduces_to_trl_sigmoid(tmp_path, models, loss_type, options):
    """cDPO with all weights 1 and TDPO2 with α = 0 are DPO: the mirror of ``DPOTrainer._compute_loss`` gives the loss,
    gradients and logged metrics of TRL's sigmoid, plus the method's own metrics. TDPO's rewards are β·(Δ + SeqKL),
    the TDPO code's, where TRL's are β·Δ: they differ by β times the logged ``kl/*``."""
    dataset = with_columns(pairs_dataset(), models[2], ones, ones)
    trl_trainer = make_trainer(tmp_path, models, dataset, DPOTrainer, DPOConfig, loss_type=["sigmoid"])
    trainer = make_trainer(tmp_path, models, dataset, loss_type=loss_type, tdpo_kl_chunk_size=16, **options)
    trl_batch, batch = first_batch(trl_trainer), first_batch(trainer)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], trl_batch[key])

    expected = loss_and_grads(trl_trainer, trl_batch)
    assert_same_loss_and_grads(loss_and_grads(trainer, batch), expected)
    if loss_type == "cdpo":
        assert torch.equal(batch["critical_weights"], batch["completion_mask"].float())

    trl_metrics, metrics = logged_metrics(trl_trainer), logged_metrics(trainer)
    assert set(trl_metrics) == TRL_DPO_METRICS
    assert set(metrics) == TRL_DPO_METRICS | EXTRA_METRICS[loss_type]
    tdpo = loss_type == "tdpo2"
    for key, value in trl_metrics.items():
        if not (tdpo and key.startswith("rewards/")):
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    if tdpo:
        chosen_kl, rejected_kl = metrics["kl/chosen"], metrics["kl/rejected"]
        assert chosen_kl > 0 and rejected_kl > 0
        for key, shift in [("chosen", chosen_kl), ("rejected", rejected_kl), ("margins", chosen_kl - rejected_kl)]:
            assert metrics[f"rewards/{key}"] == pytest.approx(trl_metrics[f"rewards/{key}"] + BETA * shift, rel=1e-5)
    if loss_type == "cdpo":
        assert metrics["weights/chosen"] == metrics["weights/rejected"] == 1.0


@pytest.mark.parametrize("case", ["random-weights", "rejected-weights-zero"])
def test_cdpo_loss_equals_hand_computation(tmp_path, models, case):
    """Token weights multiply the log-ratio of exactly the completion token they are listed for.

    Expected loss, from full-logit log-probs indexed by hand: row i's completion token k sits at
    position P_i + k of input_ids (P_i prompt tokens) and is predicted at position P_i + k − 1.
    With the rejected weights all 0, the rejected response drops out: loss = −log σ(β·Σ w·Δ_chosen).
    """
    policy, reference, tokenizer = models

    def random_weights(n, index):
        generator = torch.Generator().manual_seed(1000 + index + n)
        return torch.rand(n, generator=generator).tolist()

    rejected = random_weights if case == "random-weights" else (lambda n, index: [0.0] * n)
    dataset = with_columns(pairs_dataset(), tokenizer, random_weights, rejected)
    trainer = make_trainer(tmp_path, models, dataset, loss_type="cdpo")
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)

    with torch.no_grad():
        _, logps = full_logits_and_logps(policy, batch)
        _, ref_logps = full_logits_and_logps(reference, batch)
    num_pairs = len(dataset)
    margins = []
    for i, row in enumerate(dataset):
        weighted = {}
        for side, offset in (("chosen", 0), ("rejected", num_pairs)):
            prompt_len, num_tokens = prompt_and_completion_lengths(tokenizer, row, side)
            positions = torch.arange(prompt_len - 1, prompt_len - 1 + num_tokens)
            log_ratio = logps[offset + i, positions] - ref_logps[offset + i, positions]
            weighted[side] = (torch.tensor(row[f"{side}_weights"]) * log_ratio).sum()
        margins.append(weighted["chosen"] - weighted["rejected"])
    expected = -F.logsigmoid(BETA * torch.stack(margins)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)


def test_cdpo_weights_from_critical_token_scores(tmp_path, models):
    """Score columns become cDPO's weights: chosen 1 (or s_t), rejected 1 − s_t, EOS 1 (ChatML's <|im_end|>,
    followed by a newline that is weighted like any other token)."""
    tokenizer = models[2]

    def scores(n, index):
        return [round(0.1 * ((index + k) % 10), 1) for k in range(n)]

    dataset = with_columns(pairs_dataset(), tokenizer, scores, scores, names=("chosen_scores", "rejected_scores"))
    for weight_chosen in (False, True):
        trainer = make_trainer(tmp_path, models, dataset, loss_type="cdpo", cdpo_weight_chosen=weight_chosen)
        prepared = trainer.train_dataset
        for row in prepared:
            assert [row[f"{side}_ids"][-2:] for side in ("chosen", "rejected")] == [
                tokenizer.convert_tokens_to_ids([tokenizer.eos_token, "\n"])
            ] * 2
            chosen, rejected = row["chosen_scores"], row["rejected_scores"]
            chosen = chosen if weight_chosen else [1.0] * len(chosen)
            expected_chosen = chosen[:-2] + [1.0, chosen[-1]]
            expected_rejected = [1 - s for s in rejected[:-2]] + [1.0, 1 - rejected[-1]]
            assert row["chosen_weights"] == pytest.approx(expected_chosen, abs=1e-6)
            assert row["rejected_weights"] == pytest.approx(expected_rejected, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2"])
def test_tdpo_chunked_kl_in_trainer_equals_sequential_kl_on_full_logits(tmp_path, models, loss_type):
    """The trainer's hidden-state KL, in chunks of 5 positions, equals ``sequential_kl`` of the full logits,
    shifted like the log-probs; loss and gradients match TDPO computed from full logits."""
    policy, reference, _ = models
    trainer = make_trainer(tmp_path, models, pairs_dataset(), loss_type=loss_type, tdpo_kl_chunk_size=5)
    batch = first_batch(trainer)
    actual = loss_and_grads(trainer, batch)

    hand_policy = copy.deepcopy(policy)
    mask = batch["completion_mask"][:, 1:]
    logits, logps = full_logits_and_logps(hand_policy, batch)
    with torch.no_grad():
        ref_logits, ref_logps = full_logits_and_logps(reference, batch)
    seq_kl = sequential_kl(logits, ref_logits, mask).sum(-1)
    result = tdpo_loss(
        TokenPairs(*logps.chunk(2), *ref_logps.chunk(2), *mask.chunk(2)),
        *seq_kl.chunk(2),
        beta=BETA,
        alpha=trainer.args.tdpo_alpha,
        variant=loss_type,
    )
    expected_loss = result.losses.mean()
    expected_loss.backward()
    expected_grads = {name: p.grad for name, p in hand_policy.named_parameters() if p.grad is not None}
    assert_same_loss_and_grads(actual, (expected_loss.detach(), expected_grads))

    chosen_kl, rejected_kl = seq_kl.detach().chunk(2)
    assert chosen_kl.min() > 0 and rejected_kl.min() > 0
    metrics = logged_metrics(trainer)
    assert metrics["kl/chosen"] == pytest.approx(chosen_kl.mean().item(), rel=1e-5)
    assert metrics["kl/rejected"] == pytest.approx(rejected_kl.mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# PEFT, data checks, config


@pytest.mark.parametrize("loss_type", ["cdpo", "tdpo2"])
def test_peft_reference_is_the_policy_with_its_adapter_disabled(tmp_path, models, loss_type):
    """With LoRA and no ref_model, policy == reference at init (zero margin and KL, loss log 2); after a few
    steps the adapter has moved the policy away from that reference."""
    dataset = with_columns(pairs_dataset(), models[2], ones, ones)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        tmp_path, models, dataset, loss_type=loss_type, peft_config=lora, max_steps=3, learning_rate=5e-2
    )
    assert trainer.ref_model is None
    batch = first_batch(trainer)

    loss = trainer.compute_loss(trainer.model, batch)
    metrics = logged_metrics(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    if loss_type == "tdpo2":
        assert metrics["kl/chosen"] == pytest.approx(0.0, abs=1e-6)

    trainer.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    metrics = logged_metrics(trainer)
    assert metrics["rewards/margins"] != pytest.approx(0.0, abs=1e-4)
    if loss_type == "tdpo2":
        assert metrics["kl/chosen"] > 1e-6


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2"])
def test_tdpo_with_peft_under_zero3_gathers_the_frozen_head_once(tmp_path, models, monkeypatch, loss_type):
    """Under ZeRO-3, a frozen LM head (LoRA's base model, tied to the frozen embedding) is gathered once per step and
    applied as ``F.linear`` of that copy, since the KL recomputed in the backward would find the sharded module
    released: the loss and the LoRA gradients are those of calling the head module, and the KL never calls it.

    One process: ``is_deepspeed_zero3_enabled`` is patched, and ``GatheredParameters`` (spied on) is a no-op on plain
    parameters. The real 2-process ZeRO-3 runs are in test_dpo_distributed.py.
    """
    import deepspeed

    from tokenweave.models import heads

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        tmp_path, models, pairs_dataset(), loss_type=loss_type, peft_config=lora, tdpo_kl_chunk_size=5
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from its reference (LoRA B starts at 0): non-zero KL and gradients
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    batch = first_batch(trainer)
    head = trainer.model.get_base_model().get_output_embeddings()
    assert not head.weight.requires_grad

    head_calls = []
    head.register_forward_hook(lambda module, args, output: head_calls.append(args[0].shape[0]))
    expected = loss_and_grads(trainer, batch)
    expected_kl = logged_metrics(trainer)["kl/chosen"]
    assert len(head_calls) > 0 and expected_kl > 1e-4

    gathers = []

    class SpyGatheredParameters(deepspeed.zero.GatheredParameters):
        def __init__(self, params, *args, **kwargs):
            gathers.append(list(params))
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(heads, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", SpyGatheredParameters)
    trainer._check_lm_heads(f"loss_type {loss_type!r}")  # no refusal any more
    head_calls.clear()
    actual = loss_and_grads(trainer, batch)
    assert head_calls == []
    assert len(gathers) == 1 and len(gathers[0]) == 1 and gathers[0][0] is head.weight  # once: policy and reference
    assert_same_loss_and_grads(actual, expected)
    assert any("lora_A" in name for name in actual[1]) and not any("lm_head" in name for name in actual[1])
    assert logged_metrics(trainer)["kl/chosen"] == pytest.approx(expected_kl, rel=1e-6)


@pytest.mark.parametrize(
    "case, message",
    [
        ("misaligned", r"row 1 .* 'chosen_weights'.*chosen completion has"),
        ("none", r"row 2 .*no value in column 'rejected_weights'"),
        ("missing", r"no per-token weights.*'chosen_weights'.*'chosen_scores'"),
    ],
)
def test_bad_weights_raise_before_training(tmp_path, models, case, message):
    tokenizer = models[2]
    if case == "missing":
        dataset = pairs_dataset()
    else:

        def chosen(n, index):
            return [1.0] * (n - 1 if case == "misaligned" and index == 1 else n)

        def rejected(n, index):
            return None if case == "none" and index == 2 else [1.0] * n

        dataset = with_columns(pairs_dataset(), tokenizer, chosen, rejected)
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, models, dataset, loss_type="cdpo")


def test_collator_truncates_and_pads_weights_like_completion_mask():
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6], "rejected_ids": [7], "cw": [0.1, 0.2, 0.3], "rw": [0.4]},
        {"prompt_ids": [8], "chosen_ids": [9], "rejected_ids": [10, 11], "cw": [0.5], "rw": [0.6, 0.7]},
    ]
    collator = TokenColumnsCollator(DataCollatorForPreference(pad_token_id=0, max_length=5), {"w": ("cw", "rw")}, "dpo")
    batch = collator(examples)
    expected = torch.tensor(
        [
            [0, 0, 0, 0.1, 0.2],  # prompt+chosen has 6 tokens: keep_start drops the last one
            [0, 0.5, 0, 0, 0],
            [0, 0, 0, 0.4, 0],
            [0, 0.6, 0.7, 0, 0],
        ]
    )
    torch.testing.assert_close(batch["w"], expected)
    assert torch.equal(batch["w"] > 0, batch["completion_mask"].bool())

    keep_end = TokenColumnsCollator(DataCollatorForPreference(pad_token_id=0, max_length=4, truncation_mode="keep_end"),
                                    {"w": ("cw", "rw")}, "dpo")(examples)
    torch.testing.assert_close(keep_end["w"][0], torch.tensor([0, 0.1, 0.2, 0.3]))


def test_config_loss_types():
    def config(**options):
        return TokenDPOConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=False, **options)

    assert config(loss_type="tdpo1").token_loss_type == "tdpo1"
    assert config(loss_type=["ipo", "sft"]).token_loss_type is None
    with pytest.raises(ValueError, match="only loss type"):
        config(loss_type=["cdpo", "sft"])
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        config(loss_type="tdpo2", precompute_ref_log_probs=True)


def test_token_loss_type_needs_token_dpo_config(tmp_path, models):
    with pytest.raises(TypeError, match="TokenDPOConfig"):
        make_trainer(tmp_path, models, pairs_dataset(), config_class=DPOConfig, loss_type=["tdpo2"])


# ---------------------------------------------------------------------------------------------------
# Training runs


@pytest.mark.parametrize("loss_type", ["cdpo", "tdpo1", "tdpo2"])
def test_short_training_updates_the_policy(tmp_path, models, loss_type):
    """Three steps on one batch of 4 pairs: every parameter moves and the loss goes down; evaluation runs."""
    dataset = with_columns(pairs_dataset(), models[2], ones, lambda n, index: [0.5] * n)
    trainer = make_trainer(
        tmp_path, models, dataset, loss_type=loss_type, max_steps=3, learning_rate=1e-2, logging_steps=1
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and logs[-1]["loss"] < logs[0]["loss"]  # the same 4 pairs at every step
    assert TRL_DPO_METRICS <= set(logs[0]) and ("kl/chosen" in logs[0]) == loss_type.startswith("tdpo")
    if loss_type == "cdpo":  # the mean weight of the completion tokens: chosen all 1, rejected all 0.5
        assert logs[0]["weights/chosen"] == pytest.approx(1.0) and logs[0]["weights/rejected"] == pytest.approx(0.5)
    else:
        assert "weights/chosen" not in logs[0]

    metrics = trainer.evaluate(dataset)  # a raw dataset: prepared (tokenised, weights aligned) by evaluate
    assert math.isfinite(metrics["eval_loss"]) and ("eval_kl/chosen" in metrics) == loss_type.startswith("tdpo")


@pytest.mark.parametrize("loss_type, options", [("cdpo", {}), ("tdpo2", {}), ("tgdpo", {"tgdpo_alpha": 2.0}),
                                                ("treg", {"treg_alpha": 2.0})])
def test_gradient_accumulation_gives_the_same_update(tmp_path, models, loss_type, options):
    """One SGD step on 4 pairs: batch 4 × GA 1 and batch 2 × GA 2 move the parameters identically (the loss
    is a per-pair mean, and the Trainer divides each micro-batch's loss by GA). TGDPO and T-REG read token rewards
    that differ from token to token (AlignDistil's: ``test_aligndistil.py``)."""
    dataset = with_columns(pairs_dataset(), models[2], ones, lambda n, index: [0.5] * n)
    dataset = with_columns(dataset, models[2], random_rewards, random_rewards,
                           names=("chosen_token_rewards", "rejected_token_rewards"))
    updated = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        trainer = make_trainer(
            tmp_path, models, dataset, loss_type=loss_type, max_steps=1, optim="sgd", learning_rate=1.0,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, **options,
        )
        trainer.train()
        updated.append({name: p.detach().clone() for name, p in trainer.model.named_parameters()})
    initial = dict(models[0].named_parameters())
    for name, value in updated[0].items():
        assert not torch.equal(value, initial[name])
        torch.testing.assert_close(updated[1][name], value, atol=1e-6, rtol=0, msg=name)


def test_tdpo_yaml_config_trains(tmp_path, tiny_model_cache):
    info = train(
        ["--config", str(CONFIGS / "tdpo_tiny.yaml"), "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
        + ["--num_train_examples", "8"]
    )
    assert info["global_step"] == 2 and math.isfinite(info["train_metrics"]["train_loss"])


def test_cdpo_yaml_config_trains_on_a_dataset_with_scores(tmp_path, tiny_model_cache):
    config = str(CONFIGS / "cdpo_tiny.yaml")
    with pytest.raises(ValueError, match="critical_tokens/pairs': no such file or folder"):  # the pipeline's output
        train(["--config", config, "--output_dir", str(tmp_path / "missing")])

    tokenizer = build_tiny_llama()[1]
    dataset = load_arithmetic("train", "preference", num_examples=8)
    scores = with_columns(
        dataset, tokenizer, lambda n, i: [0.9] * n, lambda n, i: [0.3] * n, names=("chosen_scores", "rejected_scores")
    )
    scores.save_to_disk(str(tmp_path / "pairs"))
    argv = ["--config", config, "--dataset_name", str(tmp_path / "pairs"), "--output_dir", str(tmp_path / "out")]
    info = train(argv + ["--max_steps", "2"])
    assert info["global_step"] == 2 and math.isfinite(info["train_metrics"]["train_loss"])


# ---------------------------------------------------------------------------------------------------
# The random-signal control: signal_control "shuffle" (the host's, on the critical_tokens signal's weights)


def random_weights(n, index):
    return torch.rand(n, generator=torch.Generator().manual_seed(100 + index)).tolist()


def random_rewards(n, index):
    """Token rewards in (−0.5, 0.5), different for every token and row."""
    return (torch.rand(n, generator=torch.Generator().manual_seed(7 + index)) - 0.5).mul(0.99).tolist()


def loss_input(trainer, batch, name: str) -> torch.Tensor:
    """The ``[2B, L-1]`` per-token input ``name`` the preference loss gets for ``batch`` (chosen rows, then
    rejected)."""
    seen = []
    fn = trainer.preference_loss.fn

    def spy(pairs, config, **inputs):
        seen.append(torch.cat(inputs[name]))
        return fn(pairs, config, **inputs)

    trainer.preference_loss = trainer.preference_loss._replace(fn=spy)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    trainer.preference_loss = trainer.preference_loss._replace(fn=fn)
    return seen[0]


def loss_token_weights(trainer, batch) -> torch.Tensor:
    """The ``[2B, L-1]`` token weights the preference loss gets for ``batch`` (chosen rows, then rejected)."""
    return loss_input(trainer, batch, "token_weights")


def test_shuffle_control_permutes_each_rows_weights_by_seed(tmp_path, models):
    """Each row keeps its own weights (the same multiset on the same tokens), in another order, and the order depends
    on the seed (and only on it: the same seed gives the same rows)."""
    dataset = with_columns(pairs_dataset(), models[2], random_weights, random_weights)
    plain_trainer = make_trainer(tmp_path, models, dataset, loss_type="cdpo")
    plain = loss_token_weights(plain_trainer, first_batch(plain_trainer))
    shuffled = {}
    for seed in (0, 1, 0):
        trainer = make_trainer(tmp_path, models, dataset, loss_type="cdpo", signal_control="shuffle",
                               signal_control_seed=seed)
        shuffled.setdefault(seed, []).append(loss_token_weights(trainer, first_batch(trainer)))
    mask = first_batch(plain_trainer)["completion_mask"][:, 1:].bool()
    for row in range(plain.size(0)):
        original, permuted = plain[row][mask[row]], shuffled[0][0][row][mask[row]]
        assert torch.equal(torch.sort(permuted).values, torch.sort(original).values)
        assert not torch.equal(permuted, original) and (shuffled[0][0][row][~mask[row]] == 0).all()
        assert torch.equal(shuffled[0][1][row], shuffled[0][0][row])  # the same seed: the same order
    assert not torch.equal(shuffled[1][0], shuffled[0][0])


def test_shuffle_control_with_equal_weights_gives_the_unshuffled_loss(tmp_path, models):
    """With every weight of a completion equal, a permutation changes nothing: same loss and gradients."""
    constant = lambda n, index: [0.25 + 0.1 * index] * n  # noqa: E731
    dataset = with_columns(pairs_dataset(), models[2], constant, constant)
    plain = make_trainer(tmp_path, models, dataset, loss_type="cdpo")
    shuffled = make_trainer(tmp_path, models, dataset, loss_type="cdpo", signal_control="shuffle")
    batch = first_batch(shuffled)
    assert torch.equal(loss_token_weights(shuffled, batch), loss_token_weights(plain, first_batch(plain)))
    assert_same_loss_and_grads(loss_and_grads(shuffled, batch), loss_and_grads(plain, first_batch(plain)), atol=0)


def test_shuffle_control_changes_the_loss_of_unequal_weights(tmp_path, models):
    """With unequal weights the shuffled loss differs, and equals the plain loss on the weights permuted as c203bc0
    permuted them in the dataset (each row and side by its own generator, ``row_generator(seed, row, side)``): the
    control is only a permutation of the inputs of the same loss, which the batch split does not change."""
    dataset = with_columns(pairs_dataset(), models[2], random_weights, random_weights)
    shuffled = make_trainer(tmp_path, models, dataset, loss_type="cdpo", signal_control="shuffle",
                            signal_control_seed=7)

    def permuted_by_hand(example, index):
        columns = {}
        for side, column in enumerate(("chosen_weights", "rejected_weights")):
            weights = torch.tensor(example[column]).unsqueeze(0)
            generator = row_generator(7, index, side)
            columns[column] = shuffle_within_mask(weights, torch.ones_like(weights), generator).squeeze(0).tolist()
        return columns

    plain = make_trainer(tmp_path, models, dataset, loss_type="cdpo")
    on_permuted = make_trainer(tmp_path, models, dataset.map(permuted_by_hand, with_indices=True), loss_type="cdpo")
    loss, _ = loss_and_grads(shuffled, first_batch(shuffled))
    assert not torch.allclose(loss, loss_and_grads(plain, first_batch(plain))[0])
    torch.testing.assert_close(loss, loss_and_grads(on_permuted, first_batch(on_permuted))[0], atol=0, rtol=0)
    # two micro-batches of 2 pairs see the same permutations (seeded by the dataset row, not the batch)
    halves = [shuffled.data_collator([shuffled.train_dataset[i] for i in rows]) for rows in ((0, 1), (2, 3))]
    expected = loss_and_grads(on_permuted, on_permuted.data_collator([on_permuted.train_dataset[i] for i in (2, 3)]))
    torch.testing.assert_close(loss_and_grads(shuffled, halves[1])[0], expected[0], atol=0, rtol=0)


def test_shuffle_control_needs_a_signal_that_weighs_tokens():
    with pytest.raises(ValueError, match="signal_control 'shuffle' moves token weights: it needs a token signal"):
        TokenDPOConfig(output_dir="x", use_cpu=True, bf16=False, loss_type="sigmoid", signal_control="shuffle")
    with pytest.raises(ValueError, match=r"signal_control must be one of \['none', 'shuffle', 'inverse', 'full'\], got 'random'"):
        TokenDPOConfig(output_dir="x", use_cpu=True, bf16=False, loss_type="cdpo", signal_control="random")
    with pytest.raises(ValueError, match="'inverse' takes the other end of a selection's ranking"):
        TokenDPOConfig(output_dir="x", use_cpu=True, bf16=False, loss_type="cdpo", signal_control="inverse")
