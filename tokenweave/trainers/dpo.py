"""TokenDPOTrainer: TRL's DPOTrainer, the home of token-level preference losses (cDPO, TDPO1/TDPO2).

No behaviour change yet: the token-weighted losses arrive with the preference-optimisation issue.
"""

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer


@dataclass
class TokenDPOConfig(DPOConfig):
    """TRL's ``DPOConfig``; tokenweave's DPO options are added here."""


class TokenDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` under tokenweave's name; plain DPO ``loss_type`` values work unchanged."""
