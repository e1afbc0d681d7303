"""RLSD's self-distilled token credit (Yang et al., "Self-Distilled RLVR", arXiv 2604.03128): the math, no model.

A privileged teacher (the policy given the reference answer in its prompt) scores the tokens the student sampled; the
gap between its log-probability and the student's decides how much of the sequence's advantage each token gets, while
the sign of the advantage (the verifier's outcome) keeps deciding the direction::

    δ_t = sg(log π_T(y_t | x, answer, y_<t) − log π(y_t | x, y_<t))               (evidence)
    w_t = clip(exp(sign(A) · δ_t), 1 − ε, 1 + ε)                                   (evidence weight)
    A_t = A · [(1 − λ) + λ · w_t]                                                  λ = 0.5, ε = 0.2

The factor ``(1 − λ) + λ·w_t`` lies in [1 − λε, 1 + λε]: always positive (ε < 1, λ ≤ 1), so no token's advantage
changes sign, and λ = 0 is GRPO exactly. A correct completion (A > 0) gives more credit to the tokens the teacher
finds more likely than the student does, an incorrect one (A < 0) more blame to the tokens the teacher finds less
likely.

Source: the paper's formula; the released code (iie-ycx/RLSD, ``verl/workers/actor/dp_opsd_actor.py``:
``_build_stgca_advantages``; the λ schedule in ``verl/trainer/opsd_trainer.py``,
``RaySimpleGRPOOPSDTrainer._augment_batch_with_grpo_opsd``; the recipe ``examples/visual_rl/rlsd_train.sh``), and
ms-swift's port (``swift/rl_core/advantage.py``: ``apply_rlsd_reweight``, ``advantage_reweight=rlsd``). Where they
differ from the formula above, and what is done here:

- **λ schedule** (:func:`rlsd_lambda`). The recipe decays λ linearly to 0 over 60 steps
  (``rlsd_lambda_decay_steps=60``), after an optional linear warm-up (``rlsd_lambda_warmup_steps``, 0 in the
  recipe). The released code counts the step being trained from 1 (``global_step`` is incremented before the
  rollout), so even the first step has λ = 0.5·(1 − 1/60); ms-swift counts the optimizer steps done (from 0), one
  step later. Here: the released code's count.
- **ε**: the released code's ``rlsd_reweight_clip_range`` defaults to the PPO clip ε_low (0.2 in the recipe);
  ms-swift's to 0.2. Here: its own option, 0.2.
- **negative only** (off in the recipe and in ms-swift by default): only completions with A < 0 are reweighted,
  the others keep GRPO's advantage. The released code tests the row's summed advantage, ms-swift the row's scalar
  advantage; here each token's advantage sign (the same for the per-sequence advantages of GRPO).
- **padding**: the released code multiplies δ and the factor by the response mask (a padded token's advantage is
  0); here the factor is 1 outside ``mask`` and :func:`rlsd_advantages` is 0 there, as released.
- The released code's ``rlsd_thought_only`` (reweight only inside ``<thought>…</thought>``, off in the recipe) is
  specific to its prompt format and not provided.

Which teacher and which student log-probabilities go in (a frozen teacher re-synced every 20 steps and the current
policy per micro-batch, as released; or ms-swift's dynamic mode) is the trainer's choice: ``trainers.rlsd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RlsdFactor:
    """What :func:`rlsd_factor` gives per token ``[B, T]``: the advantage multiplier ``(1 − λ) + λ·w_t`` (1 outside
    the mask), the evidence δ_t (0 outside), and where the evidence weight was clipped from below / above."""

    factor: Tensor
    delta: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


def rlsd_factor(teacher_logps: Tensor, student_logps: Tensor, advantage_sign: Tensor, mask: Tensor, lam: float,
                epsilon: float, negative_only: bool = False) -> RlsdFactor:
    """RLSD's per-token advantage multiplier (module docstring), no gradient.

    Args:
        teacher_logps: ``[B, T]`` log π_T of the sampled completion tokens (the teacher's prompt holds the answer).
        student_logps: ``[B, T]`` log π of the same tokens under the student's own prompt.
        advantage_sign: ``[B, T]`` (or ``[B, 1]``) the sign of each token's advantage (−1, 0 or 1).
        mask: ``[B, T]`` 1 at the completion tokens.
        lam: λ in [0, 1] (:func:`rlsd_lambda` gives the scheduled value).
        epsilon: ε in [0, 1): the evidence weight is clipped to [1 − ε, 1 + ε].
        negative_only: reweight only tokens whose advantage is negative (the others' factor is 1).
    """
    valid = mask.bool()
    delta = torch.where(valid, (teacher_logps - student_logps).detach().float(), 0.0)
    sign = advantage_sign.float().expand_as(delta)
    weights = torch.exp(sign * delta)  # +inf for a huge gap: clipped to 1 + ε below
    clipped_low = valid & (weights < 1.0 - epsilon)
    clipped_high = valid & (weights > 1.0 + epsilon)
    factor = (1.0 - lam) + lam * weights.clamp(1.0 - epsilon, 1.0 + epsilon)
    reweighted = valid & (sign < 0) if negative_only else valid
    return RlsdFactor(torch.where(reweighted, factor, 1.0), delta, clipped_low, clipped_high)


def rlsd_advantages(advantages: Tensor, teacher_logps: Tensor, student_logps: Tensor, mask: Tensor, lam: float,
                    epsilon: float, negative_only: bool = False) -> Tensor:
    """RLSD's token advantages ``A_t = A · [(1 − λ) + λ·w_t]`` ``[B, T]`` (module docstring), 0 outside ``mask``.
    ``advantages``: ``[B]`` (one per completion, GRPO's) or ``[B, T]``."""
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    advantages = advantages.expand_as(mask).float()
    factor = rlsd_factor(teacher_logps, student_logps, torch.sign(advantages), mask, lam, epsilon, negative_only)
    return advantages * factor.factor * mask


def rlsd_lambda(step: int, lam: float, warmup_steps: int = 0, decay_steps: int = 0) -> float:
    """λ at optimizer step ``step`` (counted from 1: the step being trained), as the released code schedules it
    (``opsd_trainer.py``, ``_augment_batch_with_grpo_opsd``)::

        step < W (W > 0):   λ · step / W                                 linear warm-up
        D > 0:              λ · max(1 − (step − W) / D, 0)               linear decay to 0 over D steps
        otherwise:          λ

    with W = ``warmup_steps`` and D = ``decay_steps`` (the recipe: W = 0, D = 60, so λ(1) = 0.5·59/60, λ(30) = 0.25,
    λ(60) = 0 and after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lam * step / warmup_steps
    if decay_steps > 0:
        return lam * max(1.0 - (step - warmup_steps) / decay_steps, 0.0)
    return lam


def rlsd_lambda_is_over(step: int, lam: float, warmup_steps: int = 0, decay_steps: int = 0) -> bool:
    """Whether λ is 0 at ``step`` and at every later step (λ = 0, or the decay has ended): the teacher need not run."""
    return lam == 0.0 or (step >= warmup_steps and rlsd_lambda(step, lam, warmup_steps, decay_steps) == 0.0)
