"""The ``tgdpo`` token signal: TGDPO's token rewards r̂_t = log π_RM(y_t) − log π_ref(y_t) for the ``tgdpo`` preference
loss (arXiv 2506.14574; the formula and the loss: :mod:`tokenweave.losses.tgdpo`).

``loss_type: tgdpo`` turns it on. The reward model (RM) is a frozen DPO-trained model. Two sources, one reward function
(:func:`~tokenweave.losses.tgdpo.tgdpo_token_rewards`):

* online: ``tgdpo_reward_model_path`` names the RM; it is loaded as a frozen model (``trainers.frozen``, the name
  ``tgdpo_reward_model``) and run over each micro-batch, next to the reference the loss runs anyway (one extra no-grad
  forward per step);
* offline (``tgdpo_reward_model_path`` unset): the dataset's token-reward columns, written once by ``tokenweave
  token-rewards --config <this config> --reward_model <RM>`` (:mod:`tokenweave.pipelines.token_rewards`) from the RM
  and the run's reference: no extra forward in training.

The shared column, control and metric code: :mod:`.token_rewards`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from ..checks import NON_NEGATIVE, ConfigError
from ..losses.tgdpo import TGDPO_ALPHA, TGDPO_PAPER, tgdpo_token_rewards
from .signals import TokenBatch, register_token_signal
from .token_rewards import TokenRewardsSignal

REWARD_MODEL = "tgdpo_reward_model"
"""The frozen model name of TGDPO's online reward model."""


@dataclass
class TgdpoConfig:
    """The ``tgdpo`` loss's and signal's fields of ``TokenDPOConfig`` (a mixin)."""

    option_ranges: ClassVar[dict] = {"tgdpo_alpha": NON_NEGATIVE}

    tgdpo_alpha: float = field(
        default=TGDPO_ALPHA,
        metadata={"help": "TGDPO: α of the token weights 1 ± αβ·r̂_t (paper and released scripts: 0.5; 0 is DPO)."},
    )
    tgdpo_reward_model_path: str | None = field(
        default=None,
        metadata={"help": "TGDPO: the frozen DPO-trained model whose log-probs minus the reference's are the token "
                  "rewards, computed online each step. None: read them from the token-reward columns (written by "
                  "`tokenweave token-rewards`)."},
    )


@register_token_signal("tgdpo")
class TgdpoSignal(TokenRewardsSignal):
    """TGDPO's token rewards (module docstring)."""

    option_prefixes = ("tgdpo_", "chosen_token_rewards_column", "rejected_token_rewards_column")
    paper = TGDPO_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        """The online RM named as the frozen model ``tgdpo_reward_model``."""
        super().configure(args)
        path = args.tgdpo_reward_model_path
        if path is not None:
            teachers = dict(args.teacher_model_paths or {})
            if teachers.get(REWARD_MODEL, path) != path:
                raise ConfigError(f"teacher_model_paths names {REWARD_MODEL!r} {teachers[REWARD_MODEL]!r}, and "
                                  f"tgdpo_reward_model_path {path!r}: give the reward model once.")
            args.teacher_model_paths = teachers | {REWARD_MODEL: path}
        return True

    @classmethod
    def reads_columns(cls, args) -> bool:
        return args.tgdpo_reward_model_path is None

    @classmethod
    def frozen_models(cls, args) -> tuple[str, ...]:
        return () if cls.reads_columns(args) else (REWARD_MODEL, "reference")

    def online_rewards(self, batch: TokenBatch) -> Tensor:
        return tgdpo_token_rewards(batch.frozen.logps(REWARD_MODEL), batch.frozen.logps("reference"))
