"""The critical-token pipeline's sampling and scoring split over 2 processes (``tokenweave critical
--accelerate_config cpu_ddp --num_processes 2``) write the same samples (same rows) and the same scored pairs
(same rows, scores within 1e-5) as one process, for the tiny model's and SmolLM2's configs; and a rerun with the
launch flags skips every finished step.

Each config runs to its pairs in one process; the 2-process run is a copy of that work dir without ``samples/`` and
``pairs/`` (the positive and negative models are reused: only sampling and scoring differ between the runs)."""

import shutil
import sys

import pytest
import yaml
from datasets import load_from_disk

import tokenweave.pipelines.critical as pipeline
import tokenweave.pipelines.workers as workers
from tokenweave.cli import main as cli_main

from ..conftest import CONFIGS
from ..test_pipeline_critical import write_yaml
from .runs import run_subprocess

pytestmark = pytest.mark.slow

LAUNCH_FLAGS = ["--accelerate_config", "cpu_ddp", "--num_processes", "2"]
# Small runs to the pairs: no cDPO, no evidence steps; enough batches that each process gets several.
PIPELINES = {
    "tiny": ("critical_tiny.yaml", "critical_sft_tiny.yaml",
             dict(num_examples=10, num_samples_per_prompt=3, max_new_tokens=16, sample_batch_size=6,
                  score_batch_size=4)),
    "smollm2": ("critical_smollm2.yaml", "critical_sft_smollm2.yaml",
                dict(warm_start_config=None, num_examples=6, num_samples_per_prompt=3, max_new_tokens=24,
                     sample_batch_size=6, score_batch_size=4)),
}


def _pipeline_config(tmp_path, name: str, work_dir) -> str:
    config_file, sft_file, overrides = PIPELINES[name]
    sft = yaml.safe_load((CONFIGS / sft_file).read_text()) | {"max_steps": 1}
    values = yaml.safe_load((CONFIGS / config_file).read_text()) | overrides | dict(
        work_dir=str(work_dir), sft_config=str(write_yaml(tmp_path / f"{name}-sft.yaml", sft)), cdpo_config=None,
        compare_dpo=False, compare_shuffled=False, measure_localization=False, rollout_trajectories=0,
    )
    return str(write_yaml(tmp_path / f"{name}-{work_dir.name}.yaml", values))


def _critical(config: str, *flags: str) -> str:
    return run_subprocess([sys.executable, "-m", "tokenweave.cli", "critical", "--config", config, *flags],
                          timeout=1200)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_two_processes_sample_and_score_as_one_does(name, tmp_path, monkeypatch):
    one, two = tmp_path / "one-process", tmp_path / "two-processes"
    _critical(_pipeline_config(tmp_path, name, one))
    shutil.copytree(one, two)
    for step in ("samples", "pairs"):
        shutil.rmtree(two / step)
    two_config = _pipeline_config(tmp_path, name, two)
    output = _critical(two_config, *LAUNCH_FLAGS)
    for work in ("sample", "score"):
        assert all(f"[{work}] process {index} of 2 done" in output for index in range(2)), output[-3000:]

    samples = load_from_disk(str(one / "samples")).to_list()
    assert samples == load_from_disk(str(two / "samples")).to_list()
    pairs, launched_pairs = (load_from_disk(str(work / "pairs")).to_list() for work in (one, two))
    assert len(pairs) == len(launched_pairs) > 0
    for row, launched in zip(pairs, launched_pairs, strict=True):
        for column, value in row.items():
            if column.endswith("_scores"):
                assert value == pytest.approx(launched[column], rel=0, abs=1e-5), column
            else:
                assert value == launched[column], column

    # Resumable as before: with the launch flags, a rerun launches nothing (every step is done).
    def must_not_launch(*args, **kwargs):
        raise AssertionError("a finished step was launched again")

    monkeypatch.setattr(workers, "run_launched", must_not_launch)
    monkeypatch.setattr(pipeline, "run_launched", must_not_launch)
    cli_main(["critical", "--config", two_config, *LAUNCH_FLAGS])
