"""Policy-gradient losses for token-aware RL: a registry of per-token losses and one shared aggregation.

Like verl's ``core_algos.py``, a loss is a plain function registered by name (``@register_policy_loss("name")``)
and looked up with :func:`get_policy_loss`. All share one signature::

    fn(logps, old_logps, advantages, mask, config, token_weights=None, entropy=None, entropy_signal=None)
        -> (per_token_loss, metrics)

    logps, old_logps  [B, T]  log-probs of the sampled tokens under π_θ (with gradient) and π_old
    advantages        [B] or [B, T]
    mask              [B, T]  1 for completion tokens that enter the loss
    config            PolicyLossConfig
    token_weights     [B, T]  multiplies the per-token loss: this is how signals of other methods combine
                              (TRL's entropy mask, off-policy mask, vLLM IS ratios, a critical-token weight ...)
    entropy           [B, T]  token entropies of π_θ (used without gradient; only hapo reads them, for ĥ when no
                              ``entropy_signal`` is given: this micro-batch's statistics, HAPO's released code)
    entropy_signal    [B, T]  HAPO's ĥ from a token signal (trainers.hapo: statistics of the whole generation batch);
                              hapo uses it, grpo / dapo / gspo only split their clip metrics by its sign

A token signal's other loss inputs (``TokenSignal.token_inputs``, e.g. Rank-GRPO's ``rank_ids`` and ``num_ranks``)
arrive as further keyword arguments, which the loss that needs them names (``rank_grpo``). Contents: the registry, :class:`PolicyLossConfig`,
:func:`aggregate_loss` and TRL's normalisers (:func:`trl_aggregate_loss`), :func:`importance_ratio`, the clipped
surrogate :func:`ppo_clip` (no method flags), HAPO's loss math (:func:`adaptive_clip_bounds`, Sec. 3.4, and
:func:`redistribute_advantage`, Sec. 3.3), and the registered losses (grpo, dapo, gspo, cispo, hapo, rank_grpo).

The per-token loss is NOT masked; :func:`aggregate_loss` applies the mask. Metrics are detached 0-dim tensors: fractions
of the local active tokens, which a trainer averages over processes, except names ending in ``_min`` / ``_max``
(TRL's ``clip_ratio/low_min``, ``clip_ratio/high_max``): the local minimum / maximum, NaN ignored, of per-sequence
fractions, which a trainer reduces with a NaN-ignoring min / max over processes (:func:`nan_extreme`), as TRL's
``nanmin`` / ``nanmax`` over the gathered sequences.

Mapping to TRL 1.16 ``GRPOTrainer._compute_loss`` (same per-token loss and, with the normaliser below, the same
number; ``GA`` = ``current_gradient_accumulation_steps`` in training, 1 in eval, ``P`` = ``num_processes``)::

    TRL loss_type                  here                   aggregate_loss(mode, normalizer)        then
    grpo                           "grpo"                 "seq-mean-token-mean", None             / GA
    grpo + importance_sampling_    "gspo"                 "seq-mean-token-mean", None             / GA
       level="sequence"
    bnpo                           "grpo"                 "token-mean", None                      / GA
    dr_grpo                        "grpo"                 "seq-mean-token-sum-norm",              / GA
                                                          B · max_completion_length
    luspo                          "grpo"                 "seq-mean-token-sum", None              / GA
    dapo                           "dapo"                 "token-mean", N_glob                    -
    cispo                          "cispo"                "token-mean", N_glob                    -

    N_glob = num_items_in_batch.clamp(min=1) / P · GA / steps_per_generation   (train; eval: .clamp(min=1) / P)

:func:`trl_aggregate_loss` is this table (:func:`trl_token_normalizer` is ``N_glob``).

``N_glob`` is the generation batch's global active-token count brought to one process and one accumulation
window: the GA micro-batch losses summed, then averaged over processes by DDP, give Σ loss / (tokens of the window),
whatever the split into micro-batches, accumulation steps and processes (with steps_per_generation > GA, TRL assumes
the windows of a generation batch hold equal token counts). HAPO (not in TRL) aggregates with token-mean as DAPO.
TRL's config maps as ``epsilon_low = args.epsilon``, ``epsilon_high = args.epsilon_high or args.epsilon``,
``delta = args.delta``; for cispo ``cispo_epsilon_max = args.epsilon_high``. TRL's ``beta`` KL term is not a policy
loss: add ``beta · per_token_kl`` to the per-token loss before aggregating.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from tokenweave.registry import Paper, lookup
from tokenweave.tokens import entropy as token_entropy
from tokenweave.tokens.ranks import rank_log_ratio

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

POLICY_LOSSES: dict[str, PolicyLossFn] = {}

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

DAPO_PAPER = Paper("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", "2503.14476", "yu2025dapo",
                   "Qiying Yu and others", 2025)
CISPO_PAPER = Paper("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", "2506.13585",
                    "minimax2025m1", "MiniMax", 2025)
GSPO_PAPER = Paper("Group Sequence Policy Optimization", "2507.18071", "zheng2025gspo", "Chujie Zheng and others", 2025)
HAPO_PAPER = Paper("Heterogeneous Adaptive Policy Optimization: Tailoring Optimization to Every Token's Nature",
                   "2509.16591", "liu2025hapo", "Liu and others", 2025)
RANK_GRPO_PAPER = Paper("Rank-GRPO: Training LLM-based Conversational Recommender Systems with Reinforcement Learning",
                        "2510.20150", "zhu2025rankgrpo", "Zhu and others", 2025)

@dataclass(frozen=True)
class PolicyLossDefaults:
    """What a registered loss's paper fixes besides its function: the trainer's settings for it, unless told
    otherwise (``TokenGRPOConfig`` applies them)."""

    loss_agg_mode: str = "token-mean"
    """The aggregation its paper uses (:func:`aggregate_loss`): the default of ``loss_agg_mode``."""
    epsilon: float | None = None
    """The lower clip range when TRL's ``epsilon`` is unset (Rank-GRPO's 0.06); None: TRL's default, 0.2."""
    epsilon_high: float | None = None
    """The upper clip range when TRL's ``epsilon_high`` is unset (DAPO's clip-higher 0.28, CISPO's ε_max 5.0);
    None: TRL's ``epsilon`` (symmetric)."""
    trl_loss_type: str | None = None
    """The TRL ``loss_type`` that computes the same loss, set as ``loss_type`` so that TRL's own checks of it agree
    with the loss that runs (HAPO with its parts off is DAPO); None: ``loss_type`` is left as given."""
    importance_sampling_level: Literal["token", "sequence"] | None = None
    """A level the loss fixes (GSPO: ``"sequence"``); None: TRL's ``importance_sampling_level``."""
    paper: Paper | None = None
    """The paper the model card cites for it (None: GRPO's, which TRL's card cites already)."""

    def __post_init__(self):
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss aggregation mode {self.loss_agg_mode!r}; expected one of {LOSS_AGG_MODES}")


POLICY_LOSS_DEFAULTS: dict[str, PolicyLossDefaults] = {}
"""The :class:`PolicyLossDefaults` of each registered loss, by name."""


def register_policy_loss(
    name: str,
    loss_agg_mode: str = "token-mean",
    *,
    epsilon: float | None = None,
    epsilon_high: float | None = None,
    trl_loss_type: str | None = None,
    importance_sampling_level: Literal["token", "sequence"] | None = None,
    paper: Paper | None = None,
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy loss under ``name`` (a name can be taken only once), with the settings its paper
    fixes (:class:`PolicyLossDefaults`: aggregation mode, default clip ranges, TRL ``loss_type``, ratio level) and the
    paper itself."""
    defaults = PolicyLossDefaults(loss_agg_mode=loss_agg_mode, epsilon=epsilon, epsilon_high=epsilon_high,
                                  trl_loss_type=trl_loss_type, importance_sampling_level=importance_sampling_level,
                                  paper=paper)

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if POLICY_LOSSES.get(name, fn) is not fn:
            raise ValueError(f"a policy loss is already registered as {name!r}")
        POLICY_LOSSES[name] = fn
        POLICY_LOSS_DEFAULTS[name] = defaults
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered as ``name``, or ``package.module:function`` (the module is imported, which
    registers a decorated function, which this name then aliases; an undecorated one is registered under this name,
    with the defaults of :func:`register_policy_loss`); ``ValueError`` listing the registered names otherwise."""
    if ":" in name and name not in POLICY_LOSSES:
        loss = lookup(name, POLICY_LOSSES, "policy loss")
        registered_as = next((key for key, value in POLICY_LOSSES.items() if value is loss), None)
        if registered_as is None:
            register_policy_loss(name)(loss)
        else:  # decorated in its module: this name is an alias, with the decorator's settings
            POLICY_LOSSES[name], POLICY_LOSS_DEFAULTS[name] = loss, POLICY_LOSS_DEFAULTS[registered_as]
        return loss
    return lookup(name, POLICY_LOSSES, "policy loss")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of the registered policy losses (paper defaults; a loss reads only the fields it needs)."""

    epsilon_low: float = 0.2
    """Lower clip range: the ratio is clipped at ``1 − epsilon_low`` (TRL ``epsilon``)."""
    epsilon_high: float = 0.28
    """Upper clip range: ``1 + epsilon_high`` (DAPO clip-higher 0.28; set it to ``epsilon_low`` for GRPO's
    symmetric clip; GSPO uses 3e-4 / 4e-4)."""
    dual_clip_c: float | None = None
    """Dual clip (arXiv 1912.09729): for A < 0 the loss is capped at ``−A · c`` (HAPO recipes: 10). ``None``: off."""
    delta: float | None = None
    """TRL's two-sided clip (INTELLECT-2): the unclipped ratio is capped at ``delta``. ``None``: off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """``"sequence"``: one ratio per sequence, exp(masked mean of the log-ratio) (GSPO); ``"gspo"`` forces it."""
    cispo_epsilon_max: float = 5.0
    """CISPO's absolute cap on the detached IS weight (TRL ``epsilon_high`` for cispo; ScaleRL: 5.0)."""
    entropy_pivot: float = 0.8
    """HAPO: quantile of the log-entropies that splits high (ĥ > 0) from low entropy."""
    released_sign: bool = False
    """HAPO: reproduce the released code's entropy signal (non-negative) instead of the paper's (see tokens.entropy)."""
    adaptive_clip: bool = True
    """HAPO: entropy-adaptive asymmetric clip bounds (:func:`adaptive_clip_bounds`)."""
    clip_alpha: float = 1.0
    """HAPO: strength of the adaptive clip bounds."""
    adaptive_advantage: bool = True
    """HAPO: differential advantage redistribution (:func:`redistribute_advantage`)."""
    adv_beta: float = 1.0
    """HAPO: strength of the advantage redistribution."""

    def __post_init__(self):
        if min(self.epsilon_low, self.epsilon_high) < 0:
            raise ValueError("epsilon_low and epsilon_high must be >= 0")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"unknown importance_sampling_level {self.importance_sampling_level!r}")
        if not 0.0 <= self.entropy_pivot <= 1.0:
            raise ValueError(f"entropy_pivot must be in [0, 1], got {self.entropy_pivot}")


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar over the masked tokens (verl's ``agg_loss`` modes).

    ``normalizer`` replaces the default divisor, e.g. a global count so that micro-batches, gradient accumulation
    and processes give the same update (see the module docstring for TRL's)::

        token-mean               Σ_{b,t} ℓ·m / (normalizer or Σ m)                  DAPO (arXiv 2503.14476)
        seq-mean-token-mean      Σ_b [Σ_t ℓ·m / Σ_t m] / (normalizer or B)          GRPO (arXiv 2402.03300)
        seq-mean-token-sum       Σ_b Σ_t ℓ·m / (normalizer or B)
        seq-mean-token-sum-norm  Σ_{b,t} ℓ·m / (normalizer or B·T)                  Dr. GRPO (arXiv 2503.20783):
                                                                                    pass B · max_completion_length
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "token-mean":
        return masked.sum() / (mask.sum().clamp(min=1.0) if normalizer is None else normalizer)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        per_seq = masked.sum(-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(-1).clamp(min=1.0)
        return per_seq.mean() if normalizer is None else per_seq.sum() / normalizer
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (per_token_loss.numel() if normalizer is None else normalizer)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}")


def trl_token_normalizer(
    num_items_in_batch: torch.Tensor, num_processes: int, accumulation_steps: int = 1, steps_per_generation: int = 1
) -> torch.Tensor:
    """TRL 1.16's dapo / cispo normaliser ``N_glob`` (``GRPOTrainer._compute_loss``): the generation batch's active
    tokens (``num_items_in_batch``, counted over all processes) brought to one process and one accumulation window::

        N_glob = max(num_items_in_batch, 1) / num_processes · accumulation_steps / steps_per_generation

    In evaluation pass ``accumulation_steps = steps_per_generation = 1`` (TRL: ``/ num_processes`` only).
    """
    normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
    return normalizer * accumulation_steps / steps_per_generation


def trl_aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    num_items_in_batch: torch.Tensor,
    num_processes: int,
    accumulation_steps: int = 1,
    steps_per_generation: int = 1,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """:func:`aggregate_loss` with TRL's normalisers, scaled for gradient accumulation as TRL's GRPO loss (the table
    in the module docstring); the result is what one micro-batch contributes (``loss_is_scaled_for_ga``).

    ``token-mean`` divides by :func:`trl_token_normalizer` ``N_glob``, which already covers one accumulation window
    of one process: Σ over the window's micro-batches, averaged over processes by DDP, is Σ ℓ / (window's tokens)
    whatever the split. The other modes are per-micro-batch means divided by ``accumulation_steps`` (TRL's grpo,
    luspo, dr_grpo; ``seq-mean-token-sum-norm`` divides by B · ``max_completion_length``). Evaluation:
    ``accumulation_steps = steps_per_generation = 1``.
    """
    if mode == "token-mean":
        normalizer = trl_token_normalizer(num_items_in_batch, num_processes, accumulation_steps, steps_per_generation)
        return aggregate_loss(per_token_loss, mask, mode, normalizer)
    normalizer = None
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: B · max_completion_length
        normalizer = per_token_loss.size(0) * max_completion_length
    return aggregate_loss(per_token_loss, mask, mode, normalizer) / accumulation_steps


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``[B, T]`` ratio π_θ/π_old per token, or per sequence exp(masked mean log-ratio) broadcast (GSPO); TRL's
    ``coef_1`` (also the bias correction of its KL term)."""
    log_ratio = logps - old_logps
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio).expand_as(logps)


def ppo_clip(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float | torch.Tensor,
    epsilon_high: float | torch.Tensor,
    delta: float | None = None,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PPO clipped surrogate per token (arXiv 1707.06347), with TRL's two-sided cap and the dual clip:
    ``(ℓ [B, T], dual-clipped tokens [B, T] or None)``.

    ::

        ℓ = −min(min(r, δ) · A, clip(r, 1 − ε_lo, 1 + ε_hi) · A)        (δ: INTELLECT-2's cap, ∞ when None)
        ℓ = min(ℓ, −A · c)   where A < 0                                 (dual clip, arXiv 1912.09729, when c is set)

    ``epsilon_low`` / ``epsilon_high`` are floats or per-token ``[B, T]`` bounds (HAPO's adaptive ones);
    ``advantages`` is ``[B, 1]`` or ``[B, T]``.
    """
    low, high = 1 - epsilon_low, 1 + epsilon_high
    if isinstance(low, torch.Tensor) != isinstance(high, torch.Tensor):  # torch.clamp takes two numbers or two tensors
        low, high = torch.as_tensor(low, dtype=ratio.dtype), torch.as_tensor(high, dtype=ratio.dtype)
    clipped_ratio = torch.clamp(ratio, low, high)
    unclipped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(unclipped_ratio * advantages, clipped_ratio * advantages)
    if dual_clip_c is None:
        return per_token_loss, None
    cap = -advantages * dual_clip_c
    dual_clipped = (advantages < 0) & (per_token_loss > cap)
    return torch.where(dual_clipped, cap, per_token_loss), dual_clipped


def adaptive_clip_bounds(
    h_hat: torch.Tensor, epsilon_low: float, epsilon_high: float, clip_alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """HAPO asymmetric adaptive clipping (arXiv 2509.16591, Sec. 3.4, ``ada_clip``): per-token ``(ε_lo, ε_hi)``.

    ::

        ε_lo(t) = ε_lo · (1 − clip_alpha · ĥ)   where ĥ ≤ 0, else ε_lo     (low entropy: wider lower bound)
        ε_hi(t) = ε_hi · (1 + clip_alpha · ĥ)   where ĥ > 0, else ε_hi     (high entropy: wider upper bound)
    """
    eps_low = torch.where(h_hat <= 0, epsilon_low * (1 - clip_alpha * h_hat), epsilon_low)
    eps_high = torch.where(h_hat > 0, epsilon_high * (1 + clip_alpha * h_hat), epsilon_high)
    return eps_low, eps_high


@torch.no_grad()
def redistribute_advantage(
    advantages: torch.Tensor,
    h_hat: torch.Tensor,
    ratio: torch.Tensor,
    epsilon_low: float | torch.Tensor,
    epsilon_high: float | torch.Tensor,
    adv_beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HAPO differential advantage redistribution (arXiv 2509.16591, Sec. 3.3, ``ada_advantage``):
    ``(A' [B, T], redistributed)``.

    ::

        neutral = (1 − ε_lo/2 < r < 1 + ε_hi/2)
        A'      = A · (1 + adv_beta · ĥ)   if (ĥ > 0 and not neutral) or (ĥ ≤ 0 and neutral)
        A'      = A                        otherwise

    High-entropy tokens whose ratio already moved get a larger advantage; low-entropy tokens still near ratio 1 get
    a smaller one (with ĥ ≤ 0). On-policy (r ≡ 1) the high-entropy branch never fires.

    Args:
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``.
        h_hat: ``[B, T]`` entropy signal.
        ratio: ``[B, T]`` importance ratio π_θ/π_old (used without gradient).
        epsilon_low, epsilon_high: clip ranges, floats or per-token ``[B, T]`` (HAPO's adaptive ones when on).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    neutral = (ratio > 1.0 - epsilon_low / 2) & (ratio < 1.0 + epsilon_high / 2)
    redistributed = torch.where(h_hat > 0, ~neutral, neutral)
    return torch.where(redistributed, advantages * (1.0 + adv_beta * h_hat), advantages), redistributed


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def nan_extreme(values: torch.Tensor, largest: bool, dim: int | None = None) -> torch.Tensor:
    """``nanmax`` (``largest``) or ``nanmin`` of ``values`` over ``dim`` (all dimensions when None): NaN ignored, and
    NaN where every value is NaN, as TRL's ``nanmin`` / ``nanmax`` (here without a host sync)."""
    fill = float("-inf") if largest else float("inf")
    filled = torch.where(values.isnan(), fill, values)
    extreme = (filled.amax if largest else filled.amin)(dim=() if dim is None else dim)
    return torch.where(extreme == fill, float("nan"), extreme)


def _clip_metrics(ratio, advantages, eps_low, eps_high, mask, h_hat) -> dict[str, torch.Tensor]:
    """TRL's clip ratios, and, given ĥ, the same split into high (ĥ > 0) and low (ĥ ≤ 0) entropy tokens.

    ``clip_ratio/low_min`` and ``clip_ratio/high_max`` are TRL's: the least / greatest per-sequence fraction of
    clipped tokens (here of this process's sequences; a trainer takes the NaN-ignoring min / max over processes).
    With one ratio per sequence (GSPO) TRL counts each sequence once, here every one of its tokens (the same
    per-sequence fractions, but an empty completion is NaN here, 0 in TRL).
    """
    low = ((ratio < 1 - eps_low) & (advantages < 0)).float()
    high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
    metrics = {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(low + high, mask),
        "clip_ratio/low_min": nan_extreme(((low * mask).sum(-1) / mask.sum(-1)).detach(), largest=False),
        "clip_ratio/high_max": nan_extreme(((high * mask).sum(-1) / mask.sum(-1)).detach(), largest=True),
    }
    if h_hat is not None:
        for name, side in (("high_entropy", h_hat > 0), ("low_entropy", h_hat <= 0)):
            metrics[f"clip_ratio/low_mean_{name}"] = _masked_mean(low, mask * side)
            metrics[f"clip_ratio/high_mean_{name}"] = _masked_mean(high, mask * side)
        metrics["entropy_signal/mean"] = _masked_mean(h_hat, mask)
    return metrics


def _clipped_surrogate(logps, old_logps, advantages, mask, config, token_weights, level, h_hat=None):
    """The clipped losses' common path: ratio at ``level``, :func:`ppo_clip` with the config's bounds, weights,
    metrics (split by ĥ when given)."""
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = importance_ratio(logps, old_logps, mask, level)
    per_token_loss, dual_clipped = ppo_clip(
        ratio, advantages, config.epsilon_low, config.epsilon_high, config.delta, config.dual_clip_c
    )
    return _weighted_with_metrics(
        per_token_loss, dual_clipped, token_weights, ratio, advantages, config.epsilon_low, config.epsilon_high,
        mask, h_hat,
    )


def _weighted_with_metrics(per_token_loss, dual_clipped, token_weights, ratio, advantages, eps_low, eps_high, mask,
                           h_hat, metrics=None):
    """``ℓ · token_weights`` and the clip metrics (dual clip included) of a :func:`ppo_clip` result."""
    metrics = {} if metrics is None else metrics
    if dual_clipped is not None:
        metrics["clip_ratio/dual_mean"] = _masked_mean(dual_clipped.float(), mask)
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights
    metrics.update(_clip_metrics(ratio, advantages, eps_low, eps_high, mask, h_hat))
    return per_token_loss, metrics


@register_policy_loss("dapo", epsilon_high=0.28, trl_loss_type="dapo", paper=DAPO_PAPER)
@register_policy_loss("grpo", loss_agg_mode="seq-mean-token-mean", trl_loss_type="grpo")
def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_signal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: ``grpo`` (arXiv 2402.03300) and ``dapo`` (clip-higher, arXiv 2503.14476).

    ::

        r = exp(logp − old_logp)                  (per sequence with importance_sampling_level="sequence")
        ℓ = ppo_clip(r, A, ε_lo, ε_hi, δ, c) · token_weights

    = TRL ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo, which share this per-token loss and differ only in
    aggregation (module docstring). ``grpo`` and ``dapo`` are the same function; DAPO is the default epsilons
    0.2 / 0.28 with token-mean aggregation. ``entropy`` is unused; an ``entropy_signal`` ĥ (from a token signal
    such as HAPO's), when given, only adds the clip metrics split by entropy side.
    """
    return _clipped_surrogate(
        logps, old_logps, advantages, mask, config, token_weights, config.importance_sampling_level, entropy_signal
    )


@register_policy_loss("gspo", loss_agg_mode="seq-mean-token-mean", trl_loss_type="grpo", importance_sampling_level="sequence",
                      paper=GSPO_PAPER)
def gspo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_signal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (arXiv 2507.18071): the clipped surrogate with one ratio per sequence.

    ::

        s_i = exp(Σ_t (logp − old_logp)·m / Σ_t m)      (gradient flows through the mean)
        ℓ_{i,t} = ppo_clip(s_i, A_i, ε_lo, ε_hi, δ, c) · token_weights   for every t of sequence i

    = TRL ``loss_type="grpo", importance_sampling_level="sequence"`` (its recipe: ε = 3e-4 / 4e-4, beta = 0),
    aggregated with ``seq-mean-token-mean``. The clip metrics count tokens (TRL's count sequences here).
    ``entropy`` and ``entropy_signal`` as for :func:`clipped_policy_loss`.
    """
    return _clipped_surrogate(logps, old_logps, advantages, mask, config, token_weights, "sequence", entropy_signal)


@register_policy_loss("cispo", epsilon_high=5.0, trl_loss_type="cispo", paper=CISPO_PAPER)
def cispo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_signal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE with a capped, detached importance weight.

    ::

        ℓ = −sg(min(r, ε_max)) · A · logp       (ε_max = config.cispo_epsilon_max; no lower bound, as TRL)

    so no token's gradient is dropped: ∂ℓ/∂logp = −min(r, ε_max) · A. = TRL ``loss_type="cispo"`` (TRL's
    ``epsilon_high`` is ε_max), aggregated with token-mean and TRL's global normaliser. ``entropy`` and
    ``entropy_signal`` are unused.
    """
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = importance_ratio(logps, old_logps, mask, config.importance_sampling_level)
    weight = torch.clamp(ratio, max=config.cispo_epsilon_max).detach()
    per_token_loss = -weight * advantages * logps
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights
    clipped = ((ratio > config.cispo_epsilon_max) & (advantages > 0)).float()
    return per_token_loss, {"cispo_clip_ratio": _masked_mean(clipped, mask)}


@register_policy_loss("hapo", epsilon_high=0.28, trl_loss_type="dapo", paper=HAPO_PAPER)
def hapo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_signal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HAPO policy loss (arXiv 2509.16591, ``compute_policy_loss`` of the official verl fork).

    ĥ = ``entropy_signal`` when given (the trainer's HAPO signal, with statistics of the whole generation batch),
    else ``tokens.entropy.entropy_signal(entropy, mask, entropy_pivot, released_sign)`` from this micro-batch (the
    released code's), then::

        ε_lo(t), ε_hi(t) = adaptive_clip_bounds(ĥ, ε_lo, ε_hi, clip_alpha)          if config.adaptive_clip
        A'               = redistribute_advantage(A, ĥ, sg(r), ε_lo(t), ε_hi(t))     if config.adaptive_advantage
        ℓ                = ppo_clip(r, A', ε_lo(t), ε_hi(t), δ, c) · token_weights

    With both components off it is exactly ``dapo`` (and needs no entropies). Paper setup: token-mean aggregation,
    dual_clip_c = 10, no KL, advantages from ``tokens.advantage.token_group_advantage``. Extra metrics:
    ``hapo/redistributed_frac``, ``entropy_signal/mean`` and the clip ratios split by entropy side.
    """
    if entropy_signal is None and entropy is not None:
        entropy_signal = token_entropy.entropy_signal(entropy, mask, config.entropy_pivot, config.released_sign)
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    h_hat = entropy_signal
    if h_hat is None and (config.adaptive_clip or config.adaptive_advantage):
        raise ValueError("HAPO's adaptive clip and advantage need the token entropies: pass `entropy` or "
                         "`entropy_signal`")
    ratio = importance_ratio(logps, old_logps, mask, config.importance_sampling_level)

    eps_low, eps_high = config.epsilon_low, config.epsilon_high
    if config.adaptive_clip:
        eps_low, eps_high = adaptive_clip_bounds(h_hat, eps_low, eps_high, config.clip_alpha)
    metrics = {}
    if config.adaptive_advantage:
        advantages, redistributed = redistribute_advantage(
            advantages, h_hat, ratio.detach(), eps_low, eps_high, config.adv_beta
        )
        metrics["hapo/redistributed_frac"] = _masked_mean(redistributed.float(), mask)
    per_token_loss, dual_clipped = ppo_clip(ratio, advantages, eps_low, eps_high, config.delta, config.dual_clip_c)
    return _weighted_with_metrics(
        per_token_loss, dual_clipped, token_weights, ratio, advantages, eps_low, eps_high, mask, h_hat, metrics
    )


@register_policy_loss("rank_grpo", epsilon=0.06, epsilon_high=0.08, trl_loss_type="dapo", paper=RANK_GRPO_PAPER)
def rank_grpo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_signal: torch.Tensor | None = None,
    rank_ids: torch.Tensor | None = None,
    num_ranks: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rank-GRPO (Zhu et al. 2025, arXiv 2510.20150): the clipped surrogate with one importance ratio per rank.

    ::

        w_{i,k}  = exp(mean_{t ∈ span(i,k)} (logp_t − old_logp_t))     tokens.ranks.rank_log_ratio (gradient
                                                                        through the mean; overflow: one more span)
        ℓ_{i,t}  = ppo_clip(w_{i,rank(t)}, A_{i,t}, ε_lo, ε_hi, δ, c) · token_weights

    ``rank_ids`` ``[B, T]`` (0..N−1, N for overflow) and ``num_ranks`` N come from the rank_grpo token signal
    (``trainers.rank``), as do the per-rank advantages ``A [B, T]``. The paper's clip is ε_lo = 0.06, ε_hi = 0.08
    (TRL ``epsilon`` / ``epsilon_high``, registered as their defaults with this loss, where TRL's ε 0.2 would clip
    at 0.8), aggregated with token-mean (the released code's bnpo is a micro-batch token
    mean; token-mean here divides by the generation batch's tokens, so the update does not depend on the split).
    Given an ``entropy_signal`` ĥ (the hapo signal, ``hapo_adaptive_clip``) and ``config.adaptive_clip``, the bounds
    are HAPO's entropy-adaptive ones (:func:`adaptive_clip_bounds`). With one span per completion (N = 1) this is
    GSPO's sequence-level ratio: TRL ``importance_sampling_level="sequence"``.
    """
    if rank_ids is None or num_ranks is None:
        raise ValueError("rank_grpo needs `rank_ids` and `num_ranks` (the rank_grpo token signal gives them)")
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(rank_log_ratio(logps, old_logps, mask, rank_ids, num_ranks))
    eps_low, eps_high = config.epsilon_low, config.epsilon_high
    if entropy_signal is not None and config.adaptive_clip:
        eps_low, eps_high = adaptive_clip_bounds(entropy_signal, eps_low, eps_high, config.clip_alpha)
    per_token_loss, dual_clipped = ppo_clip(ratio, advantages, eps_low, eps_high, config.delta, config.dual_clip_c)
    return _weighted_with_metrics(
        per_token_loss, dual_clipped, token_weights, ratio, advantages, eps_low, eps_high, mask, entropy_signal
    )
