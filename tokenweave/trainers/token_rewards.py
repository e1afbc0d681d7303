"""Per-token rewards for a token-level preference loss (TGDPO, T-REG): the columns they are read from, and the signal
code the two share.

A token-reward signal provides ``token_rewards`` (``[2B, T]``, rows ``[chosen; rejected]``, one reward per completion
token as DPOTrainer tokenises it) to the preference loss named like it (``loss_type: tgdpo`` implies the ``tgdpo``
signal, ``treg`` the ``treg`` signal). The rewards come from two dataset columns, one value per token of
``chosen_ids`` / ``rejected_ids`` (``chosen_token_rewards_column`` / ``rejected_token_rewards_column``), written by
``tokenweave token-rewards --config <the run's config>`` (:mod:`tokenweave.pipelines.token_rewards`) with the same
reward function the signal uses online (TGDPO, with ``tgdpo_reward_model_path``, computes them online instead).

``signal_control: shuffle`` puts each completion's rewards on a random permutation of its own tokens (the same rewards,
on tokens chosen by chance: the matched random control); ``inverse`` and ``full`` do not apply (there is no selection,
and the full-token baseline of a reward is plain DPO: ``loss_type: sigmoid``). Metrics:
``token_rewards/{chosen,rejected}_mean`` and ``token_rewards/{chosen,rejected}_abs_mean`` over the completion tokens of
all processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..checks import FINITE, ConfigError, Range
from .signals import TokenBatch, TokenSignal

TOKEN_REWARDS_COMMAND = "tokenweave token-rewards --config <this config>"


@dataclass
class TokenRewardsConfig:
    """The token-reward columns of ``TokenDPOConfig`` (a mixin), read by TGDPO and T-REG."""

    chosen_token_rewards_column: str = field(
        default="chosen_token_rewards",
        metadata={"help": "tgdpo, treg: dataset column with one token reward per chosen completion token (as "
                  "`tokenweave token-rewards` writes it)."},
    )
    rejected_token_rewards_column: str = field(
        default="rejected_token_rewards",
        metadata={"help": "tgdpo, treg: dataset column with one token reward per rejected completion token."},
    )


def token_reward_columns(args) -> tuple[str, str]:
    """The chosen and rejected token-reward columns of a config."""
    return args.chosen_token_rewards_column, args.rejected_token_rewards_column


class TokenRewardsSignal(TokenSignal):
    """The token rewards of the preference loss named like the signal (module docstring); a subclass gives
    :attr:`reward_range` and, to compute them online, overrides :meth:`reads_columns` and :meth:`online_rewards`."""

    supports = frozenset({"dpo"})
    provides = frozenset({"token_rewards"})
    weighs_tokens = True
    metric_prefixes = ("token_rewards/",)
    reward_range: ClassVar[Range] = FINITE

    @classmethod
    def implied(cls, args) -> bool:
        """The rewards of ``loss_type: <name>``, unless the config lists the signals that give them."""
        return cls.name in args.loss_type and not args.token_signals

    @classmethod
    def configure(cls, args) -> bool:
        if args.signal_control in ("inverse", "full"):
            raise ConfigError(f"signal_control {args.signal_control!r}: the {cls.name} token rewards select no tokens "
                              "and have no full-token form (plain DPO is loss_type: sigmoid); use 'shuffle'.")
        return True

    @classmethod
    def reads_columns(cls, args) -> bool:
        """Whether the rewards come from the dataset's columns (else :meth:`online_rewards`)."""
        return True

    @classmethod
    def columns(cls, args) -> dict[str, tuple[str, ...]]:
        return {"token_rewards": token_reward_columns(args)} if cls.reads_columns(args) else {}

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """The columns present (else: the command that writes them), their values in :attr:`reward_range`."""
        from ..data.loading import check_token_values

        if cls.reads_columns(args):
            cls._check_columns_present(dataset.column_names, args, dataset_name)
            check_token_values(dataset, dataset_name, dict.fromkeys(token_reward_columns(args), cls.reward_range))

    @classmethod
    def prepare_dataset(cls, dataset, tokenizer, args, dataset_name: str):
        """The columns present (a dataset given to the trainer directly is not checked before)."""
        if cls.reads_columns(args):
            cls._check_columns_present(dataset.column_names or next(iter(dataset)).keys(), args, dataset_name)
        return dataset

    @classmethod
    def _check_columns_present(cls, names, args, dataset_name: str) -> None:
        missing = [name for name in token_reward_columns(args) if name not in names]
        if missing:
            raise ValueError(f"loss_type {cls.name!r}: the {dataset_name} dataset has no token-reward columns "
                             f"{missing}: write them with `{TOKEN_REWARDS_COMMAND}` and train on its output "
                             "(dataset_name: <its directory>).")

    def online_rewards(self, batch: TokenBatch) -> Tensor:
        """The rewards ``[2B, T]`` computed from the frozen models, when :meth:`reads_columns` is False."""
        raise NotImplementedError(f"the {self.name} signal reads its rewards from columns")

    def token_inputs(self, batch: TokenBatch) -> dict:
        if self.reads_columns(self.trainer.args):
            rewards = batch.columns["token_rewards"]
        else:
            rewards = self.online_rewards(batch)
        rewards = self.trainer.signal_control(rewards.float(), batch.mask, batch.row_keys)
        self._log(batch, rewards)
        return {"token_rewards": rewards}

    def _log(self, batch: TokenBatch, rewards: Tensor) -> None:
        """``token_rewards/*``: the rewards' mean and mean absolute value per side, over all processes' tokens."""
        gather = self.trainer.accelerator.gather
        metrics = self.trainer._metrics["train" if batch.training else "eval"]
        for side, side_rewards, side_mask in zip(("chosen", "rejected"), rewards.chunk(2), batch.mask.chunk(2)):
            valid = side_mask.bool()
            sums = torch.stack([side_rewards[valid].sum(), side_rewards[valid].abs().sum(),
                                valid.sum().to(side_rewards.dtype)]).detach()
            total, absolute, count = gather(sums.reshape(1, 3)).sum(0).tolist()
            metrics[f"token_rewards/{side}_mean"].append(total / count if count else 0.0)
            metrics[f"token_rewards/{side}_abs_mean"].append(absolute / count if count else 0.0)
