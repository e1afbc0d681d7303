"""Evidence that critical-token scores pick the right tokens: localization against ground truth, and the rollout test.

Both read a scored pairs dataset (the ``pairs/`` step of :mod:`tokenweave.pipelines.critical`: ``rejected``,
``rejected_tokens``, ``rejected_scores``, ``answer`` and, for localization, the reference ``solution``). The
candidates of a rejected trajectory are its *message tokens* (:func:`tokenweave.data.token_columns.content_tokens`):
not the template tokens, not EOS, whose cDPO weight is 1 whatever its score.

* :func:`localization_report` (``tokenweave localize``): for each rejected trajectory the arithmetic task can read,
  the token of its first error (:func:`tokenweave.data.arithmetic_errors.first_error`) against the ranking of the
  message tokens by score, lowest first: hit@k and MRR (:mod:`tokenweave.tokens.localization`), next to the exact
  expectation of a random ranking of the same tokens, and how many trajectories the rule could not read (by reason);
  each readable trajectory's own values too (``trajectories``: the evidence table's units).
* :func:`rollout_report`: cDPO's own test. From the prefix just before the lowest-scored message token, continuations
  are sampled with that token forbidden (:func:`tokenweave.inference.rollout.rollout_correct_share`), and the same
  from a uniformly random message token of the same trajectory (seeded per row); the report gives the share of
  correct continuations of both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from datasets import Dataset

from ..data.arithmetic_errors import Unreadable, first_error
from ..data.token_columns import ContentTokens, content_tokens, tokenize_like_dpo
from ..inference.rollout import rollout_correct_share
from ..tokens.controls import row_generator
from ..tokens.localization import random_rank_metrics, rank_metrics

KS = (1, 3, 5)


def message_tokens(example: dict, side: str = "rejected") -> ContentTokens | None:
    """Where the message text of one pair's ``side`` lies in its scored tokens (None: not found)."""
    return content_tokens(example[f"{side}_tokens"], example[side][-1]["content"])


def first_error_token(example: dict) -> tuple[int, str] | Unreadable:
    """The index (into ``rejected_tokens``) of the token holding the first error of the rejected trajectory and the
    error's kind, or why there is none to read."""
    if example.get("solution") is None:
        return Unreadable("no reference", "the pair has no 'solution'")
    text = example["rejected"][-1]["content"]
    error = first_error(text, example["solution"])
    if isinstance(error, Unreadable):
        return error
    content = message_tokens(example)
    if content is None:
        return Unreadable("other format", "the message text is not in the scored tokens")
    if error.offset >= len(text):
        return Unreadable("no error found", "the error is the end of the text")
    return content.token_at(error.offset), error.kind


def localization_report(pairs: Dataset, ks: Sequence[int] = KS, scores_column: str = "rejected_scores") -> dict:
    """hit@k and MRR of the lowest ``scores_column`` values (one per rejected token: the critical-token scores, or
    another signal's, e.g. TGDPO's ``rejected_token_rewards``) against each rejected trajectory's first error, and of
    a random ranking of the same message tokens (module docstring)."""
    score_metrics, random_metrics, kinds, unreadable, trajectories = [], [], Counter(), Counter(), []
    for row, example in enumerate(pairs):
        located = first_error_token(example)
        if isinstance(located, Unreadable):
            unreadable[located.reason] += 1
            continue
        target, kind = located
        content = message_tokens(example)
        if len(example[scores_column]) != len(example["rejected_tokens"]):
            raise ValueError(f"Row {row}: {len(example[scores_column])} values in {scores_column!r} for "
                             f"{len(example['rejected_tokens'])} rejected tokens: not the same tokenisation.")
        candidates = example[scores_column][content.first : content.end]
        score_metrics.append(rank_metrics(candidates, target - content.first, ks))
        random_metrics.append(random_rank_metrics(len(candidates), ks))
        kinds[kind] += 1
        trajectories.append({"row": row, "kind": kind, "scores": score_metrics[-1], "random": random_metrics[-1]})
    return {
        "num_trajectories": len(pairs),
        "num_readable": len(score_metrics),
        "unreadable": dict(unreadable),
        "error_kinds": dict(kinds),
        "scores": _means(score_metrics),
        "random": _means(random_metrics),
        "trajectories": trajectories,
    }


def _means(rows: list[dict[str, float]]) -> dict[str, float | None]:
    keys = rows[0].keys() if rows else [f"hit@{k}" for k in KS] + ["rr"]
    return {("mrr" if key == "rr" else key): (sum(row[key] for row in rows) / len(rows) if rows else None) for key in keys}


def rollout_report(
    pairs: Dataset,
    model,
    tokenizer,
    *,
    num_trajectories: int,
    num_rollouts: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """cDPO's rollout test on the rejected trajectories of the first ``num_trajectories`` pairs (module docstring).

    ``tokenizer`` must be the one the pairs were scored with (the rejected tokens are re-tokenised as DPOTrainer
    does and checked against ``rejected_scores``).
    """
    prefixes, forbidden, starts, answers, tested = [], [], [], [], []
    for row in range(min(num_trajectories, len(pairs))):
        example = pairs[row]
        tokenized = tokenize_like_dpo(example, tokenizer)
        prompt_ids, ids = tokenized["prompt_ids"], tokenized["rejected_ids"]
        scores = example["rejected_scores"]
        if len(ids) != len(scores):
            raise ValueError(
                f"Row {row}: {len(scores)} rejected scores for {len(ids)} rejected tokens: the pairs were scored with "
                "another tokenizer."
            )
        content = message_tokens(example)
        if content is None:
            continue
        candidates = range(content.first, content.end)
        critical = min(candidates, key=scores.__getitem__)
        chance = candidates[int(torch.randint(len(candidates), (1,), generator=row_generator(seed, row)))]
        for position in (critical, chance):
            prefixes.append(prompt_ids + ids[:position])
            forbidden.append(ids[position])
            starts.append(len(prompt_ids))
            answers.append(example["answer"])
        tested.append(
            {"row": row, "critical_token": example["rejected_tokens"][critical],
             "random_token": example["rejected_tokens"][chance]}
        )
    shares = rollout_correct_share(
        model,
        tokenizer,
        prefixes,
        forbidden,
        starts,
        answers,
        num_rollouts=num_rollouts,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    for entry, critical_share, random_share in zip(tested, shares[0::2], shares[1::2], strict=True):
        entry |= {"critical_correct_share": critical_share, "random_correct_share": random_share}
    count = max(len(tested), 1)
    return {
        "num_trajectories": len(tested),
        "num_rollouts": num_rollouts,
        "critical_correct_share": sum(shares[0::2]) / count,
        "random_correct_share": sum(shares[1::2]) / count,
        "critical_higher": sum(e["critical_correct_share"] > e["random_correct_share"] for e in tested),
        "random_higher": sum(e["critical_correct_share"] < e["random_correct_share"] for e in tested),
        "trajectories": tested,
    }


def format_localization(report: dict) -> str:
    """One line: hit@1 / hit@3 / MRR of the scores and of a random ranking, and what could not be read."""
    if not report["num_readable"]:
        return f"no readable rejected trajectory of {report['num_trajectories']} ({report['unreadable']})"
    scores, chance = report["scores"], report["random"]
    return (
        f"hit@1 {scores['hit@1']:.2f} (random {chance['hit@1']:.2f}), hit@3 {scores['hit@3']:.2f} "
        f"(random {chance['hit@3']:.2f}), MRR {scores['mrr']:.2f} (random {chance['mrr']:.2f}) over "
        f"{report['num_readable']} of {report['num_trajectories']} rejected trajectories"
        + (f"; unreadable: {report['unreadable']}" if report["unreadable"] else "")
    )


def format_rollout(report: dict) -> str:
    """One line: the share of correct continuations at the lowest-scored token and at a random token."""
    return (
        f"{report['critical_correct_share']:.1%} of continuations correct with the lowest-scored token forbidden, "
        f"{report['random_correct_share']:.1%} with a random token forbidden ({report['num_trajectories']} "
        f"trajectories x {report['num_rollouts']} rollouts; higher at the critical token in "
        f"{report['critical_higher']}, at the random one in {report['random_higher']})"
    )
