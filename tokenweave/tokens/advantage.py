"""HAPO's token-level group-average advantage (arXiv 2509.16591, Sec. 3.2).

Official code: ``compute_hapo_outcome_advantage`` in ``verl/trainer/ppo/core_algos.py``. The differential advantage
redistribution (Sec. 3.3) is loss math, next to its adaptive clip bounds: ``losses.policy.redistribute_advantage``.
"""

import torch


def token_group_advantage(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    fallback_threshold: float = 5.0,
) -> torch.Tensor:
    """Token-level group-average advantage ``[N, T]`` (HAPO Sec. 3.2), 0 at padding.

    Every valid token of response i carries :func:`token_group_advantage_values` ``A_i``, computed with the
    lengths ``L_i = Σ_t mask``. Arguments as there, with ``mask`` the ``[N, T]`` completion mask.
    """
    lengths = mask.float().sum(-1)
    values = token_group_advantage_values(rewards, lengths, group_size, group_ids, eps, fallback_threshold)
    return values.unsqueeze(-1) * mask.float()


def token_group_advantage_values(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    fallback_threshold: float = 5.0,
) -> torch.Tensor:
    """The token-level group-average advantage ``A_i`` ``[N]`` that every token of response i carries (HAPO 3.2).

    For each prompt group g, every token of response i carries its reward r_i, and the statistics are taken over
    ALL valid tokens of the group (longer responses weigh more; σ is the population std)::

        μ_g = Σ_i L_i r_i / Σ_i L_i,   σ_g² = Σ_i L_i (r_i − μ_g)² / Σ_i L_i      (L_i: valid tokens of i)
        A_i = (r_i − μ_g) / (σ_g + eps)

    so that Σ_{i,t} A_{i,t} = 0 under token-mean aggregation. If some response of a group with L_i > 0 has |A_i| ≥
    ``fallback_threshold`` (5), the whole group falls back to the per-sequence GRPO advantage
    ``(r_i − mean_g r) / (std_unbiased_g r + eps)``. (The released code also scans padding, where its value is
    −μ/σ; that never changes the outcome when 0 lies within the group's rewards, e.g. ±1 or 0/1 rewards.)
    A NaN reward (a response no reward function scored, as TRL marks it) enters no statistic and gets A = 0.

    Args:
        rewards: ``[N]`` one scalar reward per response (NaN: unscored).
        lengths: ``[N]`` valid (completion) tokens per response.
        group_size: responses per prompt, groups being consecutive (TRL's layout). Give this or ``group_ids``.
        group_ids: ``[N]`` any integer id per response; responses with equal ids form a group.
    """
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size and group_ids")
    n = rewards.shape[0]
    if group_ids is None:
        if n % group_size:
            raise ValueError(f"{n} rewards do not split into groups of {group_size}")
        group_ids = torch.arange(n, device=rewards.device) // group_size
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1

    def group_sum(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_groups).index_add_(0, group, values)

    scored = ~torch.isnan(rewards)
    rewards = torch.where(scored, rewards.float(), 0.0)
    lengths = lengths.float() * scored

    token_count = group_sum(lengths).clamp_min(1.0)
    token_mean = group_sum(lengths * rewards) / token_count
    token_dev = rewards - token_mean[group]
    token_std = (group_sum(lengths * token_dev**2) / token_count).sqrt()
    token_adv = token_dev / (token_std[group] + eps)

    too_large = ((token_adv.abs() >= fallback_threshold) & (lengths > 0)).float()
    fallback = group_sum(too_large)[group] > 0

    seq_count = group_sum(scored.float())
    seq_dev = rewards - (group_sum(rewards) / seq_count.clamp_min(1.0))[group]
    seq_std = (group_sum(scored * seq_dev**2) / (seq_count - 1).clamp_min(1.0)).sqrt()
    grpo_adv = seq_dev / (seq_std[group] + eps)

    return torch.where(scored, torch.where(fallback, grpo_adv, token_adv), 0.0)
