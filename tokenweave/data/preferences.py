"""Preference pairs and SFT sets from the model's own labelled trajectories: pure selection, no model.

The trajectories come from :func:`tokenweave.inference.sampling.sample_trajectories` (``tokenweave sample``): K
sampled completions per question, each labelled by :func:`tokenweave.rewards.math.is_correct` against the gold
answer, with the columns :data:`SAMPLE_COLUMNS`. Here:

* :func:`build_preference_pairs` (``tokenweave pairs``): per question, a correct trajectory as ``chosen`` and an
  incorrect one as ``rejected``. As in cDPO (arXiv 2411.19943), the chosen trajectory comes from the most frequent
  correct final answer and the rejected one from the most frequent incorrect final answer.
* :func:`build_sft_sets`: the positive and negative SFT sets of the critical-token pipeline, chosen per question
  by :func:`select_by_answer_frequency` (cDPO's choice by answer frequency).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from datasets import Dataset

# The columns of a dataset of labelled trajectories (one row per trajectory), as sample_trajectories writes them.
SAMPLE_COLUMNS = ("question_id", "prompt", "answer", "completion", "parsed", "correct")


def build_preference_pairs(samples: Dataset, *, reference_fallback: bool = False) -> Dataset:
    """One (chosen, rejected) pair per question that has an incorrect trajectory.

    ``chosen`` is the first trajectory with the most frequent correct answer, ``rejected`` the first with
    the most frequent incorrect answer (ties: the answer seen first). A question with no correct
    trajectory is skipped, unless ``reference_fallback`` is set and ``samples`` has a ``solution`` column,
    whose reference solution then becomes ``chosen``. Columns: ``question_id``, ``prompt``, ``chosen``,
    ``rejected``, ``answer``, ``chosen_source`` (``"sample"``: the model's own correct trajectory; ``"reference"``:
    the fallback), and ``solution`` when ``samples`` has it (the reference: the ground truth of
    :mod:`tokenweave.data.arithmetic_errors`).
    """
    pairs = []
    for question_id, rows in _rows_by_question(samples, reference_fallback).items():
        rejected = _most_frequent_answer_row([row for row in rows if not row["correct"]])
        if rejected is None:
            continue
        chosen = _most_frequent_answer_row([row for row in rows if row["correct"]])
        if chosen is not None:
            chosen_completion, chosen_source = chosen["completion"], "sample"
        elif reference_fallback:
            chosen_completion = [{"role": "assistant", "content": rows[0]["solution"]}]
            chosen_source = "reference"
        else:
            continue
        pair = {
            "question_id": question_id,
            "prompt": rows[0]["prompt"],
            "chosen": chosen_completion,
            "rejected": rejected["completion"],
            "answer": rows[0]["answer"],
            "chosen_source": chosen_source,
        }
        if "solution" in rows[0]:
            pair["solution"] = rows[0]["solution"]
        pairs.append(pair)
    return Dataset.from_list(pairs)


def sample_statistics(samples: Dataset) -> dict:
    """How the labelled trajectories split per question: ``num_questions``, ``num_trajectories``, ``correct_share``
    (of trajectories), and the share of questions with a correct one, an incorrect one, and ``both`` (those give a
    pair whose chosen is the model's own)."""
    by_question = _rows_by_question(samples, reference_fallback=False)
    verdicts = [[row["correct"] for row in rows] for rows in by_question.values()]
    num_questions = max(len(verdicts), 1)
    return {
        "num_questions": len(verdicts),
        "num_trajectories": len(samples),
        "correct_share": sum(map(sum, verdicts)) / max(len(samples), 1),
        "with_correct_share": sum(any(v) for v in verdicts) / num_questions,
        "with_incorrect_share": sum(not all(v) for v in verdicts) / num_questions,
        "with_both_share": sum(any(v) and not all(v) for v in verdicts) / num_questions,
    }


def pair_statistics(pairs: Dataset) -> dict:
    """``num_pairs`` and ``own_chosen_share``: the share of pairs whose chosen is the model's own correct
    trajectory (``chosen_source == "sample"``), not the reference fallback."""
    sources = pairs["chosen_source"] if "chosen_source" in pairs.column_names else []
    return {
        "num_pairs": len(pairs),
        "own_chosen_share": sum(source == "sample" for source in sources) / max(len(sources), 1),
    }


def build_sft_sets(
    samples: Dataset, *, positive_per_question: int | None, negative_top_p: float, reference_fallback: bool
) -> tuple[list[dict], list[dict]]:
    """The positive and negative SFT sets (prompt/completion rows) of cDPO's contrastive estimation, per question.

    Positive: ``positive_per_question`` correct trajectories, those with the most frequent correct answer first
    (None: all), plus, with ``reference_fallback``, every question's reference ``solution``. Negative: the incorrect
    trajectories whose answers cover ``negative_top_p`` of the question's incorrect ones
    (:func:`select_by_answer_frequency`). Rows keep the order of ``samples`` within a question.
    """
    by_question = _rows_by_question(samples, reference_fallback)
    positive, negative = [], []
    for rows in by_question.values():
        correct = [row for row in rows if row["correct"]]
        incorrect = [row for row in rows if not row["correct"]]
        positive += select_by_answer_frequency(correct, max_rows=positive_per_question)
        negative += select_by_answer_frequency(incorrect, top_p=negative_top_p)
    positive = [{"prompt": row["prompt"], "completion": row["completion"]} for row in positive]
    negative = [{"prompt": row["prompt"], "completion": row["completion"]} for row in negative]
    if reference_fallback:
        positive += [
            {"prompt": rows[0]["prompt"], "completion": [{"role": "assistant", "content": rows[0]["solution"]}]}
            for rows in by_question.values()
        ]
    return positive, negative


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


def _rows_by_question(samples: Dataset, reference_fallback: bool) -> dict[int, list[dict]]:
    """The rows of a samples dataset grouped by ``question_id`` (questions and rows in dataset order), after checking
    its columns."""
    missing = [column for column in SAMPLE_COLUMNS if column not in samples.column_names]
    if missing:
        raise ValueError(f"Samples dataset lacks columns {missing}; build it with `tokenweave sample`.")
    if reference_fallback and "solution" not in samples.column_names:
        raise ValueError("reference_fallback needs a 'solution' column in the samples dataset.")
    by_question: dict[int, list[dict]] = defaultdict(list)
    for row in samples:
        by_question[row["question_id"]].append(row)
    return by_question


def _most_frequent_answer_row(rows: list[dict]) -> dict | None:
    """The first row whose parsed answer is the most frequent one among ``rows`` (None if empty)."""
    if not rows:
        return None
    return select_by_answer_frequency(rows, max_rows=1)[0]
