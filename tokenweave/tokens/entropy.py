"""HAPO's entropy signal ĥ and its entropy-adaptive sampling temperature (Liu et al. 2025, arXiv 2509.16591).

The signal (official code: ``compute_entropy_h`` in ``verl/trainer/ppo/core_algos.py``), over the valid tokens of
a batch, with ``H`` the entropy of the policy at each token::

    l     = log(clamp(H, 1e-8))
    pivot = quantile_nearest(l[valid], entropy_pivot)           # index round(q·(n−1)) of the sorted values
    rms   = sqrt(clamp(mean_valid((l − pivot)²), 1e-8))         # RMS around the pivot, not a standard deviation
    z     = (l − pivot) / rms
    ĥ     = z / max(z)        where z > 0                       # in (0, 1]
    ĥ     = z / |min(z)|      where z ≤ 0                       # in [−1, 0]: NEGATIVE below the pivot (paper)

The released code multiplies the negative side by ``1 / min(z)`` instead, which makes it NON-NEGATIVE: the lowest
entropies get ĥ ≈ 1 like the highest ones, so every "low entropy" branch of HAPO almost never fires.
``released_sign=True`` reproduces that behaviour; the default follows the paper's text.

The four numbers ``(pivot, rms, scale_pos, scale_neg)`` are an :class:`EntropyStats`: computed on one batch, they
can be applied to another. HAPO's rollout uses the PREVIOUS step's statistics to pick, at every decoding step, the
temperature ``T = T_base · (1 + τ · clamp(ĥ, −1, 1))`` (:func:`adaptive_temperature`; the logits processor that
applies it in ``generate`` is ``trainers.hapo.AdaptiveTemperatureLogitsProcessor``, since this layer imports no
transformers).
"""

from dataclasses import dataclass

import torch

_EPS = 1e-8


@dataclass(frozen=True)
class EntropyStats:
    """Statistics of one batch's log-entropies, applicable to other entropies (0-dim tensors).

    ``scale_neg`` carries the sign convention: ``1/|min z|`` (paper) or ``1/min z`` (released code).
    """

    pivot: torch.Tensor
    rms: torch.Tensor
    scale_pos: torch.Tensor
    scale_neg: torch.Tensor

    @torch.no_grad()
    def signal(self, entropy: torch.Tensor) -> torch.Tensor:
        """ĥ of any entropies (any shape) under these statistics; not clamped, not masked, no gradient."""
        z = (torch.log(entropy.float().clamp_min(_EPS)) - self.pivot) / self.rms
        return torch.where(z > 0, z * self.scale_pos, z * self.scale_neg)


@torch.no_grad()
def entropy_stats(
    entropy: torch.Tensor, mask: torch.Tensor, entropy_pivot: float = 0.8, released_sign: bool = False
) -> EntropyStats:
    """Pivot, RMS and the two side scales of the entropy signal over the valid tokens (see module docstring).

    With no valid token (a batch whose completions are all masked, as TRL's ``mask_truncated_completions`` masks
    the truncated ones), the statistics are neutral: ĥ = 0 for every entropy, so the next generation samples at
    ``T_base``, as the first one does.

    Args:
        entropy: ``[B, T]`` token entropies ``H ≥ 0``.
        mask: ``[B, T]`` 1 for valid tokens, 0 for padding.
        entropy_pivot: quantile of the log-entropies taken as the pivot (HAPO: 0.8).
        released_sign: use the released code's ``1/min z`` negative scale instead of the paper's ``1/|min z|``.
    """
    if not 0.0 <= entropy_pivot <= 1.0:
        raise ValueError(f"entropy_pivot must be in [0, 1], got {entropy_pivot}")
    valid = mask.bool()
    log_entropy = torch.log(entropy.float().clamp_min(_EPS))
    values = log_entropy[valid]
    if values.numel() == 0:  # no token (every completion masked, e.g. truncated): statistics under which ĥ = 0
        zero = log_entropy.new_zeros(())
        return EntropyStats(pivot=zero, rms=zero + 1.0, scale_pos=zero, scale_neg=zero)
    # 'nearest' quantile, exactly as the official torch_quantile (Python round, half to even)
    pivot = values.kthvalue(round(entropy_pivot * (values.numel() - 1)) + 1).values
    centred = (log_entropy - pivot).masked_fill(~valid, 0.0)
    rms = (centred.pow(2).sum() / valid.sum().clamp_min(1)).clamp_min(_EPS).sqrt()
    z = centred / rms  # padding sits at 0, so it cannot move max(z) > 0 or min(z) < 0
    pos_max = z.max().clamp_min(_EPS)
    neg_min = z.min().clamp_max(-_EPS)
    scale_neg = 1.0 / neg_min if released_sign else -1.0 / neg_min
    return EntropyStats(pivot=pivot, rms=rms, scale_pos=1.0 / pos_max, scale_neg=scale_neg)


def entropy_signal(
    entropy: torch.Tensor, mask: torch.Tensor, entropy_pivot: float = 0.8, released_sign: bool = False
) -> torch.Tensor:
    """HAPO's per-token entropy signal ĥ ``[B, T]`` from this batch's own statistics; 0 at padding, no gradient.

    In ``[−1, 1]`` with ĥ ≤ 0 at or below the pivot (paper), or in ``[0, 1]`` with ``released_sign=True``.
    """
    stats = entropy_stats(entropy, mask, entropy_pivot, released_sign)
    return stats.signal(entropy).masked_fill(~mask.bool(), 0.0)


def adaptive_temperature(
    entropy: torch.Tensor, stats: EntropyStats | None, base_temperature: float = 1.0, tau: float = 0.05
) -> torch.Tensor:
    """HAPO adaptive sampling temperature ``T = T_base · (1 + τ · clamp(ĥ, −1, 1))`` (arXiv 2509.16591, Sec. 3.1).

    ``ĥ`` is ``stats.signal(entropy)`` with the previous step's statistics; with no statistics yet (first step)
    the temperature is ``T_base``. The released sampler divides by ``rms + 1e-6`` and clamps ``H`` at 1e-6 instead
    of 1e-8: the difference is below 1e-5 relative.
    """
    if stats is None:
        return torch.full(entropy.shape, base_temperature, dtype=torch.float32, device=entropy.device)
    return base_temperature * (1.0 + tau * stats.signal(entropy).clamp(-1.0, 1.0))


@torch.no_grad()
def adaptive_temperature_logits(
    logits: torch.Tensor, stats: EntropyStats | None, base_temperature: float = 1.0, tau: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of HAPO's adaptive sampling: ``(logits / T, T)`` per row of ``[R, V]`` logits.

    ``H = entropy(softmax(logits / T_base))`` (the entropy at the base temperature, as the statistics' entropies are;
    the released sampler, with T_base = 1, takes it on the raw logits), ``T = adaptive_temperature(H, stats, T_base,
    τ)`` ``[R]``. ``-inf`` logits (masked tokens) stay ``-inf`` and add nothing to ``H``. The one formula of both
    samplers: ``trainers.hapo.AdaptiveTemperatureLogitsProcessor`` (transformers) and
    ``trainers.hapo_vllm.HapoTemperatureProcessor`` (vLLM).
    """
    probs = torch.softmax(logits.float() / base_temperature, dim=-1)
    entropy = torch.special.entr(probs).sum(-1)  # entr(0) = 0 for −inf logits
    temperature = adaptive_temperature(entropy, stats, base_temperature, tau)
    return logits / temperature.unsqueeze(-1).to(logits.dtype), temperature
