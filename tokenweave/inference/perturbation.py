"""Perturbation tests of a token signal: does changing the token a signal points at change the final answer?

A signal that claims some tokens decide the outcome (HAPO's high-entropy "forking" tokens, attention credit's
anchors) can be tested without training: take the model's own greedy trajectory, replace one token by the
**second-ranked** token of the distribution that chose it, continue greedily, and see whether the final answer
changes. The same test at random tokens of the same trajectory is the control (``tokenweave evidence``).

Greedy trajectories make the test nearly exact: the unperturbed continuation of a greedy trajectory is the trajectory
itself (up to near-ties that the padding of another batch can flip), so a change of the answer is caused by the one
replaced token; and since the trajectory's own token is the
top-ranked one, "forbid the token and continue greedily" (cDPO's rollout test, attention credit's "forbid") and
"take the second-ranked token" (the forking-token test) are the same perturbation.

* :func:`greedy_trajectories`: each prompt's greedy completion with, at every completion position, the entropy of
  the model's distribution there (raw logits, temperature 1: the entropy HAPO's signal and TRL's entropy metrics are
  computed from) and the second-ranked token.
* :func:`replace_and_continue`: for each ``(trajectory, position)``, the answer after replacing that token by its
  second-ranked token and continuing greedily within the trajectory's token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..rewards.math import extract_answer
from .generation import chat_prompt_ids

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@dataclass
class GreedyTrajectory:
    """One prompt's greedy completion: ``completion_ids`` up to and including the first EOS; per completion
    position, the ``entropy`` of the distribution that chose it and the ``second_ids`` (its second-ranked token);
    the decoded ``text`` (special tokens stripped) and its final ``answer``
    (:func:`tokenweave.rewards.math.extract_answer`)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    entropy: list[float]
    second_ids: list[int]
    text: str
    answer: str | None

    def candidates(self, eos_token_id: int) -> int:
        """How many leading completion tokens a test may perturb: every token but a final EOS."""
        ends = bool(self.completion_ids) and self.completion_ids[-1] == eos_token_id
        return len(self.completion_ids) - ends


def _until_eos(ids: list[int], eos_token_id: int) -> list[int]:
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


def _left_padded(tokenizer, sequences: list[list[int]], device) -> dict:
    if tokenizer.padding_side != "left":
        raise ValueError("Batched generation needs a tokenizer with padding_side='left'.")
    return tokenizer.pad({"input_ids": sequences}, return_tensors="pt").to(device)


@torch.no_grad()
def greedy_trajectories(
    model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 64, batch_size: int = 32,
    desc: str = "greedy trajectories",
) -> list[GreedyTrajectory]:
    """The greedy completion of each chat prompt, with each position's entropy and second-ranked token (module
    docstring), in the prompts' order."""
    device = next(model.parameters()).device
    encoded = chat_prompt_ids(tokenizer, prompts)
    trajectories = []
    for begin in tqdm(range(0, len(encoded), batch_size), desc=desc, unit="batch"):
        rows = encoded[begin: begin + batch_size]
        batch = _left_padded(tokenizer, rows, device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                output_logits=True, return_dict_in_generate=True, **GREEDY)
        logits = torch.stack(output.logits, dim=1).float()  # [B, steps, V]: the raw logits of every step
        log_probs = logits.log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        second = logits.topk(2, dim=-1).indices[..., 1]
        width = batch["input_ids"].size(1)
        for index, prompt_ids in enumerate(rows):
            ids = _until_eos(output.sequences[index, width:].tolist(), tokenizer.eos_token_id)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            trajectories.append(GreedyTrajectory(
                prompt_ids=prompt_ids, completion_ids=ids, entropy=entropy[index, : len(ids)].tolist(),
                second_ids=second[index, : len(ids)].tolist(), text=text, answer=extract_answer(text),
            ))
    return trajectories


@torch.no_grad()
def replace_and_continue(
    model, tokenizer, trajectories: Sequence[GreedyTrajectory], perturbations: Sequence[tuple[int, int]], *,
    max_new_tokens: int = 64, batch_size: int = 32, desc: str = "perturbations",
) -> list[str | None]:
    """For each ``(trajectory index, position)``: the final answer of that trajectory with the token at ``position``
    replaced by its second-ranked token and the rest generated greedily, the whole completion within
    ``max_new_tokens`` tokens (the trajectories' budget)."""
    device = next(model.parameters()).device
    answers = []
    with tqdm(total=len(perturbations), desc=desc, unit="continuation") as progress:
        for begin in range(0, len(perturbations), batch_size):
            chunk = perturbations[begin: begin + batch_size]
            heads = []
            for row, position in chunk:
                trajectory = trajectories[row]
                if not 0 <= position < len(trajectory.completion_ids):
                    raise IndexError(f"Trajectory {row} has no completion position {position}.")
                heads.append(trajectory.completion_ids[:position] + [trajectory.second_ids[position]])
            budgets = [max_new_tokens - len(head) for head in heads]
            batch = _left_padded(tokenizer, [trajectories[row].prompt_ids + head
                                             for (row, _), head in zip(chunk, heads, strict=True)], device)
            width = batch["input_ids"].size(1)
            sequences = batch["input_ids"]
            if max(budgets) > 0:
                sequences = model.generate(**batch, max_new_tokens=max(budgets), pad_token_id=tokenizer.pad_token_id,
                                           **GREEDY)
            for head, budget, continuation in zip(heads, budgets, sequences[:, width:].tolist(), strict=True):
                # the continuation follows within the budget, cut at the first EOS (the replacement itself, if EOS)
                ids = _until_eos(head + continuation[: max(budget, 0)], tokenizer.eos_token_id)
                answers.append(extract_answer(tokenizer.decode(ids, skip_special_tokens=True)))
            progress.update(len(chunk))
    return answers
