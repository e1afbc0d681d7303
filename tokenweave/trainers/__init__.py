"""Thin subclasses of TRL's trainers, one per TRL trainer; a method is picked by config, not by class. What a method
adds around a TRL trainer's loop is a token signal (:mod:`.signals`, hosted alike by the three trainers:
:mod:`.host`; HAPO's: :mod:`.hapo`), and, where it needs one, a registered loss (``tokenweave.losses``)."""

from .dpo import TokenDPOConfig, TokenDPOTrainer
from .grpo import TokenGRPOConfig, TokenGRPOTrainer
from .sft import TokenSFTConfig, TokenSFTTrainer
from .signals import TokenBatch, TokenSignal, register_token_signal

# ``method:`` in a run config -> (trainer class, config class).
METHODS = {
    "sft": (TokenSFTTrainer, TokenSFTConfig),
    "dpo": (TokenDPOTrainer, TokenDPOConfig),
    "grpo": (TokenGRPOTrainer, TokenGRPOConfig),
}

__all__ = [
    "METHODS",
    "TokenDPOConfig",
    "TokenDPOTrainer",
    "TokenGRPOConfig",
    "TokenGRPOTrainer",
    "TokenSFTConfig",
    "TokenSFTTrainer",
    "TokenBatch",
    "TokenSignal",
    "register_token_signal",
]
