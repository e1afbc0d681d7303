"""Attention credit on sampled completions, for ``tokenweave attention-heatmap``: what γ, WAAD and FAI the
``attention_credit`` token signal would give the completions a model samples now.

:func:`sample_credit_trajectories` samples completions of a task's questions (as TRL's GRPO generation does: the chat
template, sampling at ``temperature``, each completion up to and including its first EOS), then computes
:func:`tokenweave.trainers.attention.attention_credit` over the whole sampled batch, the head groups of that batch,
with the ``attention_credit_*`` options of a run config. ``attention_credit_layers`` is checked against the model's
layers before sampling, and completions too short for FAI's horizon are warned about
(:func:`tokenweave.trainers.attention.short_for_horizon`). Rendered by :mod:`tokenweave.heatmap`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..checks import check_values
from ..data.loading import last_user_message, load_run_dataset
from ..data.token_columns import token_texts
from ..trainers.attention import AttentionCreditConfig, attention_credit, credit_layers, short_for_horizon
from .evaluate import answer_verdict
from .generation import generate_with_shared_prefix
from .loading import load_model_and_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreditTrajectory:
    """One sampled completion with its tokens' attention credit: γ (the advantage multiplier), WAAD (how far back
    the local heads look from the token) and FAI (how much the global heads attend to it later); ``label`` what the
    completion is (e.g. "correct: 12")."""

    question: str
    tokens: list[str]
    gamma: list[float]
    waad: list[float]
    fai: list[float]
    label: str = ""

    def summary(self) -> str:
        """One line: the label, the credited share and mean γ, the top FAI tokens and the largest WAAD jump."""
        n = len(self.tokens)
        parts = [self.label] if self.label else []
        if n:
            credited = sum(gamma != 1.0 for gamma in self.gamma)
            parts.append(f"{credited} of {n} tokens credited, mean γ {sum(self.gamma) / n:.3f}")
            anchors = sorted(range(n), key=lambda index: -self.fai[index])[:3]
            parts.append("top FAI " + ", ".join(f"{self.tokens[index]!r} ({self.fai[index]:.3f})" for index in anchors))
            if n > 1:
                jump = max(range(n - 1), key=lambda index: abs(self.waad[index] - self.waad[index + 1]))
                parts.append(f"largest WAAD jump after {self.tokens[jump]!r}")
        return "; ".join(parts)


def _completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including each row's first EOS (every token where there is none), as TRL masks completions."""
    is_eos = completion_ids == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.size(1))
    return (torch.arange(completion_ids.size(1)) <= first.unsqueeze(1)).long()


def sample_credit_trajectories(
    model: str,
    *,
    adapter: str | None = None,
    options: AttentionCreditConfig | None = None,
    task: str = "arithmetic",
    split: str = "test",
    num_examples: int = 4,
    difficulty: str = "easy",
    task_seed: int = 0,
    num_samples_per_prompt: int = 2,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
) -> list[CreditTrajectory]:
    """Sample ``num_samples_per_prompt`` completions of the first ``num_examples`` questions and credit their tokens
    (module docstring) with the ``attention_credit_*`` ``options`` (None: the paper's defaults)."""
    check_values("tokenweave attention-heatmap", num_examples=num_examples, num_samples_per_prompt=num_samples_per_prompt,
                 temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)
    options = options or AttentionCreditConfig()
    dataset = load_run_dataset(task, split, "grpo", num_examples=num_examples, difficulty=difficulty, seed=task_seed)
    loaded_model, tokenizer = load_model_and_tokenizer(model, adapter=adapter)
    loaded_model.eval()
    layers = credit_layers(options.attention_credit_layers, loaded_model.config.num_hidden_layers)
    prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
               for row in dataset]
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    completions = []
    prompts_per_batch = max(1, batch_size // num_samples_per_prompt)
    for start in tqdm(range(0, len(prompts), prompts_per_batch), desc="sampling", unit="batch"):
        rows = slice(start, start + prompts_per_batch)
        output = generate_with_shared_prefix(
            loaded_model, encoded["input_ids"][rows], encoded["attention_mask"][rows], num_samples_per_prompt,
            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions.extend(output[:, encoded["input_ids"].size(1):])
    completion_ids = torch.nn.utils.rnn.pad_sequence(completions, batch_first=True,
                                                     padding_value=tokenizer.pad_token_id)
    completion_mask = _completion_mask(completion_ids, tokenizer.eos_token_id)
    warning = short_for_horizon(completion_mask, options)
    if warning is not None:
        logger.warning(warning)
    prompt_ids = encoded["input_ids"].repeat_interleave(num_samples_per_prompt, 0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(num_samples_per_prompt, 0)
    credit = attention_credit(loaded_model, prompt_ids, prompt_mask, completion_ids * completion_mask,
                              completion_mask, options, layers, batch_size=batch_size)
    trajectories = []
    for index in range(completion_ids.size(0)):
        row = dataset[index // num_samples_per_prompt]
        length = int(completion_mask[index].sum())
        ids = completion_ids[index, :length].tolist()
        label = ""
        if row.get("answer") is not None:  # correct only with the task's answer line, never from a fallback parse
            label = answer_verdict(tokenizer.decode(ids, skip_special_tokens=True), row["answer"])
        trajectories.append(CreditTrajectory(
            question=last_user_message(row["prompt"]), tokens=token_texts(tokenizer, ids),
            gamma=credit.gamma[index, :length].tolist(), waad=credit.waad[index, :length].tolist(),
            fai=credit.fai[index, :length].tolist(), label=label,
        ))
    return trajectories
