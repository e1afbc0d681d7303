"""Greedy accuracy of a model on a task's test split: ``tokenweave eval``.

A completion is correct when the answer parsed from it equals the gold answer
(:func:`tokenweave.rewards.math.is_correct`). Works on a base model, a full checkpoint, or a LoRA
adapter directory (loaded on its base model).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.loading import load_run_dataset
from .loading import load_model_and_tokenizer
from ..rewards.math import extract_answer, is_correct
from .generation import generate_completions


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


def evaluate_model(
    model: str,
    *,
    adapter: str | None = None,
    task: str = "arithmetic",
    split: str = "test",
    num_examples: int | None = 200,
    difficulty: str = "easy",
    task_seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    output: str | None = None,
) -> dict:
    """Load ``model`` (and ``adapter``), score it on ``task``'s ``split``, optionally write JSON to ``output``.

    ``difficulty`` and ``task_seed`` pick a built-in task's problems, as in a run config.
    """
    dataset = load_run_dataset(task, split, "grpo", num_examples=num_examples, difficulty=difficulty, seed=task_seed)
    if "answer" not in dataset.column_names:
        raise ValueError(f"Dataset {task!r} has no 'answer' column to score against: {dataset.column_names}.")
    loaded_model, tokenizer = load_model_and_tokenizer(model, adapter=adapter)
    result = {"model": model, "adapter": adapter, "task": task, "split": split}
    result.update(
        evaluate_accuracy(
            loaded_model, tokenizer, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=f"eval {model}"
        )
    )
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result
