"""Critical-token scores of cDPO (arXiv 2411.19943) on the tiny model: the formula, chunking, tokenisation, datasets."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from trl import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

from tokenweave.data.token_columns import tokenize_like_dpo
from tokenweave.inference.scoring import ScoringModel, load_contrastive_models, score_dataset
from tokenweave.models import CHATML_TEMPLATE, build_tiny_tokenizer, resolve_model
from tokenweave.tokens.critical import chunked_contrastive_scores, contrastive_log_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conversation(question, chosen, rejected):
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


PAIRS = [
    conversation("What is 2 + 3?", "2 + 3 = 5\nThe answer is 5.", "2 + 3 = 6\nThe answer is 6."),
    conversation("What is 10 - 4?", "10 - 4 = 6\nThe answer is 6.", "The answer is 5."),
    conversation("Add 7 and 8.", "<think>7 + 8 = 15</think>\nThe answer is 15.", "7 + 8 = 14"),
]


def trl_tokenize(dataset, tokenizer):
    """TRL's own tokenisation of a preference dataset: DPOTrainer._prepare_dataset, which reads nothing else
    from the trainer for conversational data."""
    args = DPOConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none")
    return DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "test")


# -- the score ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1.0, 0.5, 2.0])
def test_score_equals_the_normalised_probability_ratio_over_the_vocabulary(b):
    generator = torch.Generator().manual_seed(0)
    pos_logits, neg_logits = torch.randn(2, 3, 5, 11, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    # s_t = p_pos(y)^(1+b) p_neg(y)^(-b) / Σ_v p_pos(v)^(1+b) p_neg(v)^(-b), in probabilities, float64.
    ratio = pos_logits.softmax(-1) ** (1 + b) * neg_logits.softmax(-1) ** (-b)
    expected = (ratio / ratio.sum(-1, keepdim=True)).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    scores = contrastive_log_scores(pos_logits.float(), neg_logits.float(), targets, b=b).exp()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)


def test_score_by_hand():
    # b = 1: 2·[ln 2, 0] − [0, 0] = [ln 4, 0] -> softmax [4/5, 1/5].
    pos_logits, neg_logits = torch.tensor([math.log(2), 0.0]), torch.zeros(2)
    scores = contrastive_log_scores(pos_logits, neg_logits, torch.tensor(0)).exp()
    assert scores.item() == pytest.approx(0.8)
    # b = 0: the positive model's own probability.
    assert contrastive_log_scores(pos_logits, neg_logits, torch.tensor(1), b=0.0).exp().item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_scores_equal_unchunked_scores(chunk_size):
    torch.manual_seed(0)
    pos_hidden, neg_hidden = torch.randn(2, 3, 7, 16)
    pos_head, neg_head = torch.nn.Linear(16, 50), torch.nn.Linear(16, 50)
    targets = torch.randint(0, 50, (3, 7))
    mask = torch.rand(3, 7) > 0.3
    with torch.no_grad():
        chunked = chunked_contrastive_scores(
            pos_hidden, neg_hidden, pos_head, neg_head, targets, mask, b=0.7, chunk_size=chunk_size
        )
        full = contrastive_log_scores(pos_head(pos_hidden), neg_head(neg_hidden), targets, b=0.7).exp()
    torch.testing.assert_close(chunked[mask], full[mask], rtol=0, atol=1e-6)
    assert (chunked[~mask] == 0).all()


# -- tokenisation and scoring of a dataset ----------------------------------------------------------------


@pytest.mark.parametrize("thinking_prompt", [False, True])
def test_tokenization_equals_trl_dpo_tokenization(thinking_prompt):
    tokenizer = build_tiny_tokenizer()
    if thinking_prompt:  # the generation prompt is rendered differently from the same turn in a conversation
        tokenizer.chat_template = CHATML_TEMPLATE.replace("assistant\n' }}", "assistant\n<think>' }}")
        assert tokenizer.chat_template != CHATML_TEMPLATE
    dataset = Dataset.from_list(PAIRS)
    expected = trl_tokenize(dataset, tokenizer)
    for example, trl_example in zip(dataset, expected, strict=True):
        ours = tokenize_like_dpo(example, tokenizer)
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[key] == trl_example[key], key
    if thinking_prompt:
        # The third chosen starts with "<think>" like the generation prompt, its rejected does not: the
        # completion starts after the shorter common prefix, for both.
        assert tokenizer.decode(expected[2]["chosen_ids"]).startswith("<think>7 + 8")


def test_dataset_scores_align_with_trl_completion_tokens_and_equal_full_logit_scores(tiny_pair):
    positive, negative, tokenizer = tiny_pair
    dataset = Dataset.from_list(PAIRS)
    scored = score_dataset(dataset, positive, negative, tokenizer, batch_size=4, chunk_size=7)
    tokenized = trl_tokenize(dataset, tokenizer)
    for row, trl_row in zip(scored, tokenized, strict=True):
        for side in ("chosen", "rejected"):
            completion_ids = trl_row[f"{side}_ids"]
            scores = row[f"{side}_scores"]
            assert len(scores) == len(completion_ids) == len(row[f"{side}_tokens"])
            assert all(0 < score <= 1 for score in scores)
            assert "".join(row[f"{side}_tokens"]) == tokenizer.decode(completion_ids)
            # Independently: each sequence alone, full logits; token j is predicted at position j - 1.
            ids = torch.tensor([trl_row["prompt_ids"] + completion_ids])
            with torch.no_grad():
                combined = 2 * positive.model(ids).logits[0] - negative.model(ids).logits[0]
            start = len(trl_row["prompt_ids"])
            expected = combined.log_softmax(-1)[start - 1 : -1].gather(-1, ids[0, start:, None]).squeeze(-1).exp()
            torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-5, atol=1e-7)


def test_prompt_completion_rows_are_scored_too(tiny_pair):
    positive, negative, tokenizer = tiny_pair
    rows = Dataset.from_list([{"prompt": row["prompt"], "completion": row["chosen"]} for row in PAIRS])
    scored = score_dataset(rows, positive, negative, tokenizer, completion_columns=("completion",))
    assert {"completion_scores", "completion_tokens"} <= set(scored.column_names)
    assert [len(scores) for scores in scored["completion_scores"]] == [
        len(tokenize_like_dpo(row, tokenizer, ("completion",))["completion_ids"]) for row in rows
    ]


def test_two_adapters_of_one_base_are_loaded_once_and_score_like_two_models(tmp_path):
    base_path = resolve_model("tiny-llama")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    for seed, name in ((1, "positive"), (2, "negative")):
        torch.manual_seed(seed)
        get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), lora).save_pretrained(tmp_path / name)
    positive, negative, tokenizer = load_contrastive_models(str(tmp_path / "positive"), str(tmp_path / "negative"))
    assert positive.model is negative.model and (positive.adapter, negative.adapter) == ("positive", "negative")
    separate = [
        ScoringModel(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), tmp_path / name).eval())
        for name in ("positive", "negative")
    ]
    dataset = Dataset.from_list(PAIRS[:2])
    shared_scores = score_dataset(dataset, positive, negative, tokenizer)["rejected_scores"]
    separate_scores = score_dataset(dataset, *separate, tokenizer)["rejected_scores"]
    for shared, alone in zip(shared_scores, separate_scores, strict=True):
        torch.testing.assert_close(torch.tensor(shared), torch.tensor(alone), rtol=0, atol=1e-6)
    # The adapters matter: the positive model is not the negative one.
    assert not torch.allclose(
        torch.tensor(shared_scores[0]),
        torch.tensor(score_dataset(dataset, positive, positive, tokenizer)["rejected_scores"][0]),
    )
