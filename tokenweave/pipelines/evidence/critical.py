"""Critical tokens' ground truth: the first-error localization and cDPO's rollout test, per seed, as evidence rows.

Each seed's critical-token pipeline (:mod:`tokenweave.pipelines.critical`, with its ``localization`` and ``rollout``
steps and no training after them) writes the two reports this module reads (:mod:`tokenweave.pipelines.localization`):

* **localization**: per readable rejected trajectory, hit@1 of the lowest-scored message token against the first
  error, next to the exact hit@1 of a random ranking of the same tokens (``1 / n``);
* **rollout**: per tested rejected trajectory, the share of correct continuations with the lowest-scored message
  token forbidden, next to the same with a random message token of the same trajectory forbidden.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..critical import REPORT_FILE
from .table import Measurement

SIGNAL = "critical tokens (lowest score)"


def critical_evidence(steps_by_seed: dict[int, dict[str, Path]]) -> list[Measurement]:
    """The localization and rollout rows from each seed's pipeline steps (their output directories by step name)."""
    localization = Measurement(SIGNAL, "the lowest-scored message token is the first error (hit@1)",
                               "a random ranking of the same tokens (exact)", "trajectories")
    rollout = Measurement(SIGNAL, "continuations correct with the token forbidden (cDPO's rollout test)",
                          "a random message token of the same trajectory", "trajectories")
    for seed, steps in sorted(steps_by_seed.items()):
        report = json.loads((steps["localization"] / REPORT_FILE).read_text())
        for trajectory in report["trajectories"]:
            localization.add(seed, trajectory["scores"]["hit@1"], trajectory["random"]["hit@1"])
        report = json.loads((steps["rollout"] / REPORT_FILE).read_text())
        for trajectory in report["trajectories"]:
            rollout.add(seed, trajectory["critical_correct_share"], trajectory["random_correct_share"])
    return [localization, rollout]
