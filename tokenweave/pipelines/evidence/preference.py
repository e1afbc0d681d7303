"""The preference family's token rewards against ground truth: does the lowest token reward of a rejected
trajectory sit on its first error?

TGDPO's ``r̂_t = log π_DPO(y_t) − log π_ref(y_t)`` and T-REG's ``r̂_t = σ(log π(y_t | x_better) − log π(y_t |
x_worse)) − ½`` (:mod:`tokenweave.pipelines.token_rewards`) both claim to be low where a response goes wrong, as
cDPO's critical-token score does. On each seed's critical-token pairs (the same rejected trajectories as the
critical-token rows), each method's rewards rank the message tokens of the rejected trajectory, lowest first, and
the row is hit@1 against the first error (:func:`tokenweave.pipelines.localization.localization_report`), next to
the exact hit@1 of a random ranking of the same tokens. TGDPO's reward model is a DPO run on the same pairs from the
warm start (the critical config's ``cdpo_config`` with ``loss_type: sigmoid``, as the paper's is a DPO model);
T-REG's source is the warm start itself.
"""

from __future__ import annotations

from pathlib import Path

from datasets import load_from_disk

from ..localization import localization_report
from .table import Measurement

METHODS = {"tgdpo": "TGDPO", "treg": "T-REG"}


def token_reward_evidence(rewarded_by_seed: dict[int, dict[str, Path]]) -> list[Measurement]:
    """One row per method of :data:`METHODS` from each seed's rewarded pairs datasets (by method)."""
    rows = {name: Measurement(f"{label} token rewards (lowest r̂)",
                              "the lowest-rewarded message token is the first error (hit@1)",
                              "a random ranking of the same tokens (exact)", "trajectories")
            for name, label in METHODS.items()}
    for seed, datasets in sorted(rewarded_by_seed.items()):
        for name, path in datasets.items():
            report = localization_report(load_from_disk(str(path)), scores_column="rejected_token_rewards")
            for trajectory in report["trajectories"]:
                rows[name].add(seed, trajectory["scores"]["hit@1"], trajectory["random"]["hit@1"])
    return list(rows.values())
