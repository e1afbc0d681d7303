"""The reduced attention forward (models/attention.py) with attention credit's reduction (trainers/attention.py): the
same logits as the model's own attention, and the bands and row spans of eager attention's probabilities, kept for
the chosen layers only, on the tiny model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenweave.tokens.attention import attention_band, span_rows
from tokenweave.models.attention import reduced_attention
from tokenweave.trainers.attention import credit_reduction, middle_layers


def attention_bands(model, layers, width, chunk_size=128):
    """The reduced forward keeping attention credit's band and row span of each row."""
    return reduced_attention(model, layers, credit_reduction(width), chunk_size)


@pytest.fixture(scope="module")
def models(model_dir):
    eager = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    return eager, sdpa


def batch(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 90, (3, n), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding, as TRL's prompts
    mask[2, -5:] = 0  # right padding, as completions of unequal lengths
    return ids, mask


@pytest.mark.parametrize("chunk_size", [7, 128])
def test_bands_equal_eager_attention(models, chunk_size):
    eager, sdpa = models
    ids, mask = batch()
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask, output_attentions=True)
        plain = sdpa(ids, attention_mask=mask).logits
        with attention_bands(sdpa, layers=[1], width=12, chunk_size=chunk_size) as kept:
            logits = sdpa(ids, attention_mask=mask).logits
    assert sdpa.config._attn_implementation == "sdpa"  # restored
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], plain[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[valid], reference.logits[valid], atol=1e-5, rtol=0)
    band, span = kept.outputs[1]
    assert set(kept.outputs) == {1} and band.shape == (3, 4, 40, 12) and span.shape == (3, 4, 40)
    probs = reference.attentions[1].float()
    rows = valid.unsqueeze(1).unsqueeze(-1)  # compare the rows of real tokens (padding rows are masked later)
    torch.testing.assert_close(band * rows, attention_band(probs, 12) * rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(span * rows[..., 0], span_rows(probs) * rows[..., 0], atol=1e-5, rtol=0)


def test_middle_layers():
    assert middle_layers(30) == [10, 12, 15, 18, 20]
    assert middle_layers(24, 3) == [8, 12, 16]
    assert middle_layers(2, 1) == [0]


# ---------------------------------------------------------------------------------------------------------------
# The attention_credit token signal on a generated batch: γ recomputed from eager attention, and its control.
# ---------------------------------------------------------------------------------------------------------------
def test_attention_credit_multiplies_the_advantages(model_dir, tmp_path):
    from tokenweave.tokens.attention import credit_multipliers, fai, group_heads, head_spans, waad

    from .grpo_harness import make_trainer, train_dataset

    options = dict(token_signals=["attention_credit"], attention_credit_layers=[0, 1], attention_credit_window=4,
                   attention_credit_horizon=[2, 6], attention_credit_head_fraction=0.25, max_completion_length=12)
    trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo", **options)
    plain = make_trainer(model_dir, tmp_path, policy_loss="dapo", max_completion_length=12)
    dataset = train_dataset()
    rows = [dataset[0]] * 4 + [dataset[1]] * 4
    torch.manual_seed(0)
    output = trainer._generate_and_score_completions(rows)
    torch.manual_seed(0)
    reference = plain._generate_and_score_completions(rows)
    assert torch.equal(output["completion_ids"], reference["completion_ids"])
    # γ from eager attention's full maps of layers 0 and 1, as the signal computes it from the bands
    eager = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    with torch.no_grad():
        maps = torch.cat(eager(ids, attention_mask=mask, output_attentions=True).attentions[:2], 1).float()
    response = torch.cat([torch.zeros_like(output["prompt_mask"]), output["completion_mask"]], 1)
    local, glob = group_heads(head_spans(span_rows(maps), response), 0.25)
    band = attention_band(maps, 7)
    gamma = credit_multipliers("coupled", response, waad(band[:, local].mean(1), 4),
                               fai(band[:, glob].mean(1), response, (2, 6)))[:, output["prompt_ids"].size(1):]
    expected = reference["advantages"].unsqueeze(1) * gamma * output["completion_mask"]
    torch.testing.assert_close(output["advantages"], expected, atol=1e-5, rtol=0)
    assert (gamma != 1).any() and trainer._metrics["train"]["attention_credit/credited_frac"][-1] > 0

    # the control: the same γ values per completion, on other tokens
    control = make_trainer(model_dir, tmp_path, policy_loss="dapo", signal_control="shuffle", **options)
    torch.manual_seed(0)
    shuffled = control._generate_and_score_completions(rows)["advantages"]
    for row in range(8):
        valid = output["completion_mask"][row].bool()
        a, b = output["advantages"][row][valid], shuffled[row][valid]
        torch.testing.assert_close(torch.sort(a).values, torch.sort(b).values)
    assert not torch.allclose(output["advantages"], shuffled)


def test_the_banded_forward_never_holds_a_full_map(models, monkeypatch):
    # the probabilities exist only a chunk of query rows at a time (chunk · N per head), and what is kept is the band
    # (N · width per head): with N = 200, chunk 16, width 12 that is 16·200 and 200·12 entries, not 200·200
    _, sdpa = models
    sizes = []
    softmax = torch.softmax

    def recording_softmax(scores, *args, **kwargs):
        sizes.append(scores.shape)
        return softmax(scores, *args, **kwargs)

    ids = torch.randint(4, 90, (2, 200), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(torch, "softmax", recording_softmax)
    with torch.no_grad(), attention_bands(sdpa, layers=[0], width=12, chunk_size=16) as kept:
        sdpa(ids)
    monkeypatch.undo()
    assert sizes and all(shape[-2] <= 16 and shape[-1] == 200 for shape in sizes) and len(sizes) == 13  # ⌈200/16⌉
    assert kept.outputs[0][0].shape == (2, 4, 200, 12) and kept.outputs[0][1].shape == (2, 4, 200)


@pytest.mark.parametrize("policy_loss", ["grpo", "dapo", "cispo", "gspo", "hapo", "rank_grpo", None])
def test_credit_off_leaves_every_loss_unchanged(model_dir, tmp_path, policy_loss):
    # γ_amp = 1: every γ is 1, so the advantages, and the loss and gradients of every registered loss (and of TRL's
    # loss_type path) on them, are those without the component
    from .grpo_harness import (
        ATTENTION_CREDIT, assert_same_update, attention_credit_advantages, loss_and_grads, make_batch, make_trainer,
        with_generation_signals,
    )

    trainer = make_trainer(model_dir, tmp_path, policy_loss=policy_loss, attention_credit_amplification=1.0,
                           **ATTENTION_CREDIT)
    batch = with_generation_signals(trainer, make_batch(trainer))
    token_advantages = batch["advantages"].unsqueeze(1) * batch["completion_mask"]
    credited = attention_credit_advantages(trainer, batch)
    torch.testing.assert_close(credited, token_advantages)
    assert_same_update(loss_and_grads(trainer, [batch | {"advantages": credited}]), loss_and_grads(trainer, [batch]))


def test_bands_of_a_peft_model_are_those_of_its_adapted_attention(model_dir):
    # a LoRA-wrapped policy (TRL's PEFT path): the banded forward runs through the adapters (non-zero B here), so its
    # bands equal eager attention's of the adapted model, and differ from the base model's
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    policy = get_peft_model(base, lora).eval()
    ids, mask = batch()
    valid = mask.bool().unsqueeze(1).unsqueeze(-1)
    with torch.no_grad():
        reference = attention_band(policy(ids, attention_mask=mask, output_attentions=True).attentions[0].float(), 12)
        with attention_bands(policy, layers=[0], width=12) as adapted:
            policy(ids, attention_mask=mask)
        with policy.disable_adapter(), attention_bands(policy, layers=[0], width=12) as plain:
            policy(ids, attention_mask=mask)
    torch.testing.assert_close(adapted.outputs[0][0] * valid, reference * valid, atol=1e-6, rtol=0)
    assert (adapted.outputs[0][0] - plain.outputs[0][0]).abs().max() > 1e-3


@pytest.mark.parametrize("alignment", ["input", "prediction"])
def test_attention_credit_from_eager_maps_for_either_alignment(models, alignment):
    # attention_credit (the signal's computation) against γ / WAAD / FAI from eager attention's full maps, with the
    # response rows R and the slice that belong to the alignment: "input", row P + t for completion token t;
    # "prediction", row P + t − 1 (the row whose logits sampled token t)
    from tokenweave.tokens.attention import credit_multipliers, fai, group_heads, head_spans, waad
    from tokenweave.trainers.attention import AttentionCreditConfig, attention_credit

    eager, sdpa = models
    options = AttentionCreditConfig(attention_credit_window=4, attention_credit_horizon=[2, 6],
                                    attention_credit_head_fraction=0.25, attention_credit_alignment=alignment)
    ids, _ = batch(n=36, seed=3)
    prompt_length = 12
    prompt_mask = torch.ones(3, prompt_length, dtype=torch.long)
    prompt_mask[1, :5] = 0
    completion_mask = torch.ones(3, 36 - prompt_length, dtype=torch.long)
    completion_mask[2, -6:] = 0
    credit = attention_credit(sdpa, ids[:, :prompt_length], prompt_mask, ids[:, prompt_length:], completion_mask,
                              options, [0, 1], batch_size=2)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        maps = torch.cat(eager(ids, attention_mask=mask, output_attentions=True).attentions, 1).float()
    shift = 1 if alignment == "prediction" else 0
    rows = torch.zeros_like(mask)
    rows[:, prompt_length - shift : 36 - shift] = completion_mask
    local, glob = group_heads(head_spans(span_rows(maps), rows), 0.25)
    band = attention_band(maps, 7)
    waad_values, fai_values = waad(band[:, local].mean(1), 4), fai(band[:, glob].mean(1), rows, (2, 6))
    tokens = slice(prompt_length - shift, 36 - shift)
    gamma = credit_multipliers("coupled", rows, waad_values, fai_values)[:, tokens]
    torch.testing.assert_close(credit.gamma, gamma)
    torch.testing.assert_close(credit.waad, waad_values[:, tokens] * completion_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(credit.fai, fai_values[:, tokens] * completion_mask, atol=1e-6, rtol=0)
    assert (gamma[completion_mask.bool()] > 1).any() and (gamma[~completion_mask.bool()] == 1).all()
