"""TokenSFTTrainer: TRL's SFTTrainer, the home of the token-weighted SFT family (Rho-1, ssToken, PRIOR).

No behaviour change yet: token weights arrive with the SFT family's issue.
"""

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from ..checks import check_options
from .card import ModelCardMixin
from .checkpointing import CheckpointingMixin
from .finite import FiniteTrainingMixin


@dataclass
class TokenSFTConfig(SFTConfig):
    """TRL's ``SFTConfig``; tokenweave's SFT options are added here."""

    def __post_init__(self):
        check_options(self)  # types, choices and ranges
        super().__post_init__()


class TokenSFTTrainer(FiniteTrainingMixin, ModelCardMixin, CheckpointingMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` under tokenweave's name, so runs and later token weighting share one class."""
