"""EAFT's token weights: the policy's uncertainty at each label token (Entropy-Adaptive Fine-Tuning, arXiv 2601.02151).

As the released code computes it (LLaMA-Factory ``_eaft_cross_entropy``; PRIS-CV/EAFT), from the logits ``z`` of each
label token's position, without gradient::

    H_top-k = −Σ_{j ∈ top-k(z)} q_j · log q_j,    q = softmax over the k largest logits only (k = 20)
    w       = (H_top-k / 3.0)^α                   (3.0 ≈ ln 20, the largest H_top-20: w ≤ 1; α = 1)

so a token the model is sure of (low entropy) weighs little and an uncertain one up to 1. The exact entropy over the
whole vocabulary reaches ln V (10.8 nats for 49k tokens), so putting it in the same formula changes the weights' scale:
:func:`exact_entropy_weights` divides it by ln V instead (tokenweave's variant, not the paper's).
"""

from __future__ import annotations

import math

from torch import Tensor

RELEASED_SCALE = 3.0
"""The released code's divisor of the top-20 entropy."""


def top_k_entropy(logits: Tensor, k: int = 20) -> Tensor:
    """The entropy of the softmax over the ``k`` largest of each row of ``logits`` ``[N, V]`` → ``[N]`` fp32."""
    top = logits.float().topk(min(k, logits.size(-1)), dim=-1).values
    log_q = top.log_softmax(dim=-1)
    return -(log_q.exp() * log_q).sum(dim=-1)


def eaft_weights(top_k_entropies: Tensor, alpha: float = 1.0, scale: float = RELEASED_SCALE) -> Tensor:
    """``(H / scale)^α`` (module docstring)."""
    return (top_k_entropies / scale).pow(alpha)


def exact_entropy_weights(entropies: Tensor, vocab_size: int, alpha: float = 1.0) -> Tensor:
    """The exact-entropy variant: ``(H / ln V)^α``, in [0, 1] (module docstring)."""
    return eaft_weights(entropies.float(), alpha, math.log(vocab_size))
