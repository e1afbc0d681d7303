"""AlignDistil (Zhang et al., ACL 2025, arXiv 2503.02832): the registered preference loss ``aligndistil`` and its
per-token math, a distillation from a DPO model and a reverse-DPO model with a token-adaptive logit extrapolation.

At each position ``t`` of a chosen response, with ``z_dpo``, ``z_rdpo`` and ``z_θ`` the logits of the DPO teacher, of
the reverse-DPO teacher and of the policy, ``p = softmax`` of each (no temperature), over the whole vocabulary ``v``::

    TVD_t = Σ_v |p_dpo(v) − p_rdpo(v)|                          L1, no ½ (in [0, 2]); no gradient, fp32
    w_t   = β₂·TVD_t + 1e-3                                      fp32
    z*_t  = z_dpo + w_t·(z_dpo − z_rdpo)                         the teacher's logits, extrapolated past the DPO model
    L_t   = (β / w_t) · KL( softmax(z_θ) ‖ softmax(z*_t / T) )   reverse KL; the student's logits are not divided by T
    loss  = mean over pairs of  Σ_t L_t·m_t / Σ_t m_t             the chosen response only

as the released code computes it (:func:`aligndistil_token_loss`). The defaults, the pipeline (the two teachers), the
metrics and where this differs from the released code: :mod:`tokenweave.trainers.aligndistil`.

Full-vocabulary distributions of three models at every position: :func:`chunked_aligndistil_loss` applies the three LM
heads to final hidden states a chunk of positions at a time, each chunk recomputed in the backward
(:func:`~tokenweave.tokens.chunked.map_masked_chunks`), so no ``[B, T, V]`` tensor exists;
:func:`aligndistil_loss_from_logits` is the same from full logits, for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..registry import Paper
from ..tokens.chunked import map_masked_chunks
from .preference import PreferenceLossConfig, PreferenceLossOutput, TokenPairs, register_preference_loss

ALIGNDISTIL_PAPER = Paper("AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation",
                          "2503.02832", "zhang2025aligndistil", "Songming Zhang and others", 2025)
ALIGNDISTIL_BETA2 = 10.0
"""β₂ of the released off-policy scripts (the on-policy ones: 15)."""
WEIGHT_FLOOR = 1e-3
"""The released code's floor of the extrapolation weight: w_t = β₂·TVD_t + 1e-3."""


class AlignDistilTokens(NamedTuple):
    """AlignDistil's per-position quantities (all fp32, one shape)."""

    loss: Tensor
    """L_t = (β / w_t)·KL(π_θ ‖ softmax(z*/T)), with gradient through the student's logits."""
    scale: Tensor
    """β / w_t (no gradient)."""
    tvd: Tensor
    """TVD_t = Σ_v |p_dpo − p_rdpo| (no gradient)."""


def aligndistil_token_loss(student_logits: Tensor, dpo_logits: Tensor, rdpo_logits: Tensor, *, beta: float,
                           beta2: float = ALIGNDISTIL_BETA2, temperature: float = 1.0) -> AlignDistilTokens:
    """AlignDistil at each position (module docstring): logits ``[..., V]`` of the policy, the DPO teacher and the
    reverse-DPO teacher → :class:`AlignDistilTokens` ``[...]``. The teachers are constants; the math is fp32."""
    with torch.no_grad():
        dpo, rdpo = dpo_logits.detach().float(), rdpo_logits.detach().float()
        tvd = (dpo.softmax(-1) - rdpo.softmax(-1)).abs().sum(-1)
        weight = beta2 * tvd + WEIGHT_FLOOR
        target = ((dpo + weight.unsqueeze(-1) * (dpo - rdpo)) / temperature).log_softmax(-1)
        scale = beta / weight
    student = student_logits.float().log_softmax(-1)
    kl = (student.exp() * (student - target)).sum(-1)
    return AlignDistilTokens(scale * kl, scale, tvd)


def aligndistil_loss_from_logits(student_logits: Tensor, dpo_logits: Tensor, rdpo_logits: Tensor, mask: Tensor, *,
                                 beta: float, beta2: float = ALIGNDISTIL_BETA2, temperature: float = 1.0,
                                 ) -> AlignDistilTokens:
    """:func:`aligndistil_token_loss` of full logits ``[R, T, V]`` → ``[R, T]``, 0 where ``mask`` is not set. Builds
    every model's full logits: for tests; training uses :func:`chunked_aligndistil_loss`."""
    tokens = aligndistil_token_loss(student_logits, dpo_logits, rdpo_logits, beta=beta, beta2=beta2,
                                    temperature=temperature)
    return AlignDistilTokens(*(torch.where(mask.bool(), values, 0.0) for values in tokens))


def chunked_aligndistil_loss(
    student_hidden: Tensor,
    dpo_hidden: Tensor,
    rdpo_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    dpo_head: Callable[[Tensor], Tensor],
    rdpo_head: Callable[[Tensor], Tensor],
    mask: Tensor,
    *,
    beta: float,
    beta2: float = ALIGNDISTIL_BETA2,
    temperature: float = 1.0,
    chunk_size: int = 256,
    num_chunks: int | None = None,
) -> AlignDistilTokens:
    """:func:`aligndistil_loss_from_logits` from final hidden states ``[R, T, H]`` and LM heads (``[..., H]`` →
    ``[..., V]``), a chunk of ``chunk_size`` masked positions at a time → ``[R, T]`` fp32, 0 outside ``mask``.

    Each chunk runs under ``torch.utils.checkpoint`` (TDPO's :func:`~tokenweave.losses.preference.chunked_sequential_kl`
    does the same): its ``[chunk, V]`` logits of the three models are freed after the forward and recomputed in the
    backward, so peak memory is a few ``chunk × V`` fp32 tensors. The teachers' heads run under ``no_grad``; gradients
    reach ``student_hidden`` and the student head's parameters only. ``num_chunks`` pads with empty chunks so that
    every process calls the heads as many times (under DeepSpeed ZeRO-3 a module head call is a collective).
    """
    mask = mask.bool()
    count = int(mask.sum())
    positions = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    positions[mask] = torch.arange(count, device=mask.device)
    statistics = torch.zeros(2, count, dtype=torch.float32, device=mask.device)  # scale and TVD, by masked position

    def chunk_loss(student: Tensor, dpo: Tensor, rdpo: Tensor, index: Tensor) -> Tensor:
        with torch.no_grad():
            dpo_logits, rdpo_logits = dpo_head(dpo), rdpo_head(rdpo)
        tokens = aligndistil_token_loss(student_head(student), dpo_logits, rdpo_logits, beta=beta, beta2=beta2,
                                        temperature=temperature)
        statistics[:, index] = torch.stack([tokens.scale, tokens.tvd])  # the backward's recomputation writes the same
        return tokens.loss

    loss = map_masked_chunks(chunk_loss, (student_hidden, dpo_hidden.detach(), rdpo_hidden.detach(), positions), mask,
                             chunk_size=chunk_size, num_chunks=num_chunks, checkpoint_chunks=True)
    scale, tvd = (torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) for _ in range(2))
    scale[mask], tvd[mask] = statistics
    return AlignDistilTokens(loss, scale, tvd)


@register_preference_loss("aligndistil", needs=("distillation_loss",), paper=ALIGNDISTIL_PAPER)
def aligndistil_loss(pairs: TokenPairs, config: PreferenceLossConfig, *, distillation_loss: tuple[Tensor, Tensor],
                     ) -> PreferenceLossOutput:
    """AlignDistil, off-policy (module docstring): per pair, the chosen response's token mean of ``L_t``
    (``distillation_loss``: the ``aligndistil`` signal's ``(chosen [B, T_w], rejected [B, T_l])``; the rejected half
    is not read). Rewards and logits are DPO's, detached, as TRL logs them: ``β·Σ_t m_t·(lp_t − ref_t)`` per side
    and ``β·(Δ_w − Δ_l)``; they do not enter the loss."""
    chosen_loss, _ = distillation_loss
    mask = pairs.chosen_mask.bool()
    losses = torch.where(mask, chosen_loss, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    chosen_delta, rejected_delta = (delta.detach() for delta in pairs.masked_logratios())
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=config.beta * chosen_delta,
        rejected_rewards=config.beta * rejected_delta,
        logits=config.beta * (chosen_delta - rejected_delta),
    )
