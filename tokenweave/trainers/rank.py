"""Rank-GRPO's token signal: rank spans, per-rank rewards and advantages, the loss's span ids (Zhu et al. 2025,
arXiv 2510.20150, ConvRec-R1). Its loss is ``losses.policy.rank_grpo_policy_loss``.

After each generation (``after_generation``), for every completion of this process::

    text, items   = decode(completion), rank_item_parser(text)           rewards.ranking.parse_ranked_list
    rank_ids      = the rank of each token from its character offset     tokens.ranks.token_ranks (N: overflow)
    g_{i,k}       = rank_gain_func(items[:N], columns)                  rewards.ranking.relevance_rank_gains
    r_{i,k}       = causal credit of g (exp_inf or log_decay)            rewards.ranking.causal_rank_rewards
    A_{i,k}       = per-rank group advantage over the group's r_{·,k}    tokens.ranks.rank_group_advantages
                    (rewards of every process: a group may span them)
    A_{i,t}       = A_{i,rank(t)} for item tokens, 0 for overflow tokens

The EOS token's advantage is zeroed (it ends the list and belongs to no rank; the released code zeroes it, shaping
on or off), and with ``rank_length_shaping`` (the released code's) these are added to the token advantages:
``rank_overflow_penalty`` on every overflow token; on the EOS token ``rank_eos_bonus`` when the list has exactly N
items, ``rank_early_stop_penalty`` when it has fewer. A user's ``rank_item_parser`` and ``rank_gain_func`` are
checked on what they return (``rewards.ranking.checked_items``, ``checked_gains``): item starts strictly increasing
inside the text, one finite gain per item; an error names the function. The batch gets ``advantages`` ``[B, T]`` and
``rank_ids`` ``[B, T]``; ``token_inputs`` hands ``rank_ids`` and N to the rank_grpo loss. ``policy_loss: rank_grpo``
with ``epsilon`` unset clips the rank ratio at the paper's 1 − 0.06 (the loss's registered default), not TRL's 1 − 0.2. With
another policy loss (or TRL's ``loss_type``), the per-rank advantages go with that loss's own ratio (the paper's
"GRPO with rank rewards" ablation).

Metrics (training and evaluation, over all processes): ``rank/recall@N``, ``rank/ndcg@N`` (the answers' Recall@N and
NDCG@N: from the relevance hits when the rows have ``relevant_items``, whatever the gain function, else from the
gains), ``rank/items`` (items per answer), ``rank/overflow_frac`` (answers with more than N items).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..checks import AT_LEAST_ONE, FINITE
from ..losses.policy import RANK_GRPO_PAPER
from ..rewards.ranking import (
    RANK_CREDITS,
    causal_rank_rewards,
    checked_gains,
    get_item_parser,
    get_rank_gain_func,
    load_catalog,
    ndcg_at_k,
    recall_at_k,
    relevance_rank_gains,
)
from ..tokens.ranks import decode_completion, rank_group_advantages, rank_ids_tensor, token_ranks
from .rollout import Generation
from .signals import TokenBatch, TokenSignal, register_token_signal


@dataclass
class RankGrpoConfig:
    """Rank-GRPO's fields of ``TokenGRPOConfig`` (a mixin); the released code's defaults unless noted (the clip
    ranges: the ``rank_grpo`` policy loss's registered defaults)."""

    option_ranges: ClassVar[dict] = {  # tokenweave.checks reads them
        "rank_list_length": AT_LEAST_ONE, "rank_overflow_penalty": FINITE, "rank_eos_bonus": FINITE,
        "rank_early_stop_penalty": FINITE,
    }

    rank_list_length: int = field(
        default=20,
        metadata={"help": "Rank-GRPO: N, the number of ranked items an answer should have (the released code: 20)."},
    )
    rank_credit: str = field(
        default="exp_inf",
        metadata={
            "help": "Rank-GRPO: causal credit of the per-rank gains. 'exp_inf': a rank earns only its own hit (the "
            "released checkpoints); 'log_decay': DCG from rank k to N.",
            "choices": list(RANK_CREDITS),
        },
    )
    rank_gain_func: str = field(
        default="relevance",
        metadata={
            "help": "Rank-GRPO: per-rank gain function (tokenweave.rewards.ranking.RANK_GAIN_FUNCS, or "
            "'package.module:function'). 'relevance': 1 for a relevant item in the catalog, not in the user's "
            "history, not repeated (dataset columns relevant_items, history_items)."
        },
    )
    rank_catalog: str | None = field(
        default=None,
        metadata={
            "help": "Rank-GRPO: the item catalog that grounds the gains: 'recommendation' (the built-in task's) or "
            "a text file with one 'Title (Year)' per line. None: no catalog check."
        },
    )
    rank_item_parser: str | None = field(
        default=None,
        metadata={
            "help": "Rank-GRPO: 'package.module:function' splitting an answer into ranked items (text -> list of "
            "rewards.ranking.RankedItem). None: one item per non-blank line."
        },
    )
    rank_length_shaping: bool = field(
        default=True,
        metadata={"help": "Rank-GRPO: the released code's length shaping of the EOS and overflow advantages (the EOS "
                          "token's own advantage is zeroed either way, as in the released code)."},
    )
    rank_overflow_penalty: float = field(
        default=-0.1, metadata={"help": "Rank-GRPO: added to the advantage of every token past the N-th item."}
    )
    rank_eos_bonus: float = field(
        default=0.1, metadata={"help": "Rank-GRPO: the EOS token's advantage when the answer has exactly N items."}
    )
    rank_early_stop_penalty: float = field(
        default=-0.1, metadata={"help": "Rank-GRPO: the EOS token's advantage when the answer has fewer than N items."}
    )


@register_token_signal("rank_grpo")
class RankGrpoSignal(TokenSignal):
    """Rank-GRPO's rank spans and per-rank advantages (module docstring)."""

    provides = frozenset({"rank_ids", "num_ranks"})
    metric_prefixes = ("rank/",)
    option_prefixes = ("rank_",)
    paper = RANK_GRPO_PAPER

    @classmethod
    def implied(cls, args) -> bool:
        """``policy_loss: rank_grpo`` needs the span ids."""
        return args.policy_loss == "rank_grpo"

    @classmethod
    def configure(cls, args) -> bool:
        """Checks the rank fields."""
        if args.hapo_token_advantage:
            raise ValueError("hapo_token_advantage and the rank_grpo signal both set the advantages: turn one off.")
        if args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("the rank_grpo signal computes its own per-rank advantages: multi_objective_aggregation "
                             "must be 'sum_then_normalize'.")
        get_rank_gain_func(args.rank_gain_func)
        get_item_parser(args.rank_item_parser)
        return True

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """A task whose rows say how many items an answer lists (``list_length``, the built-in recommendation task)
        must ask for N of them."""
        if "list_length" not in (dataset.column_names or ()):
            return
        other = next((length for length in dataset["list_length"] if length != args.rank_list_length), None)
        if other is not None:
            raise ValueError(f"rank_list_length ({args.rank_list_length}) must equal the {dataset_name} dataset's "
                             f"list_length ({other}), the items each answer lists (the recommendation task's "
                             "task_list_length).")

    def __init__(self, trainer):
        super().__init__(trainer)
        args = trainer.args
        self.num_ranks = args.rank_list_length
        self.parser = get_item_parser(args.rank_item_parser)
        self.gain_func = get_rank_gain_func(args.rank_gain_func)
        self.catalog = load_catalog(args.rank_catalog)
        self.passes_rank_ids = args.policy_loss == "rank_grpo"

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        trainer, output, n = self.trainer, generation.output, self.num_ranks
        tokenizer = trainer._tokenizer
        completion_ids, mask = output["completion_ids"], generation.completion_mask
        device = completion_ids.device
        lengths = output["completion_mask"].sum(-1).tolist()
        item_texts, ranks, num_items = [], [], []
        for row, length in zip(completion_ids.tolist(), lengths, strict=True):
            ids = row[: int(length)]
            text = decode_completion(tokenizer, ids)
            items = self.parser(text)
            ranks.append(token_ranks(tokenizer, ids, [item.start for item in items], n))
            item_texts.append([item.text for item in items[:n]])
            num_items.append(len(items))
        columns = {key: [row[key] for row in generation.inputs] for key in generation.inputs[0] if key != "prompt"}
        gains = checked_gains(self.gain_func(item_texts, catalog=self.catalog, **columns), item_texts,
                              trainer.args.rank_gain_func)
        rewards = torch.tensor([causal_rank_rewards(g, n, trainer.args.rank_credit) for g in gains], device=device)
        rank_ids = rank_ids_tensor(ranks, completion_ids.size(1), device)

        accelerator = trainer.accelerator
        group_size = trainer.num_generations if generation.training else trainer.num_generations_eval
        all_rewards = accelerator.gather(rewards)
        advantages = rank_group_advantages(all_rewards, group_size, trainer.scale_rewards)
        advantages = advantages.view(accelerator.num_processes, -1, n)[accelerator.process_index]
        token_advantages = advantages.gather(1, rank_ids.clamp(max=n - 1)) * (rank_ids < n)
        eos = self._eos_positions(output, lengths)
        token_advantages = token_advantages.masked_fill(eos, 0.0)
        if trainer.args.rank_length_shaping:
            token_advantages = token_advantages + self._length_shaping(output, rank_ids, num_items, eos)
        self._log_metrics(generation, item_texts, gains, columns, num_items)
        out = {"advantages": token_advantages * mask}
        if self.passes_rank_ids:
            out["rank_ids"] = rank_ids
        return out

    def _eos_positions(self, output, lengths) -> torch.Tensor:
        """``[B, T]`` bool: each completion's last token where it is an EOS (a completion cut at the length limit
        has none)."""
        completion_ids, mask = output["completion_ids"], output["completion_mask"]
        device = completion_ids.device
        rows = torch.arange(completion_ids.size(0), device=device)
        last = (torch.tensor(lengths, device=device) - 1).clamp(min=0)
        eos_ids = torch.tensor(self.trainer.eos_token_ids, device=device)
        ends_with_eos = torch.isin(completion_ids[rows, last], eos_ids) & (mask.sum(-1) > 0)
        eos = torch.zeros(completion_ids.shape, dtype=torch.bool, device=device)
        eos[rows, last] = ends_with_eos
        return eos

    def _length_shaping(self, output, rank_ids, num_items, eos) -> torch.Tensor:
        """The released code's shaping (module docstring): ``[B, T]`` values added to the token advantages (the EOS
        token's own advantage already zeroed), ``eos`` the EOS positions (:meth:`_eos_positions`)."""
        args, n = self.trainer.args, self.num_ranks
        mask, device = output["completion_mask"], eos.device
        items = torch.tensor(num_items, device=device)
        eos_value = torch.where(items == n, args.rank_eos_bonus, 0.0) + torch.where(
            items < n, args.rank_early_stop_penalty, 0.0
        )
        overflow = (rank_ids >= n) & mask.bool()
        return args.rank_overflow_penalty * overflow + eos * eos_value.unsqueeze(1)

    def _log_metrics(self, generation: Generation, item_texts, gains, columns, num_items) -> None:
        """Recall@N and NDCG@N of the answers (from the relevance hits when the rows have ``relevant_items``, else
        from the gains), items per answer and the share with overflow, averaged over all processes."""
        n, relevant = self.num_ranks, columns.get("relevant_items")
        if relevant is not None and self.gain_func is not relevance_rank_gains:  # the hits, unless they are the gains
            gains = relevance_rank_gains(item_texts, relevant, columns.get("history_items"), self.catalog)
        rows = []
        for i, answer_gains in enumerate(gains):
            num_relevant = len(relevant[i]) if relevant is not None else int(sum(answer_gains))
            rows.append([recall_at_k(answer_gains, num_relevant, n), ndcg_at_k(answer_gains, num_relevant, n),
                         float(num_items[i]), float(num_items[i] > n)])
        accelerator = self.trainer.accelerator
        means = accelerator.gather(torch.tensor(rows, device=accelerator.device)).mean(0)
        metrics = self.trainer._metrics["train" if generation.training else "eval"]
        for name, value in zip((f"rank/recall@{n}", f"rank/ndcg@{n}", "rank/items", "rank/overflow_frac"),
                               means.tolist(), strict=True):
            metrics[name].append(value)

    def token_inputs(self, batch: TokenBatch) -> dict:
        """The span ids and N for the rank_grpo loss (other losses take the per-rank advantages only)."""
        return {"rank_ids": batch.columns["rank_ids"], "num_ranks": self.num_ranks} if self.passes_rank_ids else {}
