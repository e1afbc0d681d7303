"""Progress bars that move while a batch generates (``tokenweave eval``, ``sample``, the rollout test) and while
scoring runs, not once a batch is done: a single batch of 8 prompts on a CPU took minutes at 0/8."""

from typing import ClassVar

import pytest
import torch
from datasets import Dataset

from tokenweave.inference import generation, scoring
from tokenweave.inference.evaluate import evaluate_model
from tokenweave.inference.generation import GenerationProgress, chat_prompt_ids
from tokenweave.inference.loading import load_model_and_tokenizer
from tokenweave.inference.rollout import rollout_continuations
from tokenweave.inference.sampling import sample_trajectories


class RecordingBar:
    """Stands in for tqdm: records the bar's position after each update, and how many updates came before each
    batch's end (:meth:`GenerationProgress.end_batch`)."""

    bars: ClassVar[list["RecordingBar"]] = []

    def __init__(self, total=None, desc="", unit="it", disable=False, **kwargs):
        self.total, self.desc, self.unit, self.n, self.positions, self.postfix = total, desc, unit, 0, [], ""
        self.updates_before_batch_end: list[int] = []
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.n += n
        self.positions.append(self.n)

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


@pytest.fixture
def bars(monkeypatch):
    """The bars the generation code opens (``generation.tqdm`` replaced), each recording when batches end."""
    RecordingBar.bars = []
    monkeypatch.setattr(generation, "tqdm", RecordingBar)
    end_batch = GenerationProgress.end_batch

    def recording_end_batch(self):
        self.bar.updates_before_batch_end.append(len(self.bar.positions))
        end_batch(self)

    monkeypatch.setattr(GenerationProgress, "end_batch", recording_end_batch)
    return RecordingBar.bars


def assert_moves_during_the_last_batch(bar: RecordingBar, total: int):
    """The bar advanced more than once, several times before its last batch was done, never backwards, to its
    total."""
    assert bar.total == total and bar.n == total
    assert len(bar.positions) > 1 and bar.positions == sorted(bar.positions)
    assert bar.updates_before_batch_end[-1] >= 2  # while the last batch was still generating
    assert 0 < bar.positions[0] < total


def test_eval_bar_moves_within_its_one_batch(tiny_model_cache, bars):
    evaluate_model("tiny-llama", num_examples=3, max_new_tokens=6, batch_size=32)
    bar, = bars
    assert len(bar.updates_before_batch_end) == 1  # one batch: the old bar went 0 → 3 once, at its end
    assert_moves_during_the_last_batch(bar, total=3 * 6)
    assert bar.unit == "token" and bar.postfix == "3/3 completions"


def test_sample_bar_moves_within_its_one_batch(tiny_model_cache, bars):
    sample_trajectories("tiny-llama", num_examples=2, num_samples_per_prompt=2, max_new_tokens=5, batch_size=8)
    bar, = bars
    assert_moves_during_the_last_batch(bar, total=2 * 2 * 5)
    assert bar.postfix == "4/4 completions"


def test_rollout_bar_moves_within_each_batch(tiny_model_cache, bars):
    model, tokenizer = load_model_and_tokenizer("tiny-llama")
    prefixes = chat_prompt_ids(tokenizer, [[{"role": "user", "content": "1+1"}], [{"role": "user", "content": "2+3"}]])
    rollout_continuations(model, tokenizer, prefixes, forbidden_ids=[5, 6], completion_starts=[1, 1],
                          answers=["2", "5"], num_rollouts=2, max_new_tokens=5, batch_size=2)
    bar, = bars
    assert len(bar.updates_before_batch_end) == 2  # one prefix (2 rollouts) per batch
    assert_moves_during_the_last_batch(bar, total=2 * 2 * 5)
    assert bar.updates_before_batch_end[0] >= 2  # the first batch moved the bar too before it was done


def test_generation_progress_counts_each_completions_budget_once(bars):
    # 3 completions of at most 4 tokens, EOS = 2: row 1 ends at step 1 (the rest of its budget, 3, counts at once),
    # row 2 at step 2, row 0 runs until the batch is stopped after step 3 (its last token counts at the batch's end)
    progress = GenerationProgress(3, max_new_tokens=4, eos_token_id=2, desc="test")
    prompt = torch.tensor([[7, 7], [7, 7], [7, 7]])
    progress.start_batch(prompt_width=2, rows=3)
    steps = [[5, 2, 5], [5, 2, 2], [5, 2, 2]]  # the newest token of each row at each step (EOS repeated as padding)
    ids = prompt
    for newest in steps:
        ids = torch.cat([ids, torch.tensor(newest).unsqueeze(1)], 1)
        assert not progress(ids, None).any()  # never stops a row
    progress.end_batch()
    assert progress.bar.positions == [3 + 3, 6 + 2 + 2, 10 + 1, 12]
    assert progress.done == 3 and progress.bar.postfix == "3/3 completions"


def test_scoring_bar_moves_once_per_batch(model_dir, bars, monkeypatch):
    monkeypatch.setattr(scoring, "tqdm", RecordingBar)
    positive, negative, tokenizer = scoring.load_contrastive_models(model_dir, model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{a}"}],
             "completion": [{"role": "assistant", "content": f"The answer is {2 * a}."}]} for a in range(5)]
    scoring.score_dataset(Dataset.from_list(rows), positive, negative, tokenizer, completion_columns=("completion",),
                          batch_size=2)
    bar, = bars
    assert bar.positions == [2, 4, 5]  # sequences, after each batch of 2
