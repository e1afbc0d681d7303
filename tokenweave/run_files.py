"""The files a run writes into its ``output_dir``, by name: one place that the trainers, ``tokenweave train`` and the
readers of finished runs (``tokenweave plot``, the pipelines) share, importing nothing heavy (no torch, no TRL), so
that a reader of runs starts in a moment."""

from __future__ import annotations

from pathlib import Path

RUN_INFO_FILE = "run_info.json"  # what the run was and what it logged (tokenweave.train.run_info)
RUN_CONFIG_FILE = "run_config.yaml"  # the config keys that made the run: `tokenweave train --config` reproduces it
RUN_IDENTITY_FILE = "run_identity.json"  # in a checkpoint: the method, losses, signals and model that trained it
TOKEN_METRICS_FILE = "token_metrics.json"  # in a checkpoint: the run's token-metric prefixes (run_info.json has them too)
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME, written last in a checkpoint
PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` directories of ``output_dir``, highest N first (complete or not)."""
    return sorted((path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if path.is_dir() and path.name.split("-")[-1].isdigit()),
                  key=lambda path: int(path.name.split("-")[-1]), reverse=True)
