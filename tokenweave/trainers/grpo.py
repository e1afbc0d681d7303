"""TokenGRPOTrainer: TRL's GRPOTrainer, the home of token-aware policy losses (HAPO, Rank-GRPO, ...).

No behaviour change yet: the policy-loss registry arrives with the token-aware RL issue.
"""

from dataclasses import dataclass

from trl import GRPOConfig, GRPOTrainer


@dataclass
class TokenGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig``; tokenweave's GRPO options are added here."""


class TokenGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` under tokenweave's name; TRL's ``loss_type`` values work unchanged."""
