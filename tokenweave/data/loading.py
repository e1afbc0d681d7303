"""Load a run's train and test data: a built-in task or any Hugging Face dataset, checked before training.

The built-in ``arithmetic`` task is formatted for the method (SFT: prompt/completion; DPO: prompt/chosen/
rejected; GRPO: prompt/answer). The built-in ``recommendation`` task (ranked-list answers, for Rank-GRPO) has
SFT (prompt/completion) and GRPO (prompt/relevant_items/...) formats, and no preference format; so has ``gsm8k``
(the hub's ``openai/gsm8k``, formatted like the arithmetic task: :mod:`.gsm8k`). The built-in ``noisy_arithmetic``
task (:mod:`.noisy_arithmetic`: the arithmetic SFT format with planted noise in a share of the train solutions, and
the planted characters in a ``planted_spans`` column) is SFT only; its splits are ``train``, ``test`` (clean) and
``clean`` (a clean split disjoint from both, for a reference model). Any other dataset must already have the columns
the method needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

from ..checks import Range, check_values
from .arithmetic import load_arithmetic
from .gsm8k import GSM8K_CONFIG, GSM8K_HUB_ID, format_gsm8k
from .noisy_arithmetic import NOISE_KINDS, load_noisy_arithmetic
from .recommendation import load_recommendation

DEFAULT_NUM_TRAIN_EXAMPLES = 1000
DEFAULT_NUM_TEST_EXAMPLES = 200

# The built-in task's format for each method.
_ARITHMETIC_FORMAT = {"sft": "sft", "dpo": "preference", "grpo": "prompt"}
_RECOMMENDATION_FORMAT = {"sft": "sft", "grpo": "prompt"}
_GSM8K_FORMAT = {"sft": "sft", "grpo": "prompt"}
# Column sets a method accepts (any one of them), as TRL's trainers read them.
REQUIRED_COLUMNS = {
    "sft": (("messages",), ("prompt", "completion"), ("text",)),
    "dpo": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "grpo": (("prompt",),),
}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_run_dataset(
    dataset_name: str,
    split: str,
    method: str,
    *,
    dataset_config: str | None = None,
    num_examples: int | None = None,
    difficulty: str = "easy",
    seed: int = 0,
    list_length: int = 5,
    num_candidates: int = 12,
    noise_share: float = 0.3,
    noise_kinds: Sequence[str] = NOISE_KINDS,
    streaming: bool = False,
) -> Dataset | IterableDataset:
    """Load one split for ``method`` and check it has the columns that method needs.

    ``num_examples`` caps the split (built-in tasks generate exactly that many; 1000 rows for a ``train`` split, else
    200, by default). ``difficulty`` applies to the arithmetic tasks only, ``noise_share`` and ``noise_kinds`` to the
    noisy arithmetic task only (its train split), ``list_length`` and ``num_candidates`` to the recommendation task
    only; ``streaming`` (TRL's ``dataset_streaming``) reads a hub dataset or data files as they are iterated and turns
any other dataset into an iterable one; the recommendation task ignores ``difficulty`` (and has no DPO format: ``method="dpo"`` raises
    ``ValueError``; the noisy arithmetic task is SFT only). Raises ``ValueError`` naming the dataset, the split and
    the missing columns.
    """
    check_values("load_run_dataset", num_examples=num_examples)  # 0 is not "the default size"
    if dataset_name == "recommendation":
        if method not in _RECOMMENDATION_FORMAT:
            raise ValueError(
                f"The built-in recommendation task has no format for method {method!r} (it has no preference "
                f"pairs); it supports {', '.join(map(repr, _RECOMMENDATION_FORMAT))}."
            )
        default_size = DEFAULT_NUM_TRAIN_EXAMPLES if split == "train" else DEFAULT_NUM_TEST_EXAMPLES
        dataset = load_recommendation(
            split=split,
            num_examples=default_size if num_examples is None else num_examples,
            seed=seed,
            num_candidates=num_candidates,
            list_length=list_length,
            fmt=_RECOMMENDATION_FORMAT[method],
        )
    elif dataset_name == "arithmetic":
        default_size = DEFAULT_NUM_TRAIN_EXAMPLES if split == "train" else DEFAULT_NUM_TEST_EXAMPLES
        dataset = load_arithmetic(
            split=split,
            fmt=_ARITHMETIC_FORMAT[method],
            num_examples=default_size if num_examples is None else num_examples,
            difficulty=difficulty,
            seed=seed,
        )
    elif dataset_name == "noisy_arithmetic":
        if method != "sft":
            raise ValueError(f"The built-in noisy_arithmetic task is SFT only (its noise is in the SFT solutions), "
                             f"not for method {method!r}: use the arithmetic task for {method}.")
        default_size = DEFAULT_NUM_TRAIN_EXAMPLES if split == "train" else DEFAULT_NUM_TEST_EXAMPLES
        dataset = load_noisy_arithmetic(
            split=split,
            num_examples=default_size if num_examples is None else num_examples,
            difficulty=difficulty,
            seed=seed,
            noise_share=noise_share,
            noise_kinds=noise_kinds,
        )
    elif dataset_name == "gsm8k":
        if method not in _GSM8K_FORMAT:
            raise ValueError(f"The built-in gsm8k task has no format for method {method!r} (it has no preference "
                             f"pairs); it supports {', '.join(map(repr, _GSM8K_FORMAT))}.")
        dataset = _load_external(GSM8K_HUB_ID, split, GSM8K_CONFIG)
        if num_examples is not None:
            dataset = dataset.select(range(min(num_examples, len(dataset))))
        dataset = format_gsm8k(dataset, _GSM8K_FORMAT[method])
    else:
        dataset = _load_external(dataset_name, split, dataset_config, streaming=streaming)
        if num_examples is not None:
            dataset = (dataset.take(num_examples) if isinstance(dataset, IterableDataset)
                       else dataset.select(range(min(num_examples, len(dataset)))))
    if streaming and not isinstance(dataset, IterableDataset):
        dataset = dataset.to_iterable_dataset()
    check_dataset(dataset, method, f"{dataset_name} (split {split!r})")
    return dataset


def load_mixture(datasets: list[dict], method: str, *, streaming: bool = False,
                 num_examples: int | None = None) -> Dataset | IterableDataset:
    """TRL's dataset mixture (the ``datasets:`` key of a TRL or alignment-handbook recipe): each mapping loaded with
    ``datasets.load_dataset`` and the results concatenated, by ``trl.get_dataset`` itself (so ``fraction``, ``columns``
    and ``split`` mean what they mean in TRL), capped at ``num_examples`` rows, and checked as any run's data
    (:func:`check_dataset`)."""
    from trl import DatasetMixtureConfig, get_dataset

    mixture = get_dataset(DatasetMixtureConfig(datasets=[dict(config) for config in datasets], streaming=streaming))
    dataset = mixture["train"]
    if num_examples is not None:
        dataset = dataset.take(num_examples) if streaming else dataset.select(range(min(num_examples, len(dataset))))
    check_dataset(dataset, method, f"mixture of {[config['path'] for config in datasets]}")
    return dataset


STREAMED_ROWS_CHECKED = 100  # a streamed dataset has no length: its first rows are the ones checked


def checked_rows(dataset: Dataset | IterableDataset | None) -> Dataset | None:
    """The rows of ``dataset`` that checks read: all of a dataset, the first :data:`STREAMED_ROWS_CHECKED` of a
    streamed one (which has no length, and may be endless)."""
    if isinstance(dataset, IterableDataset):
        return Dataset.from_list(list(dataset.take(STREAMED_ROWS_CHECKED)))
    return dataset


def check_dataset(dataset: Dataset | IterableDataset, method: str, name: str) -> None:
    """Raise ``ValueError`` naming the dataset ``name`` (its file and split), and the row and column where there is
    one, unless it has rows, one of the column sets ``method`` accepts, and a value in every row of those columns (for
    GRPO, whose prompts are generated from, a non-empty prompt). A streamed dataset: its first
    :data:`STREAMED_ROWS_CHECKED` rows."""
    if isinstance(dataset, IterableDataset):
        name = f"{name} (its first {STREAMED_ROWS_CHECKED} rows, streamed)"
    dataset = checked_rows(dataset)
    accepted = REQUIRED_COLUMNS[method]
    matching = [columns for columns in accepted if set(columns) <= set(dataset.column_names)]
    if not matching:
        options = " or ".join("[" + ", ".join(columns) + "]" for columns in accepted)
        raise ValueError(
            f"Dataset {name} has columns {dataset.column_names}; method {method!r} needs columns {options}."
        )
    if len(dataset) == 0:
        raise ValueError(f"Dataset {name} has no rows.")
    table = dataset.with_format("arrow")[:]  # the rows as selected (dataset.data ignores a select's indices)
    for column in matching[0]:
        nulls = pc.is_null(table.column(column))
        if pc.any(nulls).as_py():
            row = pc.index(nulls, True).as_py()
            raise ValueError(f"Dataset {name}: row {row} has no value (null) in column {column!r}.")
    if method == "grpo":
        prompts = table.column("prompt")
        lengths = pc.utf8_length(prompts) if prompts.type in (pa.string(), pa.large_string()) else pc.list_value_length(prompts)
        empty = pc.equal(lengths, 0)
        if pc.any(empty).as_py():
            raise ValueError(f"Dataset {name}: row {pc.index(empty, True).as_py()} has an empty prompt; GRPO "
                             "generates from each prompt, so every prompt needs text.")


def check_token_values(dataset: Dataset, name: str, ranges: dict[str, Range]) -> None:
    """Raise ``ValueError`` naming the dataset, row, column and value unless every value of each per-token column
    present in ``dataset`` (a list of numbers per row) is finite and within its :class:`~tokenweave.checks.Range`."""
    for column, allowed in ranges.items():
        if column not in dataset.column_names:
            continue
        for row, values in enumerate(dataset[column]):
            bad = next((value for value in values or () if not allowed.holds(value)), None)
            if bad is not None:
                raise ValueError(f"Dataset {name}: row {row}, column {column!r} has the value {bad!r}; its values "
                                 f"must be {allowed}.")


def _load_external(dataset_name: str, split: str, dataset_config: str | None,
                   streaming: bool = False) -> Dataset | IterableDataset:
    path = Path(dataset_name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = load_from_disk(str(path))
    elif path.is_file() and path.suffix in _FILE_BUILDERS:
        if path.stat().st_size == 0:  # datasets' own message for an empty file does not name it
            raise ValueError(f"Dataset file {dataset_name!r} is empty: it has no rows.")
        loaded = load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), streaming=streaming)
    elif path.exists():
        loaded = load_dataset(str(path), dataset_config, streaming=streaming)
    elif dataset_name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Dataset path {dataset_name!r} does not exist.")
    else:
        loaded = load_dataset(dataset_name, dataset_config, streaming=streaming)
    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        if split not in loaded:
            raise ValueError(f"Dataset {dataset_name!r} has no split {split!r}; it has {list(loaded)}.")
        return loaded[split]
    if split != "train":  # a dataset saved without splits (every pipeline's pairs/) is its train split, only
        raise ValueError(
            f"Dataset {dataset_name!r} has no split {split!r}: it is a single dataset, which is its 'train' split. "
            "Evaluating on it would evaluate on training rows: give a dataset with that split (a DatasetDict), "
            "or leave evaluation off (eval_strategy: no)."
        )
    return loaded


def last_user_message(prompt) -> str:
    """The last user message of a conversational ``prompt`` (a plain-text prompt as it is; "" for none)."""
    if isinstance(prompt, list):
        user_messages = [message["content"] for message in prompt if message["role"] == "user"]
        return user_messages[-1] if user_messages else ""
    return prompt or ""
