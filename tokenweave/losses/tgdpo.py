"""TGDPO: Token-level reward Guidance for DPO (Zhu et al., ICML 2025, arXiv 2506.14574), the registered preference
loss ``tgdpo`` and its token rewards.

Token rewards from a frozen DPO-trained model ("the reward model" RM) and the frozen reference, per completion token::

    r̂_t = log π_RM(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)                       (tgdpo_token_rewards)

The loss, with the policy's per-token log-ratios ``lr_t = log π_θ(y_t) − log π_ref(y_t)``::

    loss = −log σ( Σ_t β(1 + αβ·r̂ʷ_t)·lrʷ_t − Σ_t β(1 − αβ·r̂ˡ_t)·lrˡ_t )          (tgdpo_loss)

α 0.5, β 0.1 (the paper's). This is token-weighted DPO (:func:`~tokenweave.losses.preference.token_weighted_dpo_loss`,
cDPO's loss) with the weights ``1 + αβ·r̂ʷ_t`` on the chosen and ``1 − αβ·r̂ˡ_t`` on the rejected tokens: at α = 0 it
is DPO. As the released code (dvlab-research/TGDPO, ``train/tgdpo/trainer.py``, ``dpo_loss`` for ``pref_loss:
sigmoid``): the rewards are the raw log-prob differences (no clipping, no normalisation), the RM forward runs without
gradient, no label smoothing, and the logged rewards are DPO's ``β·Σ_t lr_t``. The released code's optional SFT term
(``pref_ftx``) is not part of the method and is not implemented.
"""

from __future__ import annotations

from torch import Tensor

from ..registry import Paper
from .preference import (
    PreferenceLossConfig,
    PreferenceLossOutput,
    TokenPairs,
    register_preference_loss,
    token_weighted_dpo_loss,
)

TGDPO_PAPER = Paper("TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization",
                    "2506.14574", "zhu2025tgdpo", "Mingkang Zhu and others", 2025)
TGDPO_ALPHA = 0.5
"""α of the released code's scripts and the paper."""


def tgdpo_token_rewards(reward_model_logps: Tensor, reference_logps: Tensor) -> Tensor:
    """``r̂_t = log π_RM(y_t) − log π_ref(y_t)``, per token (any shape; module docstring)."""
    return reward_model_logps - reference_logps


def tgdpo_weights(chosen_rewards: Tensor, rejected_rewards: Tensor, *, alpha: float, beta: float,
                  ) -> tuple[Tensor, Tensor]:
    """TGDPO's per-token weights of the log-ratios: ``1 + αβ·r̂ʷ_t`` (chosen) and ``1 − αβ·r̂ˡ_t`` (rejected)."""
    return 1 + alpha * beta * chosen_rewards, 1 - alpha * beta * rejected_rewards


@register_preference_loss("tgdpo", needs=("token_rewards",), paper=TGDPO_PAPER)
def tgdpo_loss(pairs: TokenPairs, config: PreferenceLossConfig, *, token_rewards: tuple[Tensor, Tensor],
               ) -> PreferenceLossOutput:
    """TGDPO (module docstring): token-weighted DPO with :func:`tgdpo_weights` of the batch's token rewards
    ``(r̂ʷ [B, T_w], r̂ˡ [B, T_l])``, α ``tgdpo_alpha``; no label smoothing, as released."""
    alpha = config.options.get("tgdpo_alpha", TGDPO_ALPHA)
    weights = tgdpo_weights(*token_rewards, alpha=alpha, beta=config.beta)
    return token_weighted_dpo_loss(pairs, *weights, beta=config.beta)
