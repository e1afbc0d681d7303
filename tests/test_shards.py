"""Sampling and scoring split over processes (``tokenweave.inference.shards``): each process computes its batches,
each batch as one process computes it. Here the processes' shares are computed one after the other in this process
(the gather is the identity per share); ``tests/distributed/test_pipeline_processes.py`` runs 2 real processes."""

import pytest
from datasets import Dataset

from tokenweave.inference.generation import generate_completions
from tokenweave.inference.scoring import score_dataset
from tokenweave.inference.shards import Shard, batch_seed

from .test_critical_scores import PAIRS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[{"role": "user", "content": "What is " + "1 + " * n + "1?"}] for n in range(7)]


def test_batches_go_round_robin_and_seeds_differ_between_runs():
    assert [list(Shard(index, 3).batches(7)) for index in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(Shard().batches(4)) == [0, 1, 2, 3]
    seeds = {batch_seed(seed, batch) for seed in range(20) for batch in range(20)}
    assert len(seeds) == 400  # seed + batch would give 39 distinct seeds
    assert batch_seed(3, 5) == batch_seed(3, 5)
    with pytest.raises(ValueError, match="not in"):
        Shard(2, 2)


class OwnShare(Shard):
    """A process's shard whose gather returns its own results only."""

    def gather(self, results: list) -> list:
        return results


def _shares(compute, count: int) -> list:
    """What ``compute(shard)`` returns for each of ``count`` processes, each gathering its own share only."""
    return [compute(OwnShare(index, count)) for index in range(count)]


def test_each_process_samples_its_batches_as_one_process_does(tiny_pair):
    positive, _, tokenizer = tiny_pair
    tokenizer.padding_side = "left"

    def sample(shard):
        return generate_completions(positive.model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=6,
                                    num_samples=2, temperature=1.0, seed=3, shard=shard)

    whole = sample(Shard())
    first, second = _shares(sample, 2)
    assert all(len(texts) == 2 for texts in whole)
    # 7 prompts, 2 per batch: batches 0, 2 (4 prompts) on process 0 and 1, 3 on process 1; each prompt in one share.
    assert sum(bool(texts) for texts in first) == 4 and sum(bool(texts) for texts in second) == 3
    assert [a or b for a, b in zip(first, second, strict=True)] == whole
    assert generate_completions(positive.model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=6, num_samples=2,
                                temperature=1.0, seed=4) != whole


def test_each_process_scores_its_batches_as_one_process_does(tiny_pair):
    positive, negative, tokenizer = tiny_pair
    dataset = Dataset.from_list(PAIRS)  # 6 sequences, 2 per batch: 3 batches

    def score(shard):
        return score_dataset(dataset, positive, negative, tokenizer, batch_size=2, shard=shard)

    whole = score(Shard())
    shares = _shares(score, 2)
    for side in ("chosen", "rejected"):
        merged = [a if a is not None else b for a, b in zip(*(share[f"{side}_scores"] for share in shares))]
        assert merged == whole[f"{side}_scores"]
    counted = [sum(values is not None for side in ("chosen", "rejected") for values in share[f"{side}_scores"])
               for share in shares]
    assert counted == [4, 2]
