"""tokenweave: token-aware fine-tuning and RL on top of TRL, where each token gets the gradient it deserves."""

__version__ = "0.1.0"
