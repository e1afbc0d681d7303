"""Preference pairs from the model's own trajectories, labelled correct or incorrect by a reward.

Two steps, each a dataset on disk (``tokenweave sample`` then ``tokenweave pairs``):

1. :func:`sample_trajectories`: K sampled completions per question, each labelled by
   :func:`tokenweave.rewards.math.is_correct` against the gold answer.
2. :func:`build_preference_pairs`: per question, a correct trajectory as ``chosen`` and an incorrect
   one as ``rejected``. As in cDPO (arXiv 2411.19943), the chosen trajectory comes from the most frequent
   correct final answer and the rejected one from the most frequent incorrect final answer.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from datasets import Dataset

from ..generation import generate_completions
from ..models import load_model_and_tokenizer
from ..rewards.math import extract_answer, is_correct
from .loading import load_run_dataset

SAMPLE_COLUMNS = ("question_id", "prompt", "answer", "completion", "parsed", "correct")


def sample_trajectories(
    model: str,
    *,
    adapter: str | None = None,
    task: str = "arithmetic",
    split: str = "train",
    num_examples: int | None = None,
    difficulty: str = "easy",
    task_seed: int = 0,
    num_samples_per_prompt: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 96,
    batch_size: int = 32,
    seed: int = 0,
) -> Dataset:
    """Sample ``num_samples_per_prompt`` completions per question and label each one.

    Returns a dataset with one row per trajectory: ``question_id`` (row of the task split), ``prompt``,
    ``answer`` (gold), ``completion`` (an assistant message list), ``parsed`` (the answer read from the
    completion, or None), ``correct`` and, when the task has one, the reference ``solution``. Deterministic for a given ``seed``.
    """
    if num_samples_per_prompt < 1:
        raise ValueError(f"num_samples_per_prompt must be at least 1, got {num_samples_per_prompt}.")
    dataset = load_run_dataset(task, split, "grpo", num_examples=num_examples, difficulty=difficulty, seed=task_seed)
    if "answer" not in dataset.column_names:
        raise ValueError(f"Dataset {task!r} has no 'answer' column to label trajectories with.")
    loaded_model, tokenizer = load_model_and_tokenizer(model, adapter=adapter)
    completions = generate_completions(
        loaded_model,
        tokenizer,
        list(dataset["prompt"]),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples_per_prompt,
        temperature=temperature,
        seed=seed,
        desc="sampling",
    )
    reference_solutions = dataset["solution"] if "solution" in dataset.column_names else None
    rows = []
    for question_id, (prompt, gold, texts) in enumerate(zip(dataset["prompt"], dataset["answer"], completions)):
        for text in texts:
            row = {
                "question_id": question_id,
                "prompt": prompt,
                "answer": gold,
                "completion": [{"role": "assistant", "content": text}],
                "parsed": extract_answer(text),
                "correct": is_correct(text, gold),
            }
            if reference_solutions is not None:
                row["solution"] = reference_solutions[question_id]
            rows.append(row)
    return Dataset.from_list(rows)


def build_preference_pairs(samples: Dataset, *, reference_fallback: bool = False) -> Dataset:
    """One (chosen, rejected) pair per question that has an incorrect trajectory.

    ``chosen`` is the first trajectory with the most frequent correct answer, ``rejected`` the first with
    the most frequent incorrect answer (ties: the answer seen first). A question with no correct
    trajectory is skipped, unless ``reference_fallback`` is set and ``samples`` has a ``solution`` column,
    whose reference solution then becomes ``chosen``. Columns: ``question_id``, ``prompt``, ``chosen``,
    ``rejected``, ``answer``.
    """
    missing = [column for column in SAMPLE_COLUMNS if column not in samples.column_names]
    if missing:
        raise ValueError(f"Samples dataset lacks columns {missing}; build it with `tokenweave sample`.")
    if reference_fallback and "solution" not in samples.column_names:
        raise ValueError("reference_fallback needs a 'solution' column in the samples dataset.")
    by_question: dict[int, list[dict]] = defaultdict(list)
    for row in samples:
        by_question[row["question_id"]].append(row)
    pairs = []
    for question_id, rows in by_question.items():
        rejected = _most_frequent_answer_row([row for row in rows if not row["correct"]])
        if rejected is None:
            continue
        chosen = _most_frequent_answer_row([row for row in rows if row["correct"]])
        if chosen is not None:
            chosen_completion = chosen["completion"]
        elif reference_fallback:
            chosen_completion = [{"role": "assistant", "content": rows[0]["solution"]}]
        else:
            continue
        pairs.append(
            {
                "question_id": question_id,
                "prompt": rows[0]["prompt"],
                "chosen": chosen_completion,
                "rejected": rejected["completion"],
                "answer": rows[0]["answer"],
            }
        )
    return Dataset.from_list(pairs)


def select_by_answer_frequency(rows: list[dict], *, top_p: float = 1.0, max_rows: int | None = None) -> list[dict]:
    """cDPO's choice of one question's SFT trajectories by answer frequency (arXiv 2411.19943, released pipeline).

    The rows are grouped by parsed answer, most frequent first (ties: the answer seen first). The answers kept are
    the most frequent ones until their cumulative share of ``rows`` reaches ``top_p`` (the answer that crosses it
    included); their rows are returned in their original order, or, with ``max_rows``, the first ``max_rows`` of
    them ordered by their answer's rank. cDPO's positive set is ``max_rows=1`` of the correct rows (one response
    with the most frequent correct answer), its negative set ``top_p=0.5`` of the incorrect ones.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    counts = Counter(row["parsed"] for row in rows)
    ranked = [answer for answer, _ in counts.most_common()]
    kept, covered = set(), 0
    for answer in ranked:
        kept.add(answer)
        covered += counts[answer]
        if covered >= top_p * len(rows):
            break
    selected = [row for row in rows if row["parsed"] in kept]
    if max_rows is None:
        return selected
    rank = {answer: index for index, answer in enumerate(ranked)}
    return sorted(selected, key=lambda row: rank[row["parsed"]])[:max_rows]


def _most_frequent_answer_row(rows: list[dict]) -> dict | None:
    """The first row whose parsed answer is the most frequent one among ``rows`` (None if empty)."""
    if not rows:
        return None
    return select_by_answer_frequency(rows, max_rows=1)[0]
