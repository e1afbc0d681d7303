"""AlignDistil (``loss_type: aligndistil``, arXiv 2503.02832): the per-token math by hand, the chunked version against
the full-logits one (values and gradients), the loss inside TokenDPOTrainer against a hand computation from the three
models' full logits, zero loss and gradient with teachers equal to the policy, the config's refusals, gradient
accumulation and the tiny config. The 2-process ZeRO-2/3 runs: ``tests/distributed/test_dpo.py``."""

import copy
import math

import pytest
import torch
from torch import nn

from tokenweave.checks import ConfigError
from tokenweave.losses.aligndistil import (
    aligndistil_loss,
    aligndistil_loss_from_logits,
    aligndistil_token_loss,
    chunked_aligndistil_loss,
)
from tokenweave.losses.preference import PreferenceLossConfig, TokenPairs
from tokenweave.models import build_tiny_llama
from tokenweave.train import train
from tokenweave.trainers.aligndistil import REVERSE, TEACHER
from tokenweave.trainers.dpo import TokenDPOConfig

from .conftest import CONFIGS
from .test_dpo_trainer import BETA, first_batch, full_logits_and_logps, logged_metrics, loss_and_grads, make_trainer
from .test_dpo_trainer import pairs_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METRICS = {"aligndistil/scale_max", "aligndistil/scale_mean", "aligndistil/tvd_mean"}


@pytest.fixture(scope="module")
def models():
    """(policy, reference, tokenizer): two differently seeded tiny Llamas (the reference serves TRL's metrics only)."""
    policy, tokenizer = build_tiny_llama(seed=0)
    reference, _ = build_tiny_llama(seed=1)
    return policy, reference, tokenizer


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """The DPO teacher (seed 2) and the reverse-DPO teacher (seed 3), saved: two models unlike the policy and the
    reference."""
    paths = {}
    for name, seed in (("dpo", 2), ("reverse", 3)):
        path = tmp_path_factory.mktemp(f"aligndistil-{name}")
        model, tokenizer = build_tiny_llama(seed=seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


def teacher_options(teacher_dirs, **options):
    return {"loss_type": "aligndistil", "aligndistil_teacher_model_path": teacher_dirs["dpo"],
            "aligndistil_reverse_model_path": teacher_dirs["reverse"]} | options


# ---------------------------------------------------------------------------------------------------
# The per-token math


def by_hand(student, dpo, rdpo, beta, beta2, temperature):
    """AlignDistil at one position from three lists of logits, in plain Python (no torch): (L_t, β / w_t, TVD_t)."""
    def softmax(logits):
        top = max(logits)
        exps = [math.exp(value - top) for value in logits]
        return [value / sum(exps) for value in exps]

    p_dpo, p_rdpo, p_student = softmax(dpo), softmax(rdpo), softmax(student)
    tvd = sum(abs(a - b) for a, b in zip(p_dpo, p_rdpo))
    weight = beta2 * tvd + 1e-3
    teacher = softmax([(a + weight * (a - b)) / temperature for a, b in zip(dpo, rdpo)])
    kl = sum(p * math.log(p / q) for p, q in zip(p_student, teacher))
    return beta / weight * kl, beta / weight, tvd


def linear_head(weight: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.size(1), weight.size(0), bias=False)
    head.weight.data.copy_(weight)
    return head


def small_example(seed=0, rows=3, length=5, hidden=4, vocab=6):
    """Hidden states of three models ``[rows, length, hidden]``, three heads (the student's trainable) and a mask with
    holes and an empty row."""
    generator = torch.Generator().manual_seed(seed)
    states = [torch.randn(rows, length, hidden, generator=generator) for _ in range(3)]
    heads = [linear_head(torch.randn(vocab, hidden, generator=generator)) for _ in range(3)]
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 3:] = 0  # padding
    mask[1, 0] = 0  # a prompt position
    mask[2] = 0  # an empty row
    return states, heads, mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_loss_equals_a_hand_computation(temperature):
    """TVD (L1, no ½), w_t = β₂·TVD + 1e-3, z* = z_dpo + w·(z_dpo − z_rdpo), softmax(z*/T) (the student at T = 1) and
    the scale β / w_t, by hand at every masked position; 0 elsewhere; chunks of 2, padded with empty chunks."""
    (student, dpo, rdpo), heads, mask = small_example()
    beta, beta2 = 0.1, 0.7
    tokens = chunked_aligndistil_loss(student, dpo, rdpo, *heads, mask, beta=beta, beta2=beta2,
                                      temperature=temperature, chunk_size=2, num_chunks=6)
    with torch.no_grad():
        logits = [head(states) for head, states in zip(heads, (student, dpo, rdpo))]
    for row in range(mask.size(0)):
        for position in range(mask.size(1)):
            values = (tokens.loss[row, position].item(), tokens.scale[row, position].item(),
                      tokens.tvd[row, position].item())
            if not mask[row, position]:
                assert values == (0.0, 0.0, 0.0)
                continue
            expected = by_hand(*(model[row, position].tolist() for model in logits), beta, beta2, temperature)
            assert values == pytest.approx(expected, rel=1e-5, abs=1e-7), (row, position)
    assert tokens.scale.requires_grad is False and tokens.tvd.requires_grad is False
    assert tokens.loss[mask.bool()].min() > 0


def test_the_scale_spans_the_released_range():
    """Identical teachers: TVD 0, scale β / 1e-3 = 100 (β 0.1), and the student's KL to the DPO teacher; teachers on
    disjoint tokens: TVD 2, scale β / (2β₂ + 1e-3) ≈ 0.005 (β₂ 10)."""
    student = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    same = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    tokens = aligndistil_token_loss(student, same, same, beta=0.1, beta2=10.0)
    kl = torch.nn.functional.kl_div(same.log_softmax(-1), student.log_softmax(-1), log_target=True, reduction="sum")
    assert tokens.tvd.item() == 0.0 and tokens.scale.item() == pytest.approx(100.0)
    assert tokens.loss.item() == pytest.approx(100.0 * kl.item(), rel=1e-5)
    apart = aligndistil_token_loss(student, torch.tensor([[60.0, 0, 0, 0]]), torch.tensor([[0, 60.0, 0, 0]]),
                                   beta=0.1, beta2=10.0)
    assert apart.tvd.item() == pytest.approx(2.0) and apart.scale.item() == pytest.approx(0.1 / 20.001)


def test_the_chunked_gradient_is_the_full_logits_gradient():
    """Values and gradients (the student's hidden states and head weight) of the chunked version, chunks of 3 under
    checkpointing, equal those of the full-logits version; the teachers get no gradient."""
    (student, dpo, rdpo), heads, mask = small_example(seed=1, rows=4, length=7)
    options = dict(beta=0.3, beta2=2.0, temperature=1.5)
    results = []
    for chunked in (True, False):
        hidden = student.clone().requires_grad_(True)
        teachers = [states.clone().requires_grad_(True) for states in (dpo, rdpo)]
        head = copy.deepcopy(heads[0])
        if chunked:
            tokens = chunked_aligndistil_loss(hidden, *teachers, head, *heads[1:], mask, chunk_size=3, **options)
        else:
            logits = [head(hidden), heads[1](teachers[0]), heads[2](teachers[1])]
            tokens = aligndistil_loss_from_logits(*logits, mask, **options)
        weights = torch.linspace(0.5, 2.0, mask.numel()).view_as(mask)  # a loss that weighs each position differently
        (tokens.loss * weights).sum().backward()
        assert all(states.grad is None or not states.grad.any() for states in teachers)
        results.append((tokens, hidden.grad, head.weight.grad))
    (chunked, hidden_grad, head_grad), (full, full_hidden_grad, full_head_grad) = results
    for values, expected in zip(chunked, full):
        torch.testing.assert_close(values, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hidden_grad, full_hidden_grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head_grad, full_head_grad, atol=1e-6, rtol=1e-5)
    assert hidden_grad[~mask.bool()].abs().max() == 0 and hidden_grad.abs().max() > 0


def test_the_gradient_is_the_scaled_reverse_kl_gradient():
    """∂L_t/∂z_θ = (β / w_t)·p_θ ⊙ (log p_θ − log q − KL), with q = softmax(z*/T) a constant."""
    generator = torch.Generator().manual_seed(2)
    student, dpo, rdpo = (torch.randn(5, 7, generator=generator) for _ in range(3))
    student.requires_grad_(True)
    tokens = aligndistil_token_loss(student, dpo, rdpo, beta=0.2, beta2=3.0, temperature=0.7)
    tokens.loss.sum().backward()
    weight = 0.2 / tokens.scale
    target = ((dpo + weight[:, None] * (dpo - rdpo)) / 0.7).log_softmax(-1)
    log_p = student.detach().log_softmax(-1)
    kl = (log_p.exp() * (log_p - target)).sum(-1, keepdim=True)
    torch.testing.assert_close(student.grad, tokens.scale[:, None] * log_p.exp() * (log_p - target - kl))


def test_the_loss_is_the_chosen_token_mean_with_dpo_rewards():
    """Per pair Σ_t L_t·m_t / Σ_t m_t of the chosen row (padding ignored, the rejected half not read); rewards and
    logits DPO's, detached."""
    chosen_loss = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 0.0, 0.0, 0.0]], requires_grad=True)
    chosen_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rejected_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logps = torch.tensor([[-1.0, -2.0, -3.0, -7.0], [-0.5, -9.0, -9.0, -9.0]])
    rejected_logps = torch.tensor([[-1.0, -1.0, -5.0], [-2.0, -2.0, -2.0]])
    pairs = TokenPairs(logps, rejected_logps, logps - 0.25, rejected_logps + 0.5, chosen_mask, rejected_mask)
    result = aligndistil_loss(pairs, PreferenceLossConfig(beta=0.1),
                              distillation_loss=(chosen_loss, torch.full((2, 3), float("nan"))))
    torch.testing.assert_close(result.losses, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(result.chosen_rewards, torch.tensor([0.1 * 0.75, 0.1 * 0.25]))
    torch.testing.assert_close(result.rejected_rewards, torch.tensor([0.1 * -1.0, 0.1 * -1.5]))
    torch.testing.assert_close(result.logits, result.chosen_rewards - result.rejected_rewards)
    assert not result.chosen_rewards.requires_grad and result.losses.requires_grad


# ---------------------------------------------------------------------------------------------------
# Inside TokenDPOTrainer


def test_teachers_equal_to_the_policy_give_zero_loss_and_gradient(tmp_path, models, tiny_model_cache):
    """Both teachers the built-in tiny-llama, the policy's own weights: TVD 0, z* = the policy's logits, so at T = 1
    the loss and every gradient are 0 (within 1e-6; the scale β / 1e-3 = 500), while DPO's metrics are not."""
    trainer = make_trainer(tmp_path, models, pairs_dataset(), loss_type="aligndistil",
                           aligndistil_teacher_model_path="tiny-llama", aligndistil_reverse_model_path="tiny-llama",
                           aligndistil_chunk_size=7)
    assert trainer.args.token_signals == ["aligndistil"]
    assert set(trainer.frozen_models.loaded) == {TEACHER, REVERSE}
    loss, grads = loss_and_grads(trainer, first_batch(trainer))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert len(grads) == len(list(trainer.model.parameters()))
    assert max(grad.abs().max().item() for grad in grads.values()) < 1e-6
    metrics = logged_metrics(trainer)
    assert metrics["aligndistil/tvd_mean"] == 0.0
    assert metrics["aligndistil/scale_max"] == pytest.approx(BETA / 1e-3, rel=1e-6)
    assert metrics["aligndistil/scale_mean"] == pytest.approx(BETA / 1e-3, rel=1e-6)
    assert metrics["rewards/margins"] != pytest.approx(0.0, abs=1e-3)  # the reference is another model


def test_trainer_loss_equals_the_full_logits_computation(tmp_path, models, teacher_dirs):
    """The trainer's loss, gradients and metrics (chunks of 5 positions, T = 2, β₂ = 3) equal AlignDistil computed from
    the three models' full logits on the chosen rows, shifted like the log-probs; DPO's metrics stay TRL's; evaluation
    gives the same loss."""
    options = teacher_options(teacher_dirs, aligndistil_chunk_size=5, aligndistil_temperature=2.0,
                              aligndistil_beta2=3.0)
    trainer = make_trainer(tmp_path, models, pairs_dataset(), **options)
    batch = first_batch(trainer)
    actual = loss_and_grads(trainer, batch)
    metrics = logged_metrics(trainer)

    hand_policy = copy.deepcopy(models[0])
    logits, logps = full_logits_and_logps(hand_policy, batch)
    with torch.no_grad():
        dpo_logits, _ = full_logits_and_logps(build_tiny_llama(seed=2)[0], batch)
        rdpo_logits, _ = full_logits_and_logps(build_tiny_llama(seed=3)[0], batch)
        _, ref_logps = full_logits_and_logps(models[1], batch)
    mask = batch["completion_mask"][:, 1:]
    chosen = slice(0, mask.size(0) // 2)
    tokens = aligndistil_loss_from_logits(logits[chosen], dpo_logits[chosen], rdpo_logits[chosen], mask[chosen],
                                          beta=BETA, beta2=3.0, temperature=2.0)
    expected_loss = (tokens.loss.sum(-1) / mask[chosen].sum(-1)).mean()
    expected_loss.backward()
    expected_grads = {name: p.grad for name, p in hand_policy.named_parameters() if p.grad is not None}
    loss, grads = actual
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    valid = mask[chosen].bool()
    assert metrics["aligndistil/scale_mean"] == pytest.approx(tokens.scale[valid].mean().item(), rel=1e-5)
    assert metrics["aligndistil/scale_max"] == pytest.approx(tokens.scale[valid].max().item(), rel=1e-5)
    assert metrics["aligndistil/tvd_mean"] == pytest.approx(tokens.tvd[valid].mean().item(), rel=1e-5)
    assert 0 < metrics["aligndistil/tvd_mean"] < 2
    margins = BETA * ((logps - ref_logps) * mask).sum(-1)
    chosen_margin, rejected_margin = margins.detach().chunk(2)
    assert metrics["rewards/margins"] == pytest.approx((chosen_margin - rejected_margin).mean().item(), rel=1e-4)

    evaluated = trainer.evaluate(pairs_dataset())  # no gradient: the same loss and metrics, under eval_
    assert evaluated["eval_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert evaluated["eval_aligndistil/scale_mean"] == pytest.approx(metrics["aligndistil/scale_mean"], rel=1e-5)


def test_gradient_accumulation_gives_the_same_update(tmp_path, models, teacher_dirs):
    """One SGD step on 4 pairs: batch 4 × GA 1 and batch 2 × GA 2 move the parameters identically (the loss is a
    per-pair mean of token means, and the Trainer divides each micro-batch's loss by GA)."""
    updated = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        trainer = make_trainer(tmp_path, models, pairs_dataset(), max_steps=1, optim="sgd", learning_rate=0.1,
                               per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                               **teacher_options(teacher_dirs, aligndistil_chunk_size=8))
        trainer.train()
        updated.append({name: p.detach().clone() for name, p in trainer.model.named_parameters()})
    initial = dict(models[0].named_parameters())
    for name, value in updated[0].items():
        assert not torch.equal(value, initial[name])
        torch.testing.assert_close(updated[1][name], value, atol=1e-6, rtol=0, msg=name)


def test_tiny_yaml_config_trains(tmp_path, tiny_model_cache):
    info = train(["--config", str(CONFIGS / "aligndistil_tiny.yaml"), "--output_dir", str(tmp_path / "out"),
                  "--max_steps", "2", "--num_train_examples", "8"])
    assert info["global_step"] == 2 and math.isfinite(info["train_metrics"]["train_loss"])
    logs = [entry for entry in info["log_history"] if "loss" in entry]
    assert all(METRICS <= set(entry) and 0.005 <= entry["aligndistil/scale_max"] <= 100.0 for entry in logs)


# ---------------------------------------------------------------------------------------------------
# The config


def config(**options):
    return TokenDPOConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=False, **options)


def test_the_config_names_both_teachers():
    args = config(loss_type="aligndistil", aligndistil_teacher_model_path="dpo-dir",
                  aligndistil_reverse_model_path="reverse-dir", teacher_model_paths={"other": "x"})
    assert args.token_loss_type == "aligndistil" and args.token_signals == ["aligndistil"]
    assert args.teacher_model_paths == {"other": "x", TEACHER: "dpo-dir", REVERSE: "reverse-dir"}
    assert (args.aligndistil_beta2, args.aligndistil_temperature, args.beta) == (10.0, 1.0, 0.1)  # the released ones


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "set aligndistil_teacher_model_path and aligndistil_reverse_model_path"),
        ({"aligndistil_teacher_model_path": "dpo"}, "set aligndistil_reverse_model_path\\.$"),
        ({"aligndistil_reverse_model_path": "reverse"}, "set aligndistil_teacher_model_path\\.$"),
        ({"aligndistil_teacher_model_path": "dpo", "aligndistil_reverse_model_path": "reverse",
          "teacher_model_paths": {TEACHER: "elsewhere"}}, "give each teacher once"),
        ({"aligndistil_teacher_model_path": "dpo", "aligndistil_reverse_model_path": "reverse",
          "signal_control": "shuffle"}, "needs a token signal that weighs tokens"),
        ({"aligndistil_teacher_model_path": "dpo", "aligndistil_reverse_model_path": "reverse",
          "aligndistil_beta2": 0.0}, "aligndistil_beta2"),
        ({"aligndistil_teacher_model_path": "dpo", "aligndistil_reverse_model_path": "reverse",
          "aligndistil_temperature": -1.0}, "aligndistil_temperature"),
    ],
    ids=["no-teachers", "no-reverse", "no-teacher", "two-paths", "control", "beta2", "temperature"],
)
def test_bad_configs_are_refused_when_the_config_is_made(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        config(loss_type="aligndistil", **options)
    if "teacher" in message:  # the signal's own refusals: one line (option ranges: checks.py's list of problems)
        assert "\n" not in str(error.value)


def test_the_signal_without_its_loss_is_refused():
    """Listed with TRL's sigmoid loss, its distillation loss would be ignored: refused."""
    with pytest.raises(ConfigError, match="distillation_loss"):
        config(loss_type="sigmoid", token_signals=["aligndistil"], aligndistil_teacher_model_path="dpo",
               aligndistil_reverse_model_path="reverse")
