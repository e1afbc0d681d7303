"""T-REG: preference optimisation with token-level reward regularisation (Zhou et al., ACL 2025, arXiv 2412.02685),
the registered preference loss ``treg`` and its token rewards.

**The official code is not available** (github wzhouad/T-REG was never retrievable; no third-party port exists): this is
implemented from the paper as secondary notes give it (``shared/notes/methods.md`` §5.4), and every choice the paper
leaves open is named below.

Token rewards, from one frozen model (the reference, as the notes say; the policy's initial weights as an option) under
two self-contrastive revision prompts ``x_better`` and ``x_worse`` (the prompt with an instruction to answer well /
badly appended), of the same completion tokens::

    r̂_t = σ( log π(y_t | x_better, y_<t) − log π(y_t | x_worse, y_<t) ) − ½  ∈ (−½, ½)     (treg_token_rewards)

The loss, DPO plus a token-level regulariser on both responses weighted by DPO's own gradient weight::

    L_REG(y) = −Σ_t β·r̂_t·log π_θ(y_t | x, y_<t)
    w        = sg( σ(r_DPO(y_l) − r_DPO(y_w)) ),  r_DPO(y) = β·Σ_t (log π_θ(y_t) − log π_ref(y_t))
    loss     = L_DPO + α·w·( L_REG(y_w) + L_REG(y_l) )                                        (treg_loss)

Choices the paper leaves open, as made here: L_REG is a sum over tokens (no length normalisation, like DPO's log-ratio
sums); ``w`` is detached (it is the DPO gradient's weight, a coefficient); the rewards come from the frozen reference
(the notes' reading), computed once, offline, by ``tokenweave token-rewards`` (the reference is frozen, so an online
forward would give the same values); the revision instructions are appended to the last user message (the exact prompts
were not retrieved: ``treg_better_instruction`` / ``treg_worse_instruction``); α defaults to 0.25, the middle of the
paper's search grid {0.1, 0.25, 0.5} (its chosen value was not retrieved). At α = 0 the loss is DPO.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import Paper
from .preference import (
    PreferenceLossConfig,
    PreferenceLossOutput,
    TokenPairs,
    register_preference_loss,
    token_weighted_dpo_loss,
)

TREG_PAPER = Paper("T-REG: Preference Optimization with Token-Level Reward Regularization", "2412.02685",
                   "zhou2024treg", "Wenxuan Zhou and others", 2024)
TREG_ALPHA = 0.25
"""α: the middle of the paper's search grid {0.1, 0.25, 0.5} (module docstring)."""


def treg_token_rewards(better_logps: Tensor, worse_logps: Tensor) -> Tensor:
    """``r̂_t = σ(log π(y_t | x_better) − log π(y_t | x_worse)) − ½``, per token (any shape; module docstring)."""
    return torch.sigmoid(better_logps - worse_logps) - 0.5


def treg_regularizer(logps: Tensor, rewards: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    """``L_REG(y) = −Σ_t β·r̂_t·log π_θ(y_t)`` over the tokens of ``mask``, per row ``[B]`` (padding ignored)."""
    return -torch.where(mask.bool(), beta * rewards * logps, 0.0).sum(-1)


@register_preference_loss("treg", needs=("token_rewards",), paper=TREG_PAPER)
def treg_loss(pairs: TokenPairs, config: PreferenceLossConfig, *, token_rewards: tuple[Tensor, Tensor],
              ) -> PreferenceLossOutput:
    """T-REG (module docstring): DPO (TRL's sigmoid loss, ``label_smoothing`` as TRL's) plus ``α·w·(L_REG(y_w) +
    L_REG(y_l))`` of the batch's token rewards ``(r̂ʷ [B, T_w], r̂ˡ [B, T_l])``, α ``treg_alpha``. Rewards and
    logits are DPO's."""
    alpha = config.options.get("treg_alpha", TREG_ALPHA)
    dpo = token_weighted_dpo_loss(pairs, beta=config.beta, label_smoothing=config.label_smoothing)
    weight = torch.sigmoid(-dpo.logits)  # σ(r_DPO(y_l) − r_DPO(y_w)); dpo.logits is detached
    chosen_rewards, rejected_rewards = token_rewards
    regularizer = (treg_regularizer(pairs.chosen_logps, chosen_rewards, pairs.chosen_mask, beta=config.beta)
                   + treg_regularizer(pairs.rejected_logps, rejected_rewards, pairs.rejected_mask, beta=config.beta))
    return dpo._replace(losses=dpo.losses + alpha * weight * regularizer)
