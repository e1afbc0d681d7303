"""Ground truth and perturbation for the GRPO signals that read the policy itself: attention credit and HAPO's entropy.

On the greedy trajectories of a seed's arithmetic questions (:func:`tokenweave.inference.perturbation.greedy_trajectories`),
three measurements, each unit one trajectory (five rows: the attention rows also against position-matched controls):

* **attention credit, perturbation** (the paper's Table 1, with the final answer in place of continuation overlap):
  of the ``top_k`` tokens with the highest FAI (the global anchors), the share whose replacement by the second-ranked
  token changes the final answer (:func:`tokenweave.inference.perturbation.replace_and_continue`), against the same
  share at ``top_k`` random tokens of the same trajectory;
* **HAPO's entropy, forking tokens** (Wang et al. 2025's forking tokens, the high end of HAPO's signal ĥ, which is
  monotone in the entropy): the same test at the ``top_k`` highest-entropy tokens, against the same random tokens;
* **attention credit, calculation tokens**: the share of the credited tokens (γ > 1) that are calculation tokens
  (inside a step line's ``L op R = C``: :func:`tokenweave.data.arithmetic_errors.calculation_spans`), against the
  share of all the trajectory's tokens that are: the exact expectation of a random selection of the same count.

FAI averages the attention a token gets from 10 to 100 tokens later (``attention_credit_horizon``), so in a short
trajectory only its early tokens can have FAI above 0, and early tokens decide more of what follows. Both attention
rows therefore have a second, position-matched control: ``top_k`` random tokens among those with FAI > 0 (drawn with
the keys ``(seed, row, 1)``), and the share of calculation tokens among the tokens with FAI > 0.

The candidates of a trajectory are its completion tokens but a final EOS; trajectories with fewer than ``2 · top_k``
candidates, or without a final answer to change, are skipped (and from the position-matched row, those with fewer
than ``top_k`` tokens with FAI > 0). The random tokens are ``top_k`` distinct candidates drawn with
:func:`tokenweave.tokens.controls.row_generator` ``(seed, row)``; they may include a signal's tokens, as a random
selection would. One set of random tokens serves both signals' controls (the same count on the same trajectory).
"""

from __future__ import annotations

import torch

from ...data.arithmetic_errors import calculation_spans
from ...data.loading import load_run_dataset
from ...data.token_columns import token_char_spans
from ...inference.perturbation import GreedyTrajectory, greedy_trajectories, replace_and_continue
from ...tokens.controls import row_generator
from ...trainers.attention import AttentionCredit, AttentionCreditConfig, attention_credit, credit_layers
from .table import Measurement


def top_positions(scores: list[float], count: int) -> list[int]:
    """The ``count`` positions with the highest ``scores`` (equal scores: the earlier position first)."""
    return sorted(range(len(scores)), key=lambda position: (-scores[position], position))[:count]


def random_positions(num_candidates: int, count: int, seed: int, *keys: int) -> list[int]:
    """``count`` distinct positions of ``range(num_candidates)``, drawn uniformly, seeded by ``(seed, *keys)`` only
    (the trajectory's row, and which draw of it)."""
    return torch.randperm(num_candidates, generator=row_generator(seed, *keys))[:count].tolist()


def calculation_tokens(tokenizer, completion_ids: list[int]) -> list[bool]:
    """For each token of ``completion_ids``, whether its characters overlap a calculation ``L op R = C``."""
    text, spans = token_char_spans(tokenizer, completion_ids)
    calculations = calculation_spans(text)
    return [any(start < end_c and begin < end for begin, end_c in calculations) for start, end in spans]


def _credit(model, tokenizer, trajectories: list[GreedyTrajectory], options: AttentionCreditConfig,
            batch_size: int) -> AttentionCredit:
    """γ, WAAD and FAI of every completion token of ``trajectories`` (``[N, T]``), the head groups of this batch."""
    device = next(model.parameters()).device
    prompts = tokenizer.pad({"input_ids": [t.prompt_ids for t in trajectories]}, return_tensors="pt").to(device)
    completions = [torch.tensor(t.completion_ids, dtype=torch.long) for t in trajectories]
    completion_ids = torch.nn.utils.rnn.pad_sequence(completions, batch_first=True,
                                                     padding_value=tokenizer.pad_token_id).to(device)
    completion_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(ids) for ids in completions],
                                                      batch_first=True).to(device)
    layers = credit_layers(options.attention_credit_layers, model.config.num_hidden_layers)
    with torch.no_grad():
        credit = attention_credit(model, prompts["input_ids"], prompts["attention_mask"], completion_ids,
                                  completion_mask, options, layers, batch_size=batch_size)
    return credit


def perturbation_evidence(
    model, tokenizer, *, seeds: list[int], num_questions: int = 48, difficulty: str = "easy", top_k: int = 3,
    max_new_tokens: int = 64, batch_size: int = 32, options: AttentionCreditConfig | None = None,
) -> list[Measurement]:
    """The three measurements of the module docstring over ``seeds`` (each seed: the first ``num_questions``
    questions of the arithmetic test split drawn with that seed)."""
    options = options or AttentionCreditConfig()
    anchors = Measurement("attention credit (top FAI)", f"answer changes when one of the top-{top_k} tokens is "
                          "replaced by the second-ranked token", f"{top_k} random tokens of the same trajectory",
                          "trajectories")
    forking = Measurement("HAPO entropy (highest entropy)", f"answer changes when one of the top-{top_k} tokens is "
                          "replaced by the second-ranked token", f"{top_k} random tokens of the same trajectory",
                          "trajectories")
    matched = Measurement("attention credit (top FAI)", anchors.measurement, f"{top_k} random tokens of the same "
                          "trajectory with FAI > 0 (the positions it can credit)", "trajectories")
    calculations = Measurement("attention credit (γ > 1)", "credited tokens that are calculation tokens",
                               "all tokens of the trajectory (a random selection of the same count)", "trajectories")
    calculations_matched = Measurement("attention credit (γ > 1)", calculations.measurement, "the tokens of the "
                                       "trajectory with FAI > 0 (a random selection of the same count among them)",
                                       "trajectories")
    eos = tokenizer.eos_token_id
    for seed in seeds:
        dataset = load_run_dataset("arithmetic", "test", "grpo", num_examples=num_questions, difficulty=difficulty,
                                   seed=seed)
        trajectories = greedy_trajectories(model, tokenizer, list(dataset["prompt"]), max_new_tokens=max_new_tokens,
                                           batch_size=batch_size, desc=f"seed {seed}: greedy trajectories")
        credit = _credit(model, tokenizer, trajectories, options, batch_size)
        chosen = {}
        for row, trajectory in enumerate(trajectories):
            count = trajectory.candidates(eos)
            if count < 2 * top_k or trajectory.answer is None:  # no answer to change
                continue
            fai = credit.fai[row, :count].tolist()
            scorable = [position for position in range(count) if fai[position] > 0]  # where FAI can credit
            chosen[row] = {"fai": top_positions(fai, top_k), "entropy": top_positions(trajectory.entropy[:count], top_k),
                           "random": random_positions(count, top_k, seed, row)}
            if len(scorable) >= top_k:
                chosen[row]["scorable"] = [scorable[index]
                                           for index in random_positions(len(scorable), top_k, seed, row, 1)]
            gamma = credit.gamma[row, :count].tolist()
            is_calculation = calculation_tokens(tokenizer, trajectory.completion_ids[:count])
            credited = [calc for calc, value in zip(is_calculation, gamma, strict=True) if value > 1.0]
            if credited:
                calculations.add(seed, sum(credited) / len(credited), sum(is_calculation) / count)
                if scorable:
                    calculations_matched.add(seed, sum(credited) / len(credited),
                                             sum(is_calculation[position] for position in scorable) / len(scorable))
        perturbations = sorted({(row, position) for row, sets in chosen.items() for positions in sets.values()
                                for position in positions})
        answers = dict(zip(perturbations, replace_and_continue(
            model, tokenizer, trajectories, perturbations, max_new_tokens=max_new_tokens, batch_size=batch_size,
            desc=f"seed {seed}: perturbations"), strict=True))

        def changed_share(row: int, positions: list[int]) -> float:
            return sum(answers[row, position] != trajectories[row].answer for position in positions) / len(positions)

        for row, sets in chosen.items():
            control = changed_share(row, sets["random"])
            anchors.add(seed, changed_share(row, sets["fai"]), control)
            forking.add(seed, changed_share(row, sets["entropy"]), control)
            if "scorable" in sets:
                matched.add(seed, changed_share(row, sets["fai"]), changed_share(row, sets["scorable"]))
    return [anchors, matched, forking, calculations, calculations_matched]
