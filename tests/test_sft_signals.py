"""The token-weighted SFT methods (dft, eaft, asft, profit, rho1, sstoken) against hand computations from the tiny
model's full logits and attention maps, and their neutral settings against TRL's SFTTrainer; the normalisers, the
``global_batch`` selection's invariance to how a step is split (one process; two processes: tests/distributed), and
the refusals."""

import math

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from tokenweave.checks import ConfigError
from tokenweave.models import build_tiny_llama

from .test_sft_trainer import TRL_SFT_METRICS, assert_same, collate, logged_metrics, loss_and_grads, make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A second tiny Llama (another seed): a reference whose log-probs differ from the policy's."""
    path = tmp_path_factory.mktemp("tiny-reference")
    model, tokenizer = build_tiny_llama(seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def full_forward(model, batch):
    """From the ordinary forward's ``[B, L, V]`` logits (what the signals never build): the logits of each label
    position ``[B, L-1, V]``, their log-softmax, the labels' log-probs ``[B, L-1]`` and the label mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_probs = logits.log_softmax(-1)
    logps = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return logits, log_probs, logps, mask


def hand_loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.item(), {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def ours(trainer, rows=range(6)):
    return loss_and_grads(trainer, [collate(trainer, rows)])


# ---------------------------------------------------------------------------------------------------------------
# Neutral settings: TRL's SFT (or TRL's DFT), loss, gradients and metrics, over a gradient-accumulation window.
# ---------------------------------------------------------------------------------------------------------------
NEUTRAL = [
    (["eaft"], dict(eaft_alpha=0.0), "nll"),
    (["profit"], dict(profit_threshold=0.0), "nll"),
    (["rho1"], dict(rho1_ratio=1.0, rho1_scope="global_batch"), "nll"),
    (["rho1"], dict(rho1_ratio=1.0, rho1_scope="micro_batch"), "nll"),
    (["rho1"], dict(rho1_ratio=1.0, rho1_scope="sequence"), "nll"),
    (["sstoken"], dict(sstoken_ratio=1.0), "nll"),
    (["dft"], {}, "dft"),
    (["asft"], dict(asft_alpha=0.0), "dft"),
    (["rho1", "eaft"], dict(rho1_ratio=0.5, signal_control="full"), "nll"),  # the full-token baseline control
]


@pytest.mark.parametrize("signals, options, trl_loss_type", NEUTRAL, ids=lambda value: str(value))
def test_a_neutral_setting_is_trl_sft(model_dir, reference_dir, tmp_path, signals, options, trl_loss_type):
    if "rho1" in signals:
        options = options | {"reference_model_path": reference_dir}
    trl = make_trainer(model_dir, tmp_path, SFTTrainer, SFTConfig, loss_type=trl_loss_type)
    trainer = make_trainer(model_dir, tmp_path, token_signals=signals, **options)
    rows = [range(3), range(3, 6)]
    trl_batches, batches = [collate(trl, r) for r in rows], [collate(trainer, r) for r in rows]
    window = sum((batch["labels"][:, 1:] != -100).sum() for batch in batches)
    assert_same(loss_and_grads(trainer, batches, window), loss_and_grads(trl, trl_batches, window))
    trl_metrics, metrics = logged_metrics(trl), logged_metrics(trainer)
    assert set(trl_metrics) == TRL_SFT_METRICS and set(metrics) >= TRL_SFT_METRICS
    assert {key: metrics[key] for key in TRL_SFT_METRICS} == pytest.approx(trl_metrics, rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Each method by hand, from the full logits.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entropy", ["top_k", "exact"])
def test_eaft_weighs_each_token_by_its_entropy(model_dir, tmp_path, entropy):
    """w = (H_top20 / 3)^α (the released formula; computed in chunks of 5 positions), or (H / ln V)^α."""
    trainer = make_trainer(model_dir, tmp_path, token_signals=["eaft"], eaft_alpha=0.7, eaft_chunk_size=5,
                           eaft_entropy=entropy)
    batch = collate(trainer, range(6))
    logits, log_probs, logps, mask = full_forward(trainer.model, batch)
    with torch.no_grad():
        if entropy == "top_k":
            top = logits.topk(20, dim=-1).values
            q = top.exp() / top.exp().sum(-1, keepdim=True)
            weights = (-(q * q.log()).sum(-1) / 3.0) ** 0.7
        else:
            weights = (-(log_probs.exp() * log_probs).sum(-1) / math.log(logits.size(-1))) ** 0.7
    assert 0 < weights[mask].min() and weights[mask].max() <= 1
    expected = hand_loss_and_grads(trainer.model, (weights * -logps).sum() / mask.sum())
    assert_same(ours(trainer), expected, atol=2e-6)


def test_asft_is_dft_plus_the_kl_to_the_reference(model_dir, reference_dir, tmp_path):
    """Σ sg(p)·ℓ / N + α Σ KL(π_ref ‖ π_θ) / N, the KL over the whole vocabulary (chunks of 7 positions)."""
    trainer = make_trainer(model_dir, tmp_path, token_signals=["asft"], asft_alpha=0.3, asft_chunk_size=7,
                           reference_model_path=reference_dir)
    batch = collate(trainer, range(6))
    logits, log_probs, logps, mask = full_forward(trainer.model, batch)
    reference = trainer.frozen_models.loaded["reference"]
    with torch.no_grad():
        ref_log_probs = full_forward(reference, batch)[1]
    kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1) * mask
    loss = (logps.detach().exp() * -logps).sum() / mask.sum() + 0.3 * kl.sum() / mask.sum()
    expected = hand_loss_and_grads(trainer.model, loss)
    assert_same(ours(trainer), expected, atol=2e-6)
    assert logged_metrics(trainer)["kl/mean"] == pytest.approx((kl.sum() / mask.sum()).item(), rel=1e-5)


@pytest.mark.parametrize("direction", ["higher", "lower"])
def test_profit_keeps_the_tokens_beyond_its_threshold_over_the_label_count(model_dir, tmp_path, direction):
    """Released: 1[p ≥ τ] (or 1[p ≤ τ]) · ℓ over N counted before the masking; recounted ('micro_batch'): over the
    kept tokens."""
    tau = 0.02
    for normalizer in ("num_items_in_batch", "micro_batch"):
        trainer = make_trainer(model_dir, tmp_path, token_signals=["profit"], profit_threshold=tau,
                               profit_direction=direction, token_weight_normalizer=normalizer)
        batch = collate(trainer, range(6))
        logps, mask = full_forward(trainer.model, batch)[2:]
        probs = logps.detach().exp()
        kept = ((probs >= tau) if direction == "higher" else (probs <= tau)) & mask
        assert 0 < kept.sum() < mask.sum()
        count = mask.sum() if normalizer == "num_items_in_batch" else kept.sum()
        expected = hand_loss_and_grads(trainer.model, (kept * -logps).sum() / count)
        assert_same(ours(trainer), expected)


def test_the_micro_batch_normalizer_averages_the_micro_batches(model_dir, tmp_path):
    """With gradient accumulation, 'micro_batch' is the mean over the window of each micro-batch's kept-token mean
    (not the window's kept-token mean: the split matters)."""
    trainer = make_trainer(model_dir, tmp_path, token_signals=["profit"], profit_threshold=0.02,
                           token_weight_normalizer="micro_batch", gradient_accumulation_steps=2)
    batches = [collate(trainer, rows) for rows in (range(3), range(3, 6))]
    trainer.current_gradient_accumulation_steps = 2
    losses = []
    for batch in batches:
        logps, mask = full_forward(trainer.model, batch)[2:]
        kept = (logps.detach().exp() >= 0.02) & mask
        assert 0 < kept.sum() < mask.sum()
        losses.append((kept * -logps).sum() / kept.sum() / 2)
    expected = hand_loss_and_grads(trainer.model, sum(losses))
    window = sum((batch["labels"][:, 1:] != -100).sum() for batch in batches)
    assert_same(loss_and_grads(trainer, batches, window), expected)


@pytest.mark.parametrize("scope", ["micro_batch", "sequence"])
def test_rho1_keeps_the_highest_excess_losses(model_dir, reference_dir, tmp_path, scope):
    """I[top 40 % of log π_ref − log π_θ] / 0.4 · ℓ / N: over the batch's tokens (⌈0.4·N⌉-th score and above), or
    the ⌈0.4·n⌉ highest of each sequence."""
    trainer = make_trainer(model_dir, tmp_path, token_signals=["rho1"], rho1_ratio=0.4, rho1_scope=scope,
                           reference_model_path=reference_dir)
    batch = collate(trainer, range(6))
    logps, mask = full_forward(trainer.model, batch)[2:]
    with torch.no_grad():
        ref_logps = full_forward(trainer.frozen_models.loaded["reference"], batch)[2]
    scores = (ref_logps - logps.detach())[mask]
    rows = mask.nonzero()[:, 0]
    kept = torch.zeros_like(scores, dtype=torch.bool)
    if scope == "micro_batch":
        kept = scores >= scores.sort(descending=True).values[math.ceil(0.4 * len(scores)) - 1]
    else:
        for row in rows.unique():
            mine = (rows == row).nonzero().squeeze(-1)
            kept[mine[scores[mine].sort(descending=True).indices[: math.ceil(0.4 * len(mine))]]] = True
    weights = torch.zeros_like(logps)
    weights[mask] = kept.float() / 0.4
    expected = hand_loss_and_grads(trainer.model, (weights * -logps).sum() / mask.sum())
    assert_same(ours(trainer), expected)


def eight_rows() -> Dataset:
    rows = []
    for a, b in [(12, 7), (3, 45), (100, 23), (8, 8), (61, 5), (2, 990), (31, 17), (404, 6)]:
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "completion": [{"role": "assistant", "content": f"{a} + {b} = {a + b}\nThe answer is {a + b}."}]})
    return Dataset.from_list(rows)


def trained_weights(model_dir, reference_dir, tmp_path, scope, batch_size, accumulation):
    trainer = make_trainer(model_dir, tmp_path / f"{scope}-{batch_size}", dataset=eight_rows(), token_signals=["rho1"],
                           rho1_ratio=0.5, rho1_scope=scope, reference_model_path=reference_dir, max_steps=1,
                           learning_rate=1.0, optim="sgd", per_device_train_batch_size=batch_size,
                           gradient_accumulation_steps=accumulation, lr_scheduler_type="constant")
    trainer.train()
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


def test_rho1_global_batch_selection_does_not_depend_on_the_split(model_dir, reference_dir, tmp_path):
    """One optimizer step of 8 rows as 8 × 1 and as 4 × GA 2 (SGD at learning rate 1: the weights move by the
    gradient): the same update with ``global_batch`` (the step's micro-batches are scored first), a different one
    with ``micro_batch`` (each half keeps its own top 50 %)."""
    whole = trained_weights(model_dir, reference_dir, tmp_path, "global_batch", 8, 1)
    split = trained_weights(model_dir, reference_dir, tmp_path, "global_batch", 4, 2)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-5, rtol=0, msg=name)
    split_locally = trained_weights(model_dir, reference_dir, tmp_path, "micro_batch", 4, 2)
    assert max((split_locally[name] - value).abs().max() for name, value in whole.items()) > 1e-4


def test_sstoken_combines_the_excess_loss_and_the_prompt_attention(model_dir, tmp_path):
    """score = γ·minmax(log π_θ − log π_his) + (1 − γ)·Σ_{s < prompt} mean_heads A[last layer]_{t, s}; the ⌈ρ·n⌉
    highest of each sequence kept, weight 1/ρ. The history is the initial weights; the policy is moved off them.
    With the attention-only warm-up, the attention alone ranks. With ``token_weight_normalizer: micro_batch``, the
    released code's mean over the micro-batch's kept tokens."""
    for warmup, gamma in ((0, 0.5), (5, 0.0)):
        trainer = make_trainer(model_dir, tmp_path, token_signals=["sstoken"], sstoken_ratio=0.5, sstoken_gamma=0.5,
                               sstoken_attention_only_steps=warmup)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.05)
        batch = collate(trainer, range(6))
        logps, mask = full_forward(trainer.model, batch)[2:]
        with torch.no_grad():
            his_logps = full_forward(trainer.frozen_models.loaded["history"], batch)[2]
            implementation = trainer.model.config._attn_implementation
            trainer.model.config._attn_implementation = "eager"
            attentions = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_attentions=True).attentions[-1]
            trainer.model.config._attn_implementation = implementation
        weights = torch.zeros_like(logps)
        for row in range(mask.size(0)):
            positions = mask[row].nonzero().squeeze(-1)
            prompt = int(positions[0]) + 1  # the first label token's position in the ids
            excess = (logps[row] - his_logps[row]).detach()[positions]
            normed = (excess - excess.min()) / (excess.max() - excess.min())
            attention = attentions[row, :, positions + 1, :prompt].sum(-1).mean(0)
            score = gamma * normed + (1 - gamma) * attention
            top = positions[score.sort(descending=True, stable=True).indices[: math.ceil(0.5 * len(positions))]]
            weights[row, top] = 1 / 0.5
        expected = hand_loss_and_grads(trainer.model, (weights * -logps).sum() / mask.sum())
        assert_same(ours(trainer), expected, atol=2e-6)
        trainer.args.token_weight_normalizer = "micro_batch"  # the released code: the mean over the kept tokens
        logps = full_forward(trainer.model, batch)[2]
        kept = (weights > 0).float()
        expected = hand_loss_and_grads(trainer.model, (kept * -logps).sum() / kept.sum())
        assert_same(ours(trainer), expected, atol=2e-6)


@pytest.mark.parametrize("layout", ["padding_free", "packing"])
def test_padding_free_and_packed_batches_give_the_padded_loss(model_dir, reference_dir, tmp_path, layout):
    """The six rows padded, padding-free (one row of the six, unpacked for the signals) or packed by TRL (``bfd``:
    here all six in one sequence, the signals seeing one row per example): the same selection and loss."""
    options = dict(token_signals=["rho1", "eaft"], rho1_ratio=0.5, rho1_scope="sequence",
                   reference_model_path=reference_dir)
    padded = ours(make_trainer(model_dir, tmp_path, max_length=1024, **options))
    layout_options = dict(padding_free=True, max_length=None) if layout == "padding_free" else dict(packing=True)
    trainer = make_trainer(model_dir, tmp_path, **layout_options, **options)
    rows = range(len(trainer.train_dataset))
    assert len(rows) == (6 if layout == "padding_free" else 1)
    assert_same(ours(trainer, rows), padded, atol=2e-6)


@pytest.mark.parametrize("options, message", [
    (dict(token_signals=["rho1"]), "reference"),
    (dict(token_signals=["dft"], loss_type="dft"), "twice"),
    (dict(token_signals=["asft"], loss_type="dft"), "twice"),
    (dict(token_signals=["sstoken"], padding_free=True), "padding_free"),
    (dict(token_signals=["rho1"], rho1_ratio=0.0, reference_model_path="x"), "rho1_ratio"),
    (dict(token_signals=["profit"], profit_threshold=1.5), "profit_threshold"),
])
def test_bad_options_are_refused_when_the_config_is_made(tmp_path, options, message):
    from tokenweave.trainers import TokenSFTConfig

    with pytest.raises(ConfigError, match=message):
        TokenSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **options)
