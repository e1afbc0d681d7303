"""The token-weighted SFT loss: TRL's negative log-likelihood with a weight on every label token.

Pure tensor math, the loss of ``TokenSFTTrainer`` (whose ``compute_loss`` mirrors TRL 1.16's and calls this)::

    ℓ_t  = −log π_θ(y_t)                          (0 at ignored positions: TRL's fused head gives log-prob 0 there)
    DFT: ℓ_t ← ℓ_t · sg(π_θ(y_t))                 (TRL's loss_type "dft", arXiv 2508.05629)
    loss = Σ_t (w_t · ℓ_t + a_t) / N              N: TRL's normaliser, num_items_in_batch (the label tokens of the
                                                  accumulation window on every process) or this batch's label count
                                                  (N = 0, a batch with nothing to learn: the loss is 0)

With no weights (``w_t = 1``) and no added term (``a_t = 0``) it is TRL's SFT loss exactly. Weights from token signals
(a weight column, span rules, Rho-1's selection, ...) multiply ℓ_t; ``a_t`` is a per-token term a signal adds (ASFT's
KL to the reference), normalised alike. The normaliser stays TRL's, so that a run does not change with how its batch
is split over gradient accumulation and processes; a selection that wants the mean over its kept tokens scales its
weights by the inverse of its kept fraction (Rho-1's ``1/(N·k%)``). :func:`micro_batch_normalizer` is the other
choice, the released codes' per-micro-batch weighted mean.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_weighted_nll(logps: Tensor, normalizer: Tensor | int | float, token_weights: Tensor | None = None,
                       dft: bool = False, token_loss: Tensor | None = None) -> Tensor:
    """The loss of the module docstring, from ``logps`` ``[B, T]`` (0 at ignored positions), the normaliser N,
    optional ``token_weights`` ``[B, T]`` and an optional added per-token term ``token_loss`` ``[B, T]`` (0 at ignored
    positions)."""
    per_token_loss = -logps
    if dft:
        per_token_loss = per_token_loss * logps.exp().detach()
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights
    if token_loss is not None:
        per_token_loss = per_token_loss + token_loss
    normalizer = torch.as_tensor(normalizer)
    return per_token_loss.sum() / torch.where(normalizer > 0, normalizer, 1)


def micro_batch_normalizer(mask: Tensor, token_weights: Tensor | None) -> Tensor:
    """``Σ_t w_t`` over the micro-batch's label tokens (``mask``): with it the loss is the micro-batch's weighted mean
    ``Σ w·ℓ / Σ w``, the normaliser of the released codes that mask or weigh tokens inside ``compute_loss`` (ssToken,
    TokenCleaning and ProFit recounted: the kept tokens; TL-Training: the weights' sum). It changes with how a batch is
    split (a micro-batch with few kept tokens weighs as much as one with many), unlike TRL's ``num_items_in_batch``."""
    if token_weights is None:
        return mask.sum()
    return (token_weights.detach() * mask).sum()
