"""The ``eaft`` token signal: Entropy-Adaptive Fine-Tuning's weight, the policy's uncertainty at each label token.

EAFT (arXiv 2601.02151), as its released code computes it (:mod:`tokenweave.tokens.eaft`)::

    w_t = (H_top20(t) / 3.0)^α       H_top20: the entropy of the softmax over the 20 largest logits (no gradient)
    loss = Σ_t w_t · ℓ_t / N         N: TRL's num_items_in_batch (the released code's num_items_in_batch too)

The top-20 logits need the logits, which TRL's fused head never builds for the whole batch: the signal applies the LM
head to the policy's final hidden states a chunk of ``eaft_chunk_size`` label positions at a time, without gradient
(``TokenBatch.hidden``), so no ``[B, T, V]`` tensor exists. ``eaft_entropy: exact`` uses the fused head's exact
entropy instead (no extra head pass), divided by ln V so the weights stay in [0, 1]: tokenweave's variant, not the
paper's. α = 0 gives every token weight 1 (TRL's SFT). Defaults α = 1, k = 20 (the released code's). Metrics:
``weights/mean``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..checks import AT_LEAST_ONE, NON_NEGATIVE
from ..models import causal_lm
from ..registry import Paper
from ..tokens.chunked import map_masked_chunks
from ..tokens.eaft import eaft_weights, exact_entropy_weights, top_k_entropy
from .dft import check_weighs_by_the_policy
from .signals import TokenBatch, TokenSignal, register_token_signal

EAFT_PAPER = Paper("Entropy-Adaptive Fine-Tuning: Resolving Confident Conflicts to Mitigate Forgetting", "2601.02151",
                   "diao2026eaft", "Muxi Diao and others", 2026)


@dataclass
class EaftConfig:
    """The ``eaft`` signal's fields (a mixin of ``TokenSFTConfig``)."""

    option_ranges: ClassVar[dict] = {"eaft_alpha": NON_NEGATIVE, "eaft_top_k": AT_LEAST_ONE,
                                     "eaft_chunk_size": AT_LEAST_ONE}

    eaft_alpha: float = field(default=1.0, metadata={"help": "eaft signal: the exponent α of w = (H / 3.0)^α (0: "
                                                     "every weight 1)."})
    eaft_top_k: int = field(default=20, metadata={"help": "eaft signal: the k largest logits whose softmax's entropy "
                                                  "H is (the released code's 20). The divisor stays the released "
                                                  "3.0 (≈ ln 20): with k > 20 the weights reach ln k / 3 > 1."})
    eaft_entropy: str = field(
        default="top_k",
        metadata={"help": "eaft signal: 'top_k', the released formula; 'exact', the fused head's exact entropy "
                  "divided by ln V (tokenweave's variant, no extra head pass).", "choices": ["top_k", "exact"]},
    )
    eaft_chunk_size: int = field(default=1024, metadata={"help": "eaft signal: label positions per chunk of the "
                                                         "top-k head pass (peak memory ≈ a chunk × vocabulary)."})


@register_token_signal("eaft")
class EaftSignal(TokenSignal):
    """EAFT's weight (module docstring)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    metric_prefixes = ("weights/",)
    option_prefixes = ("eaft_",)
    paper = EAFT_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        check_weighs_by_the_policy(args, cls.name)
        return True

    @property
    def needs_hidden_states(self) -> bool:
        return self.trainer.args.eaft_entropy == "top_k"

    def token_inputs(self, batch: TokenBatch) -> dict:
        args = self.trainer.args
        if args.eaft_entropy == "exact":
            vocab_size = causal_lm(self.trainer.model).config.get_text_config().vocab_size
            return {"token_weights": exact_entropy_weights(batch.entropies, vocab_size, args.eaft_alpha)}
        hidden, head = batch.hidden.policy()
        with torch.no_grad():
            entropies = map_masked_chunks(
                lambda states: top_k_entropy(head(states), args.eaft_top_k), (hidden.detach(),), batch.mask,
                chunk_size=args.eaft_chunk_size, num_chunks=batch.hidden.num_chunks(args.eaft_chunk_size, [head]))
        return {"token_weights": eaft_weights(entropies, args.eaft_alpha)}
