"""Greedy evaluation of a model on a task's test split: ``tokenweave eval``.

A task with an ``answer`` column (arithmetic): accuracy, a completion being correct when the answer parsed from it
equals the gold answer (:func:`tokenweave.rewards.math.is_correct`). A task with ``relevant_items`` (ranked-list
answers, the recommendation task): Recall@k and NDCG@k of the answers' items (:mod:`tokenweave.rewards.ranking`,
the catalog-grounded hits of Rank-GRPO). Works on a base model, a full checkpoint, or a LoRA adapter directory
(loaded on its base model).

:func:`answer_verdict` is the strict label the views put on one completion (``tokenweave attention-heatmap``): the
answer only where the completion is in the task's answer format, never the reward's fallback to the last number.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checks import check_values
from ..data.loading import load_run_dataset
from .loading import load_model_and_tokenizer
from ..rewards.math import extract_answer, format_reward, is_correct
from ..rewards.ranking import item_key, load_catalog, ndcg_at_k, parse_ranked_list, recall_at_k, relevance_gains
from .generation import generate_completions


NO_ANSWER = 'no answer (no final line "The answer is N.")'
"""The verdict of a completion that is not in the task's answer format (:func:`answer_verdict`)."""


def answer_verdict(text: str, gold: str) -> str:
    """What a completion is, for a label a reader trusts: ``"correct: N"`` or ``"incorrect: N, gold G"`` when ``text``
    ends with the task's answer line "The answer is N." (:func:`~tokenweave.rewards.math.format_reward`; ``N`` then
    compared with ``gold`` as the correctness reward compares it), else :data:`NO_ANSWER`.

    Stricter than the accuracy of :func:`evaluate_accuracy` and the rewards (unchanged): without the answer phrase they
    read the last number of the text, so gibberish that ends on the gold number counts as correct there."""
    if not format_reward([None], [text])[0]:
        return NO_ANSWER
    parsed = extract_answer(text)
    return f"correct: {parsed}" if is_correct(text, gold) else f"incorrect: {parsed}, gold {gold}"


def evaluate_accuracy(model, tokenizer, dataset, *, batch_size: int = 32, max_new_tokens: int = 96, desc="eval"):
    """Greedy-decode every ``prompt`` of ``dataset`` and score it against its ``answer`` column.

    Returns ``{"accuracy", "num_correct", "num_examples", "samples"}``, where ``samples`` holds each
    question's completion, parsed answer and verdict.
    """
    completions = generate_completions(
        model, tokenizer, list(dataset["prompt"]), batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc
    )
    samples = []
    for prompt, gold, (completion,) in zip(dataset["prompt"], dataset["answer"], completions):
        samples.append(
            {
                "prompt": prompt[-1]["content"],
                "answer": gold,
                "completion": completion,
                "parsed": extract_answer(completion),
                "correct": is_correct(completion, gold),
            }
        )
    num_correct = sum(sample["correct"] for sample in samples)
    return {
        "accuracy": num_correct / max(len(samples), 1),
        "num_correct": num_correct,
        "num_examples": len(samples),
        "samples": samples,
    }


def evaluate_ranking(
    model, tokenizer, dataset, *, catalog=None, batch_size: int = 32, max_new_tokens: int = 96, desc="eval"
):
    """Greedy-decode every ``prompt`` of ``dataset`` (columns ``relevant_items``, ``history_items``,
    ``list_length``) and score each answer's first N = ``list_length`` items against its relevant items.

    Returns ``{"recall@k", "ndcg@k" for k in 1, 3 and N (the first row's list_length), "well_formed" (the share of
    answers with exactly N items, each a ``Title (Year)`` line), "num_examples", "samples"}``; every
    metric is the mean over the answers of :func:`~tokenweave.rewards.ranking.recall_at_k` /
    :func:`~tokenweave.rewards.ranking.ndcg_at_k` of the hits (:func:`~tokenweave.rewards.ranking.relevance_gains`,
    ``catalog`` checked when given).
    """
    completions = generate_completions(
        model, tokenizer, list(dataset["prompt"]), batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc
    )
    ks = sorted({1, 3, int(dataset[0]["list_length"])}) if len(dataset) else []
    samples, totals = [], {f"{name}@{k}": 0.0 for k in ks for name in ("recall", "ndcg")}
    well_formed = 0
    for row, (completion,) in zip(dataset, completions):
        n = int(row["list_length"])
        items = [item.text for item in parse_ranked_list(completion)]
        gains = relevance_gains(items[:n], row["relevant_items"], row["history_items"], catalog)
        num_relevant = len(row["relevant_items"])
        well_formed += len(items) == n and all(item_key(text) is not None for text in items)
        for k in ks:
            totals[f"recall@{k}"] += recall_at_k(gains, num_relevant, k)
            totals[f"ndcg@{k}"] += ndcg_at_k(gains, num_relevant, k)
        samples.append({"prompt": row["prompt"][-1]["content"], "relevant_items": row["relevant_items"],
                        "completion": completion, "items": items[:n], "hits": gains})
    count = max(len(samples), 1)
    return {**{name: total / count for name, total in totals.items()}, "well_formed": well_formed / count,
            "num_examples": len(samples), "samples": samples}


def evaluate_model(
    model: str,
    *,
    adapter: str | None = None,
    task: str = "arithmetic",
    split: str = "test",
    num_examples: int | None = 200,
    difficulty: str = "easy",
    task_seed: int = 0,
    list_length: int = 5,
    num_candidates: int = 12,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    output: str | None = None,
) -> dict:
    """Load ``model`` (and ``adapter``), score it on ``task``'s ``split``, optionally write JSON to ``output``.

    ``difficulty`` and ``task_seed`` pick a built-in task's problems, ``list_length`` and ``num_candidates`` the
    recommendation task's requests, as in a run config (``task_*``).
    """
    check_values("tokenweave eval", num_examples=num_examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                 task_list_length=list_length, task_num_candidates=num_candidates)
    dataset = load_run_dataset(task, split, "grpo", num_examples=num_examples, difficulty=difficulty, seed=task_seed,
                               list_length=list_length, num_candidates=num_candidates)
    ranking = {"relevant_items", "history_items", "list_length"} <= set(dataset.column_names)
    if not ranking and "answer" not in dataset.column_names:
        raise ValueError(f"Dataset {task!r} has no 'answer' column (nor relevant_items, history_items and "
                         f"list_length) to score against: {dataset.column_names}.")
    loaded_model, tokenizer = load_model_and_tokenizer(model, adapter=adapter)
    result = {"model": model, "adapter": adapter, "task": task, "split": split}
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, desc=f"eval {model}")
    if ranking:
        catalog = load_catalog("recommendation") if task == "recommendation" else None
        result.update(evaluate_ranking(loaded_model, tokenizer, dataset, catalog=catalog, **options))
    else:
        result.update(evaluate_accuracy(loaded_model, tokenizer, dataset, **options))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result
