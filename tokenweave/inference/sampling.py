"""Labelled trajectories from a model: ``tokenweave sample``, step (a, b) of the critical-token pipeline.

:func:`sample_trajectories` samples K completions per question of a task and labels each one correct or incorrect
by the answer reward (:func:`tokenweave.rewards.math.is_correct`). Pairs and SFT sets are then chosen from them,
without a model, by :mod:`tokenweave.data.preferences`. The completions come from ``transformers``' ``generate``
(:func:`.generation.generate_completions`, split over the processes of ``accelerate launch`` by a
:class:`~.shards.Shard`) or from vLLM's offline engine (:func:`.vllm_sampling.vllm_completions`, one process); the
dataset has the same format either way.
"""

from __future__ import annotations

import torch
from datasets import Dataset

from ..checks import check_values
from ..models import resolve_model
from ..data.loading import load_run_dataset
from .loading import load_model_and_tokenizer
from ..rewards.math import extract_answer, is_correct
from .generation import generate_completions
from .shards import Shard

SAMPLERS = ("transformers", "vllm")


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
    dtype: str = "float32",
    sampler: str = "transformers",
    vllm_options: dict | None = None,
    shard: Shard = Shard(),
) -> Dataset:
    """Sample ``num_samples_per_prompt`` completions per question and label each one.

    Returns a dataset with one row per trajectory, the columns :data:`tokenweave.data.preferences.SAMPLE_COLUMNS`:
    ``question_id`` (row of the task split), ``prompt``, ``answer`` (gold), ``completion`` (an assistant message
    list), ``parsed`` (the answer read from the completion, or None), ``correct``; and, when the task has one, the
    reference ``solution``. Deterministic for a given ``seed``, and the same whatever the number of processes in
    ``shard`` (every process returns the whole dataset). ``dtype``: the model's (``float32``, ``bfloat16``,
    ``float16``). ``sampler``: ``transformers`` or ``vllm`` (``vllm_options``: the keyword arguments of
    :func:`.vllm_sampling.vllm_completions` after the sampling settings, e.g. ``tensor_parallel_size``).
    """
    check_values("tokenweave sample", num_examples=num_examples, num_samples_per_prompt=num_samples_per_prompt,
                 temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)
    dataset = load_run_dataset(task, split, "grpo", num_examples=num_examples, difficulty=difficulty, seed=task_seed)
    if "answer" not in dataset.column_names:
        raise ValueError(f"Dataset {task!r} has no 'answer' column to label trajectories with.")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if sampler == "vllm":
        from .vllm_sampling import vllm_completions

        if adapter is not None or shard.count > 1:
            raise ValueError("The vllm sampler takes a plain model (no adapter) in one process: vLLM's engine spreads "
                             "over its GPUs itself (tensor_parallel_size).")
        completions = vllm_completions(
            resolve_model(model), list(dataset["prompt"]), num_samples=num_samples_per_prompt,
            temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, dtype=dtype, **(vllm_options or {}),
        )
    else:
        loaded_model, tokenizer = load_model_and_tokenizer(model, adapter=adapter, dtype=getattr(torch, dtype))
        completions = generate_completions(
            loaded_model.to(shard.torch_device),
            tokenizer,
            list(dataset["prompt"]),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            num_samples=num_samples_per_prompt,
            temperature=temperature,
            seed=seed,
            desc="sampling",
            shard=shard,
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
