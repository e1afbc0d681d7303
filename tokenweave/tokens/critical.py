"""Critical-token scores of cDPO: "Critical Tokens Matter" (Lin et al., ICML 2025, arXiv 2411.19943).

A positive model (LoRA SFT of the base model on correct trajectories) and a negative model (on incorrect
ones) read the same token sequence. With ``z_pos``/``z_neg`` their logits at the position that predicts
token ``y_t``, the score of ``y_t`` is the probability of ``y_t`` under the contrastive distribution::

    s_t = softmax((1 + b)·z_pos − b·z_neg)[y_t]
        = p_pos(y_t)^(1+b) · p_neg(y_t)^(−b) / Σ_v p_pos(v)^(1+b) · p_neg(v)^(−b)

with ``b = 1`` in the released code (``calculate_ce_score`` in ``src/pipeline.py``: ``cd_logits =
2*pos_logits - 1*neg_logits``). It is normalised over the vocabulary, as in contrastive decoding; there is
no sigmoid. ``s_t`` is in (0, 1]; a low ``s_t`` flags a likely critical token: one the negative model
favours much more than the positive one. cDPO then weights rejected tokens by ``1 − s_t``
(:func:`tokenweave.losses.preference.critical_token_weights`).

Scores are stored for *completion tokens only*, as DPOTrainer tokenises the completion (its
``chosen_ids``/``rejected_ids``), not for raw positions of the official code's ``question+response``
arrays (methods.md, cDPO ambiguity 3): :mod:`tokenweave.data.token_columns` reproduces TRL's tokenisation,
and :mod:`tokenweave.inference.scoring` loads the two models and scores a dataset.

Pure tensor math, no model loading. Contents, top to bottom:

* :func:`contrastive_log_scores`: ``log s_t`` from full logits (the formula, for small inputs and tests).
* :func:`chunked_contrastive_scores`: ``s_t`` from final hidden states and LM heads, a chunk of positions at
  a time, so ``[B, T, V]`` fp32 logits are never built.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .chunked import map_masked_chunks


def contrastive_log_scores(pos_logits: Tensor, neg_logits: Tensor, targets: Tensor, b: float = 1.0) -> Tensor:
    """``log s_t = log_softmax((1 + b)·z_pos − b·z_neg)[y_t]``, in fp32 (cDPO, arXiv 2411.19943).

    ``pos_logits``/``neg_logits`` are ``[..., V]`` logits of the positive and negative models at the
    positions that predict ``targets`` (``[...]`` token ids). Returns ``[...]``. Builds the full
    ``[..., V]`` combination: use :func:`chunked_contrastive_scores` for whole sequences.
    """
    combined = (1 + b) * pos_logits.float() - b * neg_logits.float()
    return combined.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def chunked_contrastive_scores(
    pos_hidden: Tensor,
    neg_hidden: Tensor,
    pos_head: Callable[[Tensor], Tensor],
    neg_head: Callable[[Tensor], Tensor],
    targets: Tensor,
    mask: Tensor,
    *,
    b: float = 1.0,
    chunk_size: int = 256,
) -> Tensor:
    """Critical-token scores ``s_t`` from final hidden states, a chunk of positions at a time → ``[B, T]``.

    ``pos_hidden``/``neg_hidden`` are ``[B, T, H]`` hidden states (what each LM head reads) at the
    positions that predict ``targets`` (``[B, T]``); the heads map ``[N, H]`` to ``[N, V]`` logits. Same
    formula as :func:`contrastive_log_scores`, exponentiated. Only the positions where ``mask`` is set are
    computed, flattened and split into chunks of ``chunk_size``
    (:func:`tokenweave.tokens.chunked.map_masked_chunks`): peak memory is a few ``[chunk_size, V]``
    fp32 tensors. Positions outside ``mask`` are 0.
    """
    return map_masked_chunks(
        lambda pos_chunk, neg_chunk, target_chunk: contrastive_log_scores(
            pos_head(pos_chunk), neg_head(neg_chunk), target_chunk, b
        ).exp(),
        (pos_hidden, neg_hidden, targets),
        mask,
        chunk_size=chunk_size,
    )
