"""The ``profit`` token signal: ProFit's probability-guided token selection, in SFT.

ProFit (Liu et al., ACL Findings 2026, arXiv 2601.09195; released code Utaotao/ProFit, ``_profit_cross_entropy``)
keeps the label tokens the policy already finds likely and masks the others (their loss is 0), without gradient
through the choice::

    w_t = 1[π_θ(y_t) ≥ τ]          (profit_direction 'higher', the paper's; 'lower': 1[π_θ(y_t) ≤ τ])
    loss = Σ_t w_t · ℓ_t / N        N: TRL's num_items_in_batch, counted BEFORE the masking

as the released code does (it masks labels inside ``compute_loss``, after the Trainer counted them, so the kept tokens'
mean is scaled down by the kept share; ``methods-sft.md`` §1.11, pitfall 1). ``token_weight_normalizer: micro_batch``
recounts: the mean over each micro-batch's kept tokens. τ = 0.1 by default (the authors' ``higher`` runs; the README's
"p > τ" is the code's "p ≥ τ"); τ = 0 keeps every token (TRL's SFT). The released ``middle`` direction (two
thresholds) is not here. A selection: ``signal_control: inverse`` keeps as many tokens of each sequence from the
other end of the probability ranking; ``shuffle`` as many at random. Metrics: ``weights/mean`` (the kept share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..checks import UNIT
from ..registry import Paper
from .signals import TokenBatch, TokenSignal, register_token_signal

PROFIT_PAPER = Paper("ProFit: Leveraging High-Value Signals in SFT via Probability-Guided Token Selection",
                     "2601.09195", "liu2026profit", "Tao Liu and others", 2026)


@dataclass
class ProfitConfig:
    """The ``profit`` signal's fields (a mixin of ``TokenSFTConfig``)."""

    option_ranges: ClassVar[dict] = {"profit_threshold": UNIT}

    profit_threshold: float = field(default=0.1, metadata={"help": "profit signal: the probability threshold τ "
                                                           "(0: every token kept)."})
    profit_direction: str = field(
        default="higher",
        metadata={"help": "profit signal: 'higher' keeps the tokens with π_θ(y_t) ≥ τ (the paper's); 'lower' those "
                  "with π_θ(y_t) ≤ τ.", "choices": ["higher", "lower"]},
    )


@register_token_signal("profit")
class ProfitSignal(TokenSignal):
    """ProFit's selection (module docstring)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    selection = True
    metric_prefixes = ("weights/",)
    option_prefixes = ("profit_",)
    paper = PROFIT_PAPER

    def token_inputs(self, batch: TokenBatch) -> dict:
        probs = batch.logps.detach().exp()
        threshold = self.trainer.args.profit_threshold
        if self.trainer.args.profit_direction == "higher":
            return {"token_weights": (probs >= threshold).to(probs.dtype), "token_scores": probs}
        return {"token_weights": (probs <= threshold).to(probs.dtype), "token_scores": -probs}
