"""The ``treg`` token signal: T-REG's self-contrastive token rewards r̂_t = σ(log π(y_t | x_better) − log π(y_t |
x_worse)) − ½ for the ``treg`` preference loss (arXiv 2412.02685; no official code: the formula, the loss and every
choice made where the paper is silent: :mod:`tokenweave.losses.treg`).

``loss_type: treg`` turns it on. The rewards are read from the dataset's token-reward columns, written once by
``tokenweave token-rewards --config <this config>`` (:mod:`tokenweave.pipelines.token_rewards`): the frozen source model
(``treg_reward_source``: the run's reference, or the policy's initial weights) reads each completion after the prompt
with ``treg_better_instruction`` and after the prompt with ``treg_worse_instruction`` appended to its last user message.
The shared column, control and metric code: :mod:`.token_rewards`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..checks import NON_NEGATIVE, Range
from ..losses.treg import TREG_ALPHA, TREG_PAPER
from .signals import register_token_signal
from .token_rewards import TokenRewardsSignal

TREG_SOURCES = ("reference", "policy")
TREG_BETTER = "Give a correct, helpful, coherent and concise answer."
TREG_WORSE = "Give an incorrect, unhelpful, incoherent and verbose answer."


@dataclass
class TregConfig:
    """The ``treg`` loss's and signal's fields of ``TokenDPOConfig`` (a mixin)."""

    option_ranges: ClassVar[dict] = {"treg_alpha": NON_NEGATIVE}

    treg_alpha: float = field(
        default=TREG_ALPHA,
        metadata={"help": "T-REG: α of the token-level regulariser (the paper searched 0.1, 0.25, 0.5; 0 is DPO)."},
    )
    treg_reward_source: str = field(
        default="reference",
        metadata={"help": "T-REG, `tokenweave token-rewards`: the frozen model that scores the revision prompts: "
                  "'reference' (reference_model_path, else the policy's initial weights: the paper's) or 'policy' "
                  "(model_name_or_path, the policy's initial weights, even with a reference_model_path).",
                  "choices": list(TREG_SOURCES)},
    )
    treg_better_instruction: str = field(
        default=TREG_BETTER,
        metadata={"help": "T-REG: the instruction appended to the last user message for x_better."},
    )
    treg_worse_instruction: str = field(
        default=TREG_WORSE,
        metadata={"help": "T-REG: the instruction appended to the last user message for x_worse."},
    )


@register_token_signal("treg")
class TregSignal(TokenRewardsSignal):
    """T-REG's token rewards, from the columns (module docstring)."""

    option_prefixes = ("treg_", "chosen_token_rewards_column", "rejected_token_rewards_column")
    paper = TREG_PAPER
    reward_range = Range(-0.5, 0.5)
