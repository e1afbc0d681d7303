"""Thin subclasses of TRL's trainers, one per TRL trainer; a method is picked by config, not by class. What a method
adds around TRL's GRPO loop is a token-signal component (:mod:`.signals`; HAPO's: :mod:`.hapo`)."""

from .dpo import TokenDPOConfig, TokenDPOTrainer
from .grpo import TokenGRPOConfig, TokenGRPOTrainer
from .signals import TokenSignal, register_token_signal
from .sft import TokenSFTConfig, TokenSFTTrainer

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
    "TokenSignal",
    "register_token_signal",
]
