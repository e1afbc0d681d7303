"""Token-level preference losses: token-weighted DPO (critical tokens, cDPO) and TDPO, and their registry.

Pure tensor math. Per-token inputs are ``[B, T]`` over response positions for a batch of ``B``
preference pairs, gathered in :class:`TokenPairs`; chosen and rejected come as separate tensors, each with
its own 0/1 mask (float or bool), so they may have different lengths ``T``. ``*_logps`` are the policy
log-probs of the labelled tokens and ``ref_*_logps`` the reference log-probs of the same tokens. Padded
positions are ignored whatever value they hold.

Like the policy losses (:mod:`tokenweave.losses.policy`), a preference loss is a function registered by name
(``@register_preference_loss("name", needs=...)``) and looked up with :func:`get_preference_loss`. All share
one signature::

    fn(pairs, config, **inputs) -> PreferenceLossOutput

    pairs    TokenPairs             the six per-token tensors of the batch
    config   PreferenceLossConfig   β and the method's knobs
    inputs   the extra inputs named in ``needs``, each a (chosen, rejected) pair, e.g.:
             token_weights   ([B, T_w], [B, T_l])   one weight per completion token (cDPO; from a token signal)
             sequential_kl   ([B], [B])             SeqKL = Σ_t KL(π_ref ‖ π_θ), from the final hidden states of
                                                    both models (TDPO; chunked_sequential_kl(...).sum(-1))

``needs`` is open: the DPO trainer (:class:`tokenweave.trainers.dpo.TokenDPOTrainer`) computes ``sequential_kl``
itself, and every other input must be given by a token signal that is on (the config refuses a run where none
does, before anything loads). Registered here: ``cdpo`` (needs token_weights), ``tdpo1`` and ``tdpo2`` (need
sequential_kl); in their own modules: ``tgdpo`` and ``treg`` (need token_rewards; :mod:`.tgdpo`, :mod:`.treg`),
``aligndistil``; your own, as ``@register_preference_loss`` or ``loss_type: package.module:function``. A loss reads
its own knobs from ``PreferenceLossConfig.options`` (the run's fields named ``<loss name>_...``).

Contents, top to bottom:

* ``TokenPairs``, ``PreferenceLossOutput``, ``PreferenceLossConfig``, the registry.
* ``token_weighted_dpo_loss``: DPO with a weight on every token's log-ratio (cDPO, arXiv 2411.19943).
* ``critical_token_weights``: cDPO's default weights from critical-token scores.
* ``tdpo_loss``: TDPO1 / TDPO2 (arXiv 2404.11999).
* the registered losses ``cdpo``, ``tdpo1``, ``tdpo2``.
* ``sequential_kl`` / ``chunked_sequential_kl``: TDPO's per-position KL(π_ref ‖ π_θ) over the full
  vocabulary, from logits or, chunk by chunk, from hidden states and LM heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Paper, lookup
from ..tokens.chunked import map_masked_chunks


class TokenPairs(NamedTuple):
    """The per-token tensors of a batch of ``B`` preference pairs: chosen ``[B, T_w]``, rejected ``[B, T_l]``."""

    chosen_logps: Tensor
    """Policy log-probs of the chosen completion's tokens (with gradient)."""
    rejected_logps: Tensor
    """Policy log-probs of the rejected completion's tokens (with gradient)."""
    ref_chosen_logps: Tensor
    """Reference log-probs of the same chosen tokens."""
    ref_rejected_logps: Tensor
    """Reference log-probs of the same rejected tokens."""
    chosen_mask: Tensor
    """1 (or True) at the chosen completion's tokens, 0 at padding."""
    rejected_mask: Tensor
    """1 (or True) at the rejected completion's tokens, 0 at padding."""

    def masked_logratios(self) -> tuple[Tensor, Tensor]:
        """``Δ = Σ_t m_t·(lp_t − ref_t)`` of each side, ``([B], [B])``: DPO's log-ratio of a response."""
        return (
            _masked_sum(self.chosen_logps - self.ref_chosen_logps, self.chosen_mask),
            _masked_sum(self.rejected_logps - self.ref_rejected_logps, self.rejected_mask),
        )


class PreferenceLossOutput(NamedTuple):
    """What a preference loss returns. Every field is ``[B]``; only ``losses`` carries gradients.

    ``logits`` is the argument of the log-sigmoid (``β·z`` for DPO, ``β·logits`` for TDPO): ``logits
    > 0`` means the pair is ranked the right way by the quantity the loss optimises.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    logits: Tensor


@dataclass(frozen=True)
class PreferenceLossConfig:
    """Knobs of the registered preference losses (a loss reads only the fields it needs)."""

    beta: float = 0.1
    """β, the strength of the implicit KL constraint (TRL ``beta``)."""
    label_smoothing: float = 0.0
    """cDPO: the conservative-DPO ε of TRL's ``sigmoid`` loss (``label_smoothing``; cDPO's code: 0)."""
    tdpo_alpha: float = 0.5
    """TDPO2: α, the weight of the sequential-KL difference in the margin (paper default 0.5)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The run's fields of the loss's own method, by name: those named ``<loss name>_...`` (``tgdpo_alpha`` for
    ``tgdpo``), so a registered loss reads its knobs without a field here."""


PreferenceLossFn = Callable[..., PreferenceLossOutput]

CDPO_PAPER = Paper("Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability",
                   "2411.19943", "lin2024critical", "Zicheng Lin and others", 2024)
TDPO_PAPER = Paper("Token-level Direct Preference Optimization", "2404.11999", "zeng2024token",
                   "Yongcheng Zeng and others", 2024)


class PreferenceLoss(NamedTuple):
    """A registered preference loss: its function, the extra inputs it needs (module docstring) and its paper (for
    the model card; None: none)."""

    fn: PreferenceLossFn
    needs: frozenset[str]
    paper: Paper | None = None


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str, needs: tuple[str, ...] = (), paper: Paper | None = None,
                             ) -> Callable[[PreferenceLossFn], PreferenceLossFn]:
    """Decorator: register a preference loss under ``name`` (a name can be taken only once), with the extra inputs
    it needs (the trainer's own, or a token signal's; passed as keyword arguments) and its paper."""

    def decorator(fn: PreferenceLossFn) -> PreferenceLossFn:
        if name in PREFERENCE_LOSSES and PREFERENCE_LOSSES[name].fn is not fn:
            raise ValueError(f"a preference loss is already registered as {name!r}")
        PREFERENCE_LOSSES[name] = PreferenceLoss(fn, frozenset(needs), paper)
        return fn

    return decorator


def get_preference_loss(name: str) -> PreferenceLoss:
    """The preference loss registered as ``name``, or ``package.module:function`` (the module is imported, which
    registers a decorated function, which this name then aliases; an undecorated one is registered under this name,
    needing nothing); ``ValueError`` listing the registered names otherwise."""
    if name in PREFERENCE_LOSSES:
        return PREFERENCE_LOSSES[name]
    fn = lookup(name, {key: loss.fn for key, loss in PREFERENCE_LOSSES.items()}, "preference loss")
    registered = next((loss for loss in PREFERENCE_LOSSES.values() if loss.fn is fn), None)
    PREFERENCE_LOSSES[name] = registered or PreferenceLoss(fn, frozenset())
    return PREFERENCE_LOSSES[name]


def is_preference_loss(name: str) -> bool:
    """Whether ``name`` names a token-level preference loss (registered, or ``package.module:function``), as opposed
    to one of TRL's ``loss_type`` values."""
    return name in PREFERENCE_LOSSES or ":" in name


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``Σ_t values[:, t]`` over positions where ``mask`` is set; padding is ignored even if NaN."""
    return torch.where(mask.bool(), values, 0.0).sum(-1)


def token_weighted_dpo_loss(
    pairs: TokenPairs,
    chosen_weights: Tensor | None = None,
    rejected_weights: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """DPO whose log-ratio sums weight every token: the loss of cDPO (critical tokens).

    With ``m`` the masks and ``w`` the per-token weights (``None`` means all ones)::

        z    = Σ_t m_w,t·w_w,t·(lp_w,t − ref_w,t) − Σ_t m_l,t·w_l,t·(lp_l,t − ref_l,t)
        loss = −(1 − ε)·log σ(β·z) − ε·log σ(−β·z)

    ``ε = label_smoothing`` is the conservative-DPO smoothing used by TRL's ``sigmoid`` loss
    (Mitchell, "A note on DPO with noisy preferences", 2023; not to be confused with the
    critical-token cDPO). With all weights 1 and ``ε = 0`` this is DPO (Rafailov et al., arXiv
    2305.18290). Token weights as in "Critical Tokens Matter" (Lin et al., ICML 2025, arXiv
    2411.19943), whose released trainer uses ``ε = 0``; see ``critical_token_weights``.

    Rewards are the *unweighted* DPO rewards, as cDPO's code logs them, detached:
    ``β·Σ_t m_t·(lp_t − ref_t)`` for each side. ``logits`` is ``β·z`` (detached).
    """
    chosen_logratios = pairs.chosen_logps - pairs.ref_chosen_logps
    rejected_logratios = pairs.rejected_logps - pairs.ref_rejected_logps
    if chosen_weights is None:
        chosen_weights = torch.ones_like(chosen_logratios)
    if rejected_weights is None:
        rejected_weights = torch.ones_like(rejected_logratios)
    weighted_chosen = _masked_sum(chosen_weights * chosen_logratios, pairs.chosen_mask)
    weighted_rejected = _masked_sum(rejected_weights * rejected_logratios, pairs.rejected_mask)
    logits = beta * (weighted_chosen - weighted_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_delta, rejected_delta = pairs.masked_logratios()
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_delta.detach(),
        rejected_rewards=beta * rejected_delta.detach(),
        logits=logits.detach(),
    )


def critical_token_weights(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    weight_chosen: bool = False,
    chosen_eos: Tensor | None = None,
    rejected_eos: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """cDPO's per-token weights from critical-token scores ``s_t ∈ [0, 1]`` (arXiv 2411.19943).

    ``s_t`` is the contrastive score of token ``t`` (positive vs negative model; low means likely
    critical), aligned with completion tokens. Following ``CDPOTrainer.dpo_loss`` of the official code
    (methods.md section 2, step 4)::

        chosen:   w_w,t = 1        (the shipped default, ``only_neg=True``)
                  w_w,t = s_t      (``weight_chosen=True``)
        rejected: w_l,t = 1 − s_t
        EOS:      w = 1 on both sides

    The official code appends a score of 1 to the chosen scores and of 0 to the rejected ones for the EOS
    token it adds, so the scores given at EOS are ignored. ``chosen_eos`` / ``rejected_eos`` (``[B, T]``
    bool) mark the EOS positions, e.g. ``ids == eos_token_id`` (a chat template may put tokens after EOS,
    such as ChatML's newline after ``<|im_end|>``; a truncated row may have none); ``None``: each row's
    last valid (mask set) token is its EOS. Padding gets weight 0. Returns ``(chosen_weights,
    rejected_weights)``, each ``[B, T]`` like its scores.
    """
    chosen_weights = chosen_scores if weight_chosen else torch.ones_like(chosen_scores)
    return (
        _eos_one_padding_zero(chosen_weights, chosen_mask, chosen_eos),
        _eos_one_padding_zero(1 - rejected_scores, rejected_mask, rejected_eos),
    )


def _eos_one_padding_zero(weights: Tensor, mask: Tensor, eos: Tensor | None) -> Tensor:
    """Set the weight of the EOS positions (``None``: each row's last valid token) to 1 and of padding to 0."""
    mask = mask.bool()
    if eos is None:
        positions = torch.arange(mask.shape[-1], device=mask.device)
        last_valid = torch.where(mask, positions, -1).amax(-1, keepdim=True)  # -1 for an empty row
        eos = positions == last_valid
    weights = torch.where(eos.bool(), 1.0, weights)
    return torch.where(mask, weights, 0.0)


def tdpo_loss(
    pairs: TokenPairs,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: Literal["tdpo1", "tdpo2"] = "tdpo2",
) -> PreferenceLossOutput:
    """TDPO: Token-level Direct Preference Optimization (Zeng et al., ICML 2024, arXiv 2404.11999).

    With ``Δ = Σ_t m_t·(lp_t − ref_t)`` per response and ``SeqKL = Σ_t m_t·KL(π_ref ‖ π_θ)(s_t)``
    (``[B]``, from ``sequential_kl`` or ``chunked_sequential_kl`` summed over positions)::

        TDPO1: logits = (Δ_w − Δ_l) − (SeqKL_l − SeqKL_w)
        TDPO2: logits = (Δ_w − Δ_l) − α·(SeqKL_l − stopgrad(SeqKL_w))
        loss  = −log σ(β·logits)

    ``alpha`` is used by TDPO2 only: TDPO1 has no α, as in the official ``tdpo_loss`` (which ignores
    ``alpha`` when ``if_tdpo2=False``). The default is TDPO2, the README's recommendation and the
    default of the official Python function (its yaml defaults to TDPO1). With ``alpha=0`` TDPO2 is
    exactly DPO. Rewards are the ones the paper's code logs, detached: ``β·(Δ + SeqKL)`` for each side.
    ``logits`` in the output is ``β·logits`` (detached).
    """
    chosen_logratio, rejected_logratio = pairs.masked_logratios()
    if variant == "tdpo1":
        kl_penalty = rejected_seq_kl - chosen_seq_kl
    elif variant == "tdpo2":
        kl_penalty = alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    else:
        raise ValueError(f"variant must be 'tdpo1' or 'tdpo2', got {variant!r}")
    logits = beta * (chosen_logratio - rejected_logratio - kl_penalty)
    return PreferenceLossOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=beta * (chosen_logratio + chosen_seq_kl).detach(),
        rejected_rewards=beta * (rejected_logratio + rejected_seq_kl).detach(),
        logits=logits.detach(),
    )


@register_preference_loss("cdpo", needs=("token_weights",), paper=CDPO_PAPER)
def cdpo_loss(
    pairs: TokenPairs, config: PreferenceLossConfig, *, token_weights: tuple[Tensor, Tensor]
) -> PreferenceLossOutput:
    """cDPO ("Critical Tokens Matter", arXiv 2411.19943): :func:`token_weighted_dpo_loss` with the batch's
    per-token weights (e.g. :func:`critical_token_weights` of critical-token scores) and ``label_smoothing``."""
    return token_weighted_dpo_loss(pairs, *token_weights, beta=config.beta, label_smoothing=config.label_smoothing)


@register_preference_loss("tdpo1", needs=("sequential_kl",), paper=TDPO_PAPER)
def tdpo1_loss(
    pairs: TokenPairs, config: PreferenceLossConfig, *, sequential_kl: tuple[Tensor, Tensor]
) -> PreferenceLossOutput:
    """TDPO1 (arXiv 2404.11999): :func:`tdpo_loss` with ``variant="tdpo1"`` (no α)."""
    return tdpo_loss(pairs, *sequential_kl, beta=config.beta, variant="tdpo1")


@register_preference_loss("tdpo2", needs=("sequential_kl",), paper=TDPO_PAPER)
def tdpo2_loss(
    pairs: TokenPairs, config: PreferenceLossConfig, *, sequential_kl: tuple[Tensor, Tensor]
) -> PreferenceLossOutput:
    """TDPO2 (arXiv 2404.11999): :func:`tdpo_loss` with ``variant="tdpo2"`` and ``α = config.tdpo_alpha``."""
    return tdpo_loss(pairs, *sequential_kl, beta=config.beta, alpha=config.tdpo_alpha, variant="tdpo2")


def _forward_kl(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """``Σ_v p_ref(v)·(log p_ref(v) − log p_θ(v))`` over the last dimension, in fp32.

    The reference is a constant: gradients flow through ``policy_logits`` only.
    """
    policy_logps = policy_logits.float().log_softmax(-1)
    ref_logps = ref_logits.detach().float().log_softmax(-1)
    return (ref_logps.exp() * (ref_logps - policy_logps)).sum(-1)


def sequential_kl(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """TDPO's per-position KL over the full vocabulary (arXiv 2404.11999), ``[B, T, V]`` → ``[B, T]``::

        kl_t = KL(π_ref ‖ π_θ)(s_t) = Σ_v p_ref(v|s_t)·(log p_ref(v|s_t) − log p_θ(v|s_t))

    computed in fp32 from log-softmaxed logits, 0 where ``mask`` is not set. TDPO's ``SeqKL`` is
    ``sequential_kl(...).sum(-1)`` (a sum over positions, not a mean). The reference is a constant:
    gradients flow through ``policy_logits`` only. This builds the full logits of both models; use
    ``chunked_sequential_kl`` in training.
    """
    return torch.where(mask.bool(), _forward_kl(policy_logits, ref_logits), 0.0)


def chunked_sequential_kl(
    policy_hidden: Tensor,
    ref_hidden: Tensor,
    policy_head: Callable[[Tensor], Tensor],
    ref_head: Callable[[Tensor], Tensor],
    mask: Tensor,
    chunk_size: int = 256,
    num_chunks: int | None = None,
) -> Tensor:
    """``sequential_kl`` from hidden states ``[B, T, H]``, one chunk of positions at a time → ``[B, T]``.

    Same formula as ``sequential_kl`` (TDPO, arXiv 2404.11999), with ``policy_logits =
    policy_head(policy_hidden)`` and ``ref_logits = ref_head(ref_hidden)``; the heads map ``[..., H]``
    to ``[..., V]`` logits (e.g. the models' ``lm_head`` modules).

    Only the masked positions are computed: they are flattened and split into chunks of ``chunk_size``
    (:func:`tokenweave.tokens.chunked.map_masked_chunks`). Each chunk runs under ``torch.utils.checkpoint``
    (non-reentrant), so its ``[chunk, V]`` logits are freed after the forward and recomputed in the backward:
    peak memory is about one chunk's logits (a few ``chunk_size × V`` fp32 tensors) instead of ``[B, T, V]`` for both models.
    The reference side runs under ``torch.no_grad()``; gradients reach ``policy_hidden`` and the
    policy head's parameters only.

    Each chunk calls both heads once in the forward and once more in the backward. ``num_chunks``
    (at least ``ceil(N / chunk_size)``) pads the chunks with empty ones, so that the number of head
    calls does not depend on the data: under DeepSpeed ZeRO-3 every head call gathers sharded weights
    collectively, and all processes must make the same calls.
    """

    def chunk_kl(policy_chunk: Tensor, ref_chunk: Tensor) -> Tensor:
        with torch.no_grad():
            ref_logits = ref_head(ref_chunk)
        return _forward_kl(policy_head(policy_chunk), ref_logits)

    return map_masked_chunks(
        chunk_kl,
        (policy_hidden, ref_hidden.detach()),
        mask,
        chunk_size=chunk_size,
        num_chunks=num_chunks,
        checkpoint_chunks=True,
    )
