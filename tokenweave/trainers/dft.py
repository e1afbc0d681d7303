"""The ``dft`` token signal: Dynamic Fine-Tuning's weight, the policy's own probability of each label token, in SFT.

DFT (Wu et al. 2025, arXiv 2508.05629) rescales each token's NLL by its probability under the policy, without
gradient, so that a token the model finds unlikely weighs little::

    w_t = sg(π_θ(y_t))            loss = Σ_t w_t · ℓ_t / N      (N: TRL's num_items_in_batch)

exactly TRL's ``loss_type: dft`` (``SFTTrainer.compute_loss``), as a signal so that it combines with the others and
with the random control (``signal_control: shuffle``: each sequence's own probabilities on random tokens). With
``loss_type: dft``, or with ``asft`` (DFT's weight and a KL anchor), it would count twice: refused. Metrics:
``weights/mean``.
"""

from __future__ import annotations

from ..checks import ConfigError
from ..registry import Paper
from .signals import TokenBatch, TokenSignal, register_token_signal

DFT_PAPER = Paper("On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification",
                  "2508.05629", "wu2025generalization", "Yongliang Wu and others", 2025)


def check_weighs_by_the_policy(args, name: str) -> None:
    """What the signals whose weights come from the policy's own distribution (``dft``, ``asft``, ``eaft``) refuse:
    ``token_weight_normalizer: micro_batch`` (their released codes divide by the label count, TRL's normaliser, not
    by the weights' sum), and, for DFT's weight (``dft``, ``asft``), TRL's ``loss_type: dft`` as well (it would count
    twice)."""
    if args.token_weight_normalizer == "micro_batch":
        raise ConfigError(f"token_signals [{name}] weigh tokens by the policy's distribution and normalise by the "
                          "label count, as released: not with token_weight_normalizer micro_batch (the weights' sum).")
    if name in ("dft", "asft") and args.loss_type == "dft":
        raise ConfigError(f"token_signals [{name}] carry DFT's weight, and so does TRL's loss_type dft: with both it "
                          "counts twice. Keep loss_type: nll with the signal.")


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
        check_weighs_by_the_policy(args, cls.name)
        if "asft" in (args.token_signals or []):
            raise ConfigError("token_signals [dft, asft]: ASFT's weight is DFT's, so with both it counts twice. Keep "
                              "asft (DFT plus its KL anchor).")
        return True

    def token_inputs(self, batch: TokenBatch) -> dict:
        return {"token_weights": batch.logps.detach().exp()}
