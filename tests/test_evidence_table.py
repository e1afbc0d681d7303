"""``tokenweave evidence``'s table on a fixed input: each row's means, effect, interval, verdict, seeds and units; the
JSON round trip; the figure's rows."""

import json

import pytest

from tokenweave.pipelines.evidence.table import Measurement, evidence_json, evidence_markdown, load_measurements
from tokenweave.plots import plot_evidence


def fixed_rows():
    better = Measurement("signal A", "hit@1", "random ranking", "trajectories")
    for seed in range(5):
        for _ in range(4):
            better.add(seed, 1.0, 0.25)  # every unit +75 points: a zero-width interval
    mixed = Measurement("signal B", "answer changes", "random tokens", "trajectories")
    mixed.add(0, 1.0, 0.0)
    mixed.add(0, 0.0, 1.0)
    mixed.add(1, 0.5, 0.5)
    worse = Measurement("signal C", "agreement", "sequence advantage", "ranked items", percent=False)
    worse.add(3, 0.0, 0.5)
    worse.add(3, 0.0, 0.5)
    return [better, mixed, worse, Measurement("signal D", "not run", "nothing", "trajectories")]


def test_markdown_rows_give_means_effect_interval_verdict_seeds_and_units():
    lines = evidence_markdown(fixed_rows(), samples=500).splitlines()
    assert lines[0].startswith("| signal | measurement | control | signal | control | effect [95% interval] |")
    assert lines[2] == ("| signal A | hit@1 | random ranking | 100.0% | 25.0% | +75.0% [+75.0%, +75.0%] | "
                        "beats its control | +75.0% / +75.0% / +75.0% / +75.0% / +75.0% | 0-4 | 20 trajectories |")
    # differences +1, -1 (seed 0) and 0 (seed 1): mean 0; resampling seed 0's two units gives -1, 0 or +1 over 3 units
    assert lines[3].startswith("| signal B | answer changes | random tokens | 50.0% | 50.0% | +0.0% [")
    assert lines[3].endswith("| no difference shown | +0.0% / +0.0% | 0, 1 | 3 trajectories |")
    assert lines[4] == ("| signal C | agreement | sequence advantage | 0.000 | 0.500 | -0.500 [-0.500, -0.500] | "
                        "below its control | -0.500 | 3 | 2 ranked items |")
    assert lines[5] == "| signal D | not run | nothing | - | - | - | not measured | - | - | 0 |"


def test_json_keeps_every_pair_and_reads_back_to_the_same_table():
    rows = fixed_rows()
    data = json.loads(evidence_json(rows, samples=200))
    assert data[0]["pairs"]["4"] == [[1.0, 0.25]] * 4
    assert data[0]["summary"]["effect"] == pytest.approx(0.75) and data[0]["summary"]["num_units"] == 20
    assert data[3]["summary"] is None
    assert evidence_markdown(load_measurements(evidence_json(rows)), samples=300) == evidence_markdown(rows, samples=300)


def test_figure_has_one_labelled_row_per_measured_row(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = {}
    original = matplotlib.axes.Axes.set_yticklabels

    def record(self, labels, **kwargs):
        seen["labels"] = [str(label) for label in labels]
        return original(self, labels, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticklabels", record)
    paths = plot_evidence(fixed_rows(), tmp_path / "evidence", samples=200)
    assert [path.name for path in paths] == ["evidence.png", "evidence.svg"] and all(p.stat().st_size for p in paths)
    # bottom to top, so the table's first row is at the top; the unmeasured row is left out
    assert [label.replace("\n", " ") for label in seen["labels"]] == [
        "signal C: agreement, against sequence advantage (raw)", "signal B: answer changes, against random tokens",
        "signal A: hit@1, against random ranking"]


def test_rows_over_shared_units_resample_them_together_across_seeds():
    """Held-out problems shared by the seeds: seed 0's +1 and seed 1's −1 on the same problem cancel in every
    resample (the paired bootstrap), while units of their own per seed would not."""
    shared = Measurement("cDPO", "held-out accuracy", "shuffled cDPO", "problems", shared_units=True)
    own = Measurement("cDPO", "held-out accuracy", "shuffled cDPO", "problems")
    for row in (shared, own):
        for problem in range(20):
            row.add(0, float(problem % 2), float(1 - problem % 2))
            row.add(1, float(1 - problem % 2), float(problem % 2))
    assert shared.summary(500)["low"] == shared.summary(500)["high"] == 0.0
    assert own.summary(500)["low"] < 0 < own.summary(500)["high"]
    assert load_measurements(evidence_json([shared], samples=50))[0].shared_units
