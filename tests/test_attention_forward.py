"""The banded attention forward (trainers/attention.py): the same logits as the model's own attention, and the bands
and row spans of eager attention's probabilities, kept for the chosen layers only, on the tiny model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenweave.tokens.attention import attention_band, span_rows
from tokenweave.trainers.attention import attention_bands, middle_layers


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
        with attention_bands(sdpa, layers=[1], width=12, chunk_size=chunk_size) as bands:
            logits = sdpa(ids, attention_mask=mask).logits
    assert sdpa.config._attn_implementation == "sdpa"  # restored
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], plain[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[valid], reference.logits[valid], atol=1e-5, rtol=0)
    assert set(bands.band) == {1} and bands.band[1].shape == (3, 4, 40, 12) and bands.span[1].shape == (3, 4, 40)
    probs = reference.attentions[1].float()
    rows = valid.unsqueeze(1).unsqueeze(-1)  # compare the rows of real tokens (padding rows are masked later)
    torch.testing.assert_close(bands.band[1] * rows, attention_band(probs, 12) * rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(bands.span[1] * rows[..., 0], span_rows(probs) * rows[..., 0], atol=1e-5, rtol=0)


def test_middle_layers():
    assert middle_layers(30) == [10, 12, 15, 18, 20]
    assert middle_layers(24, 3) == [8, 12, 16]
    assert middle_layers(2, 1) == [0]
