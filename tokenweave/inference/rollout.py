"""The rollout test of critical tokens (cDPO, "Critical Tokens Matter", arXiv 2411.19943, section 2).

cDPO's own evidence that a token is critical: resample the trajectory from just before it with that token
forbidden, and see how often the continuations become correct. A critical token (one that decides the wrong
answer) should leave many continuations correct once it is avoided; an ordinary token should not. The control is the
same test at a random position of the same trajectory.

* :class:`ForbidFirstToken`: a logits processor that sets one token per row to ``-inf`` at the first generated
  position only (its probability there is zero; later positions are untouched).
* :func:`rollout_continuations`: for each prefix, ``num_rollouts`` sampled continuations with that prefix's token
  forbidden, batched (left padding, each prefix read once: :func:`.generation.generate_with_shared_prefix`), each
  completed text labelled by the answer reward; :func:`rollout_correct_share`: the share correct per prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

from ..rewards.math import is_correct
from .generation import GenerationProgress, generate_with_shared_prefix


class ForbidFirstToken(LogitsProcessor):
    """Forbid token ``forbidden_ids[i]`` in row ``i`` at the first generated position (logit ``-inf``).

    ``prompt_length`` is the padded prompt width: the step whose ``input_ids`` have that many columns is the first
    one. ``forbidden_ids`` (``[B]`` long) is on the scores' device.
    """

    def __init__(self, forbidden_ids: Tensor, prompt_length: int):
        self.forbidden_ids = forbidden_ids
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[1] != self.prompt_length:
            return scores
        scores = scores.clone()
        scores[torch.arange(scores.shape[0], device=scores.device), self.forbidden_ids] = float("-inf")
        return scores


@torch.no_grad()
def rollout_continuations(
    model,
    tokenizer,
    prefixes: Sequence[Sequence[int]],
    forbidden_ids: Sequence[int],
    completion_starts: Sequence[int],
    answers: Sequence[str],
    *,
    num_rollouts: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    seed: int = 0,
    desc: str = "rollouts",
) -> list[list[tuple[list[int], bool]]]:
    """For each prefix, ``num_rollouts`` continuations sampled with its token forbidden at the first position, each
    ``(new token ids, correct)``.

    ``prefixes[i]`` are token ids (prompt, then the trajectory up to the tested token); ``forbidden_ids[i]`` is the
    tested token; the completion text is ``prefixes[i][completion_starts[i]:]`` plus the continuation, decoded
    without special tokens, and is correct when its answer equals ``answers[i]``
    (:func:`tokenweave.rewards.math.is_correct`). Sampling is at ``temperature`` with top-p 1 and no top-k, seeded.
    The new token ids stop after the first EOS. A bar ``desc`` over the generated tokens moves at every step
    (:class:`.generation.GenerationProgress`).
    """
    if not len(prefixes) == len(forbidden_ids) == len(completion_starts) == len(answers):
        raise ValueError("prefixes, forbidden_ids, completion_starts and answers must have the same length.")
    if num_rollouts < 1:
        raise ValueError(f"num_rollouts must be at least 1, got {num_rollouts}.")
    if tokenizer.padding_side != "left":
        raise ValueError("Batched rollouts need a tokenizer with padding_side='left'.")
    device = next(model.parameters()).device
    continuations: list[list[tuple[list[int], bool]]] = [[] for _ in prefixes]
    prefixes_per_batch = max(1, batch_size // num_rollouts)
    torch.manual_seed(seed)
    with GenerationProgress(len(prefixes) * num_rollouts, max_new_tokens, tokenizer.eos_token_id,
                            desc=desc) as progress:
        for begin in range(0, len(prefixes), prefixes_per_batch):
            rows = list(range(begin, min(begin + prefixes_per_batch, len(prefixes))))
            batch = tokenizer.pad({"input_ids": [list(prefixes[row]) for row in rows]}, return_tensors="pt").to(device)
            width = batch["input_ids"].shape[1]
            forbidden = torch.tensor([forbidden_ids[row] for row in rows], device=device)
            output = generate_with_shared_prefix(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                num_rollouts,
                progress=progress,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                logits_processor=LogitsProcessorList(
                    [ForbidFirstToken(forbidden.repeat_interleave(num_rollouts), width)]
                ),
                pad_token_id=tokenizer.pad_token_id,
            )
            for index, new_tokens in enumerate(output[:, width:].tolist()):
                row = rows[index // num_rollouts]
                if tokenizer.eos_token_id in new_tokens:
                    new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id) + 1]
                ids = list(prefixes[row][completion_starts[row] :]) + new_tokens
                continuations[row].append((new_tokens, is_correct(tokenizer.decode(ids, skip_special_tokens=True),
                                                                  answers[row])))
    return continuations


def rollout_correct_share(model, tokenizer, prefixes, forbidden_ids, completion_starts, answers, **kwargs) -> list[float]:
    """The share of correct continuations of each prefix with its token forbidden at the first position
    (:func:`rollout_continuations`, the same arguments)."""
    continuations = rollout_continuations(model, tokenizer, prefixes, forbidden_ids, completion_starts, answers,
                                          **kwargs)
    return [sum(correct for _, correct in row) / len(row) for row in continuations]
