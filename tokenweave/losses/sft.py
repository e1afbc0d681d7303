"""The token-weighted SFT loss: TRL's negative log-likelihood with a weight on every label token.

Pure tensor math, the loss of ``TokenSFTTrainer`` (whose ``compute_loss`` mirrors TRL 1.16's and calls this)::

    ℓ_t  = −log π_θ(y_t)                          (0 at ignored positions: TRL's fused head gives log-prob 0 there)
    DFT: ℓ_t ← ℓ_t · sg(π_θ(y_t))                 (TRL's loss_type "dft", arXiv 2508.05629)
    loss = Σ_t w_t · ℓ_t / max(N, 1)              N: TRL's normaliser, num_items_in_batch (the label tokens of the
                                                  accumulation window on every process) or this batch's label count

With no weights (``w_t = 1``) it is TRL's SFT loss exactly. Weights from token signals (a weight column, span rules,
Rho-1's selection, ...) multiply ℓ_t and leave the normaliser as TRL's: a selection that keeps k % of the tokens
then has k % of the full loss's scale, the convention of Rho-1's ``1/(N·k%)`` only when the selection rescales its
weights itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_weighted_nll(logps: Tensor, normalizer: Tensor | int, token_weights: Tensor | None = None,
                       dft: bool = False) -> Tensor:
    """The loss of the module docstring, from ``logps`` ``[B, T]`` (0 at ignored positions), the normaliser N and
    optional ``token_weights`` ``[B, T]``."""
    per_token_loss = -logps
    if dft:
        per_token_loss = per_token_loss * logps.exp().detach()
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights
    return per_token_loss.sum() / torch.as_tensor(normalizer).clamp(min=1)
