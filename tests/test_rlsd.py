"""RLSD (arXiv 2604.03128), the ``rlsd`` GRPO token signal: the factor and advantages against a hand computation, the
λ schedule, a step at λ = 0 equal to TRL's GRPO and a step at λ > 0 equal to TRL's GRPO on the reweighted advantages
(both teacher modes), the teacher's prompt and the alignment of its log-probs with the completion tokens, the random
control, the frozen teacher's sync, and the refused configs."""

import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from tokenweave.tokens.rlsd import rlsd_advantages, rlsd_factor, rlsd_lambda, rlsd_lambda_is_over
from tokenweave.trainers.rlsd import ADVANTAGE_SIGN, TEACHER_LOGPS, teacher_prompt
from tokenweave.trainers.rollout import ROW_KEYS, Generation

from .conftest import CONFIGS
from .grpo_harness import (
    assert_same_update,
    loss_and_grads,
    make_batch,
    make_trainer,
    rlsd_generation_columns,
    rlsd_rows,
    rlsd_trainer,
    token_logps_and_entropies,
)

ROWS = rlsd_rows()


# ---------------------------------------------------------------------------------------------------------------
# The math (tokens/rlsd.py), against numbers worked out by hand.
# ---------------------------------------------------------------------------------------------------------------
def test_factor_and_advantages_by_hand():
    # λ = 0.5, ε = 0.2: factor = 0.5 + 0.5·clip(exp(sign(A)·δ), 0.8, 1.2)
    #   row 0, A = +1.5, δ = [0.1, −0.5, 0.3 | pad]:     w = [e^0.1, 0.8 (e^−0.5 clipped), 1.2 (e^0.3 clipped)]
    #   row 1, A = −2.0, δ = [0.1, −0.5, 0.05, 0.0]:     w = [e^−0.1, 1.2 (e^0.5 clipped), e^−0.05, 1]
    #   row 2, A = +0.5, δ = [2.0, −3.0 | pad, pad]:     w = [1.2, 0.8]
    # padded positions hold huge teacher values that must not count anywhere
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    student = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-3.0, -1.0, -2.0, -0.7], [-4.0, -0.5, -1.0, -1.0]])
    delta = torch.tensor([[0.1, -0.5, 0.3, 50.0], [0.1, -0.5, 0.05, 0.0], [2.0, -3.0, -80.0, 90.0]])
    teacher = student + delta
    advantages = torch.tensor([1.5, -2.0, 0.5])

    w = [[math.exp(0.1), 0.8, 1.2], [math.exp(-0.1), 1.2, math.exp(-0.05), 1.0], [1.2, 0.8]]
    factors = [[0.5 + 0.5 * value for value in row] for row in w]
    expected = torch.zeros(3, 4)
    for row, a in enumerate([1.5, -2.0, 0.5]):
        for t, f in enumerate(factors[row]):
            expected[row, t] = a * f
    got = rlsd_advantages(advantages, teacher, student, mask, lam=0.5, epsilon=0.2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # the same from [B, T] advantages
    torch.testing.assert_close(rlsd_advantages(advantages.unsqueeze(1).expand(3, 4), teacher, student, mask, 0.5, 0.2),
                               expected, atol=1e-6, rtol=0)

    credit = rlsd_factor(teacher, student, torch.sign(advantages).unsqueeze(1), mask, 0.5, 0.2)
    expected_factor = torch.ones(3, 4)
    for row, values in enumerate(factors):
        expected_factor[row, : len(values)] = torch.tensor(values)
    torch.testing.assert_close(credit.factor, expected_factor, atol=1e-6, rtol=0)  # 1 at the padding
    assert credit.clipped_low.sum() == 2 and credit.clipped_high.sum() == 3  # (0,1), (2,1); (0,2), (1,1), (2,0)
    assert credit.clipped_low[0, 1] and credit.clipped_low[2, 1] and credit.clipped_high[1, 1]
    torch.testing.assert_close(credit.delta, delta * mask)

    # λ = 0: GRPO's broadcast advantage; negative only: the positive rows keep it
    torch.testing.assert_close(rlsd_advantages(advantages, teacher, student, mask, 0.0, 0.2),
                               advantages.unsqueeze(1) * mask)
    negative = rlsd_advantages(advantages, teacher, student, mask, 0.5, 0.2, negative_only=True)
    torch.testing.assert_close(negative[1], expected[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(negative[[0, 2]], (advantages.unsqueeze(1) * mask)[[0, 2]])


def test_lambda_schedule():
    # the recipe: λ 0.5, no warm-up, linear decay to 0 over 60 steps, the step counted from 1
    assert rlsd_lambda(1, 0.5, 0, 60) == pytest.approx(0.5 * 59 / 60)
    assert rlsd_lambda(30, 0.5, 0, 60) == pytest.approx(0.25)
    assert rlsd_lambda(59, 0.5, 0, 60) == pytest.approx(0.5 / 60)
    assert rlsd_lambda(60, 0.5, 0, 60) == 0.0 and rlsd_lambda(61, 0.5, 0, 60) == 0.0
    assert rlsd_lambda(1000, 0.5, 0, 0) == 0.5  # no decay: constant
    # warm-up 10 then decay 60: 0 → 0.5 at step 10, 0.25 at step 40, 0 from step 70
    assert rlsd_lambda(5, 0.5, 10, 60) == pytest.approx(0.25)
    assert rlsd_lambda(10, 0.5, 10, 60) == pytest.approx(0.5)
    assert rlsd_lambda(40, 0.5, 10, 60) == pytest.approx(0.25)
    assert rlsd_lambda(70, 0.5, 10, 60) == 0.0
    assert rlsd_lambda(5, 0.5, 10, 0) == pytest.approx(0.25) and rlsd_lambda(50, 0.5, 10, 0) == 0.5
    # when the teacher need not run any more
    assert not rlsd_lambda_is_over(59, 0.5, 0, 60) and rlsd_lambda_is_over(60, 0.5, 0, 60)
    assert rlsd_lambda_is_over(1, 0.0, 0, 0) and not rlsd_lambda_is_over(1, 0.5, 0, 0)
    assert not rlsd_lambda_is_over(1, 0.5, 10, 1)  # warming up: λ > 0


def test_teacher_prompt_replaces_the_last_user_message():
    template = "{prompt}\nANSWER: {answer}"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    assert teacher_prompt(conversation, 4, template) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?\nANSWER: 4"}]
    assert conversation[1]["content"] == "2 + 2?"  # the row's prompt is left as it was
    assert teacher_prompt("2 + 2 =", "4", template) == "2 + 2 =\nANSWER: 4"
    with pytest.raises(ValueError, match="must be text"):
        teacher_prompt([{"role": "user", "content": [{"type": "image"}]}], "4", template)


# ---------------------------------------------------------------------------------------------------------------
# The signal in TokenGRPOTrainer, on the harness's hand-made generation batch (off-policy: old log-probs shifted).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher", ["frozen", "dynamic"])
def test_a_step_equals_trl_grpo_on_the_reweighted_advantages(model_dir, tmp_path, teacher):
    # the factor multiplies each token's loss: TRL's GRPO on A_t = A·factor_t gives the same loss and gradients; the
    # student's log-probs are the current policy's (frozen: the loss's own, per micro-batch) or the rollout's (dynamic:
    # TRL's old log-probs), the teacher's those of the columns added after generation
    trainer = rlsd_trainer(model_dir, tmp_path, rlsd_teacher=teacher)
    reference = make_trainer(model_dir, tmp_path, GRPOTrainer, GRPOConfig, loss_type="grpo")
    batch = make_batch(trainer)
    columns = rlsd_generation_columns(trainer, batch)
    current, _ = token_logps_and_entropies(trainer, batch)
    student = current if teacher == "frozen" else batch["old_per_token_logps"]
    delta = columns[TEACHER_LOGPS] - student
    positive = (batch["advantages"] > 0).unsqueeze(1)
    w = torch.where(positive, delta.exp(), (-delta).exp()).clamp(0.8, 1.2)
    lam = 0.5 * (1 - 1 / 60)  # the first step of the recipe's schedule
    mask = batch["completion_mask"]
    reweighted = batch["advantages"].unsqueeze(1) * ((1 - lam) + lam * w) * mask
    assert_same_update(loss_and_grads(trainer, [batch | columns]),
                       loss_and_grads(reference, [batch | {"advantages": reweighted}]), atol=1e-6)
    metrics = trainer._metrics["train"]
    assert metrics["rlsd/lambda"] == [pytest.approx(lam)]
    assert metrics["rlsd/clip_low_frac"][0] > 0 and metrics["rlsd/clip_high_frac"][0] > 0  # both clip ends acted
    assert metrics["rlsd/factor_mean"][0] == pytest.approx(((1 - lam + lam * w) * mask).sum().item() / mask.sum().item(),
                                                           abs=1e-6)
    assert metrics["rlsd/delta_mean"][0] == pytest.approx((delta * mask).sum().item() / mask.sum().item(), abs=1e-5)


def test_gradient_accumulation_gives_the_same_update(model_dir, tmp_path):
    # batch 8 × GA 1 and batch 4 × GA 2 on the same generation batch and teacher columns: the factor is each token's own
    # (the student's log-prob from each micro-batch's forward), so the loss and gradients are the same
    whole = rlsd_trainer(model_dir, tmp_path)
    accumulated = rlsd_trainer(model_dir, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    batch = make_batch(whole)
    full = batch | rlsd_generation_columns(whole, batch)
    expected = loss_and_grads(whole, [full])
    assert max(grad.abs().max() for grad in expected[1]) > 0
    assert_same_update(loss_and_grads(accumulated, split_tensor_dict(full, 2)), expected, atol=1e-6)


def test_at_lambda_zero_a_step_equals_trl_grpo(model_dir, tmp_path):
    # the teacher ran (λ > 0 at generation) and its log-probs are far from the student's, but at the step λ has decayed
    # to 0 (step 60 of 60): every factor is 1 and the step is TRL's GRPO, loss and gradients within 1e-6
    trainer = rlsd_trainer(model_dir, tmp_path)
    reference = make_trainer(model_dir, tmp_path, GRPOTrainer, GRPOConfig, loss_type="grpo")
    batch = make_batch(trainer)
    columns = rlsd_generation_columns(trainer, batch)
    assert columns[TEACHER_LOGPS][batch["completion_mask"].bool()].abs().min() > 0  # the teacher's forward ran
    trainer.state.global_step = 59
    assert_same_update(loss_and_grads(trainer, [batch | columns]), loss_and_grads(reference, [batch]), atol=1e-6)
    assert trainer._metrics["train"]["rlsd/lambda"] == [0.0] and trainer._metrics["train"]["rlsd/factor_mean"] == [1.0]
    # and once λ is 0 for good, the teacher's forward is skipped
    skipped = rlsd_generation_columns(trainer, batch)
    assert not skipped[TEACHER_LOGPS].any()
    signs = torch.sign(batch["advantages"]).unsqueeze(1).expand_as(batch["completion_mask"])
    assert torch.equal(skipped[ADVANTAGE_SIGN], signs.float())


@pytest.mark.parametrize("teacher", ["frozen", "dynamic"])
def test_the_teacher_prompt_holds_the_answer_and_its_logps_align_with_the_completion(model_dir, tmp_path, teacher):
    # the teacher's log-prob of completion token t, from the batched, left-padded forward, equals a forward of the
    # model over that row's own teacher prompt + completion (no padding) read at position P + t − 1
    trainer = rlsd_trainer(model_dir, tmp_path, perturb_teacher=False, rlsd_teacher=teacher)
    signal, tokenizer = trainer.signals["rlsd"], trainer.processing_class
    batch = make_batch(trainer)
    generation = Generation(trainer, batch, True, [], ROWS)
    teacher_batch = signal.teacher_batch(generation)
    assert teacher_batch["prompt_mask"][:, 0].tolist() != teacher_batch["prompt_mask"][:, -1].tolist()  # left pad
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # the teacher: the initial weights, as the policy's
    logps = signal.teacher_logps(generation)
    for i, row in enumerate(ROWS):
        prompt_ids = teacher_batch["prompt_ids"][i][teacher_batch["prompt_mask"][i].bool()]
        text = tokenizer.decode(prompt_ids)
        assert f"Here is a reference solution:\n{row['answer']}" in text and row["question"] in text
        messages = teacher_prompt(row["prompt"], row["answer"], trainer.args.rlsd_teacher_template)
        expected_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert prompt_ids.tolist() == list(expected_ids)  # tokenised as TRL tokenises the student's prompt
        length = int(batch["completion_mask"][i].sum())
        completion = batch["completion_ids"][i, :length]
        with torch.no_grad():
            logits = model(torch.cat([prompt_ids, completion]).unsqueeze(0)).logits[0]
        start = len(prompt_ids) - 1
        by_hand = torch.log_softmax(logits[start:start + length], -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logps[i, :length], by_hand, atol=1e-5, rtol=0)
    # the teacher's prompt is not the student's: the same completions score differently
    student, _ = token_logps_and_entropies(trainer, batch)
    assert not torch.allclose(logps * batch["completion_mask"], student * batch["completion_mask"], atol=1e-4)


def test_the_random_control_permutes_each_completions_factors(model_dir, tmp_path):
    # the dynamic teacher against the rollout's log-probs (the harness's old log-probs, shifted by N(0, 0.3²)): factors
    # that vary from token to token
    trainer = rlsd_trainer(model_dir, tmp_path, rlsd_teacher="dynamic", signal_control="shuffle")
    batch = make_batch(trainer)
    batch = batch | rlsd_generation_columns(trainer, batch) | {ROW_KEYS: trainer.generation_row_keys(8)}
    logps, entropies = token_logps_and_entropies(trainer, batch)
    mask = batch["completion_mask"]

    def token_batch():
        return trainer._token_batch(batch, logps, batch["old_per_token_logps"], entropies, mask, True)

    factors = trainer.signals["rlsd"].token_inputs(token_batch())["token_weights"]
    shuffled, _ = trainer.signal_token_inputs(token_batch())  # the host's control on the signal's weights
    again, _ = trainer.signal_token_inputs(token_batch())
    torch.testing.assert_close(shuffled, again, atol=0, rtol=0)  # seeded by the row's identity
    moved = 0
    for row in range(8):
        valid = mask[row].bool()
        torch.testing.assert_close(torch.sort(shuffled[row][valid]).values, torch.sort(factors[row][valid]).values,
                                   atol=0, rtol=0)  # the same multiset on the same tokens
        assert (shuffled[row][~valid] == 0).all()
        moved += int(not torch.equal(shuffled[row][valid], factors[row][valid]))
    assert moved >= 4  # rows of several distinct factors end up elsewhere
    trainer.args.signal_control_seed = 1234
    assert not torch.equal(trainer.signal_token_inputs(token_batch())[0], shuffled)  # another seed, other places


def test_the_frozen_teacher_takes_the_policys_weights_every_sync_steps(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo", token_signals=["rlsd"], rlsd_teacher_sync_steps=2,
                           max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
    assert trainer.args.history_sync_steps == 2
    history = trainer.frozen_models.loaded["history"]
    initial = {name: param.detach().clone() for name, param in history.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    assert any(not torch.equal(param, initial[name]) for name, param in history.named_parameters())
    for name, param in history.named_parameters():
        torch.testing.assert_close(param, policy[name], atol=0, rtol=0)  # synced after step 2
    logged = [entry for entry in trainer.state.log_history if "rlsd/lambda" in entry]
    assert [entry["rlsd/lambda"] for entry in logged] == pytest.approx([0.5 * 59 / 60, 0.5 * 58 / 60])


# ---------------------------------------------------------------------------------------------------------------
# Refused configs: one problem, one line, before any model loads, no output directory left behind.
# ---------------------------------------------------------------------------------------------------------------
REFUSED = [
    ("no-policy-loss", {"policy_loss": None, "dual_clip_c": None}, r"token_signals \['rlsd'\] weigh the per-token loss"),
    ("lambda", {"rlsd_lambda": 1.5}, r"rlsd_lambda must be in \[0, 1\]"),
    ("epsilon", {"rlsd_epsilon": 1.0}, r"rlsd_epsilon must be in \[0, 1\)"),
    ("decay", {"rlsd_lambda_decay_steps": -1}, "rlsd_lambda_decay_steps must be >= 0"),
    ("teacher", {"rlsd_teacher": "ema"}, "rlsd_teacher must be one of"),
    ("dynamic-sync", {"rlsd_teacher": "dynamic", "rlsd_teacher_sync_steps": 5}, "nothing to sync"),
    ("history-sync", {"history_sync_steps": 5}, r"history_sync_steps \(5\) conflicts with rlsd_teacher_sync_steps"),
    ("template-no-answer", {"rlsd_teacher_template": "{prompt}"}, "must contain {answer}"),
    ("template-field", {"rlsd_teacher_template": "{prompt} {answer} {solution}"}, r"names \['solution'\]"),
    ("template-brace", {"rlsd_teacher_template": "{prompt} {answer"}, "not a format string"),
    ("answer-column", {"rlsd_answer_column": "final_answer"}, "column 'final_answer'"),
]


@pytest.mark.parametrize("case, values, message", REFUSED, ids=[case[0] for case in REFUSED])
def test_a_bad_rlsd_config_is_refused_before_any_model_loads(tmp_path, monkeypatch, tiny_model_cache, case, values,
                                                               message):
    from tokenweave.train import train

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    config = yaml.safe_load((CONFIGS / "rlsd_tiny.yaml").read_text())
    output_dir = tmp_path / "out"
    config = {key: value for key, value in config.items() if not (key in values and values[key] is None)}
    config |= {"output_dir": str(output_dir)} | {key: value for key, value in values.items() if value is not None}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message) as error:
        train(["--config", str(path)])
    lines = str(error.value).strip().splitlines()  # one line; a range or type: under checks.py's one header
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("Invalid TokenGRPOConfig option"))
    assert not output_dir.exists()
