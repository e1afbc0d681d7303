"""The ``dft`` token signal: Dynamic Fine-Tuning's weight, the policy's own probability of each label token, in SFT.

DFT (Wu et al. 2025, arXiv 2508.05629) rescales each token's NLL by its probability under the policy, without
gradient, so that a token the model finds unlikely weighs little::

    w_t = sg(π_θ(y_t))            loss = Σ_t w_t · ℓ_t / N      (N: TRL's num_items_in_batch)

exactly TRL's ``loss_type: dft`` (``SFTTrainer.compute_loss``), as a signal so that it combines with the others and
with the random control (``signal_control: shuffle``: each sequence's own probabilities on random tokens). With
``loss_type: dft`` as well it would count twice: refused. Metrics: ``weights/mean``.
"""

from __future__ import annotations

from ..checks import ConfigError
from ..registry import Paper
from .signals import TokenBatch, TokenSignal, register_token_signal

DFT_PAPER = Paper("On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification",
                  "2508.05629", "wu2025generalization", "Yongliang Wu and others", 2025)


@register_token_signal("dft")
class DftSignal(TokenSignal):
    """DFT's weight (module docstring)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    metric_prefixes = ("weights/",)
    paper = DFT_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        if args.loss_type == "dft":
            raise ConfigError("token_signals [dft] is TRL's loss_type dft: with both, DFT's weight counts twice. "
                              "Keep one (loss_type: nll with the signal).")
        return True

    def token_inputs(self, batch: TokenBatch) -> dict:
        return {"token_weights": batch.logps.detach().exp()}
