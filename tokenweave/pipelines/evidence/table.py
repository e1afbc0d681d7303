"""One measurement of a token signal against its control, and the evidence table that collects them.

A :class:`Measurement` is what ``tokenweave evidence`` reports in one row: a ``signal`` (critical tokens, attention
credit, ...), what is ``measured`` on each ``unit`` (a trajectory, a completion, a ranked item), and the ``control``
measured on the same unit (a random ranking of the same tokens, random tokens of the same completion, the
sequence-level advantage of the same completion; ``unit`` is its plural, as the table counts them: "trajectories").
``pairs[seed]`` holds, for every unit of that seed, the signal's
value and the control's. The row's effect is the mean of ``signal − control`` over every unit of every seed, with the
95 % interval of :func:`tokenweave.stats.stratified_bootstrap` (units resampled within each seed; for units every seed
shares, such as held-out problems, :func:`tokenweave.stats.paired_bootstrap`): a positive effect
whose interval excludes 0 says the signal does better than its control on that measurement.

:func:`evidence_markdown` writes the rows as one Markdown table; :func:`evidence_json` as JSON with every unit's pair,
so the table can be recomputed; :func:`load_measurements` reads that JSON back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ...stats import paired_bootstrap, stratified_bootstrap


@dataclass
class Measurement:
    """One row of the evidence table (module docstring). ``pairs`` maps a seed to its units' ``(signal, control)``
    values; ``percent`` formats the values as percentages (shares and rates) rather than plain numbers; ``shared_units`` says every seed measures the
    same units in the same order (held-out test problems), so the interval resamples units with the same draw for
    every seed (:func:`tokenweave.stats.paired_bootstrap`) instead of within each seed."""

    signal: str
    measurement: str
    control: str
    unit: str
    pairs: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    percent: bool = True
    shared_units: bool = False

    def add(self, seed: int, signal_value: float, control_value: float) -> None:
        """Record one unit of ``seed``."""
        self.pairs.setdefault(seed, []).append((float(signal_value), float(control_value)))

    @property
    def seeds(self) -> list[int]:
        return sorted(seed for seed, units in self.pairs.items() if units)

    @property
    def num_units(self) -> int:
        return sum(len(units) for units in self.pairs.values())

    def summary(self, samples: int = 10_000) -> dict[str, float | int | list[int]]:
        """The means of the signal's and the control's values, the effect (their paired difference) and its interval,
        the seeds and the number of units."""
        units = [pair for seed in self.seeds for pair in self.pairs[seed]]
        bootstrap = paired_bootstrap if self.shared_units else stratified_bootstrap
        effect, low, high = bootstrap(
            [[signal - control for signal, control in self.pairs[seed]] for seed in self.seeds], samples=samples
        )
        per_seed = [sum(a - b for a, b in self.pairs[seed]) / len(self.pairs[seed]) for seed in self.seeds]
        return {
            "signal_mean": sum(signal for signal, _ in units) / len(units),
            "control_mean": sum(control for _, control in units) / len(units),
            "effect": effect, "low": low, "high": high, "seeds": self.seeds, "num_units": len(units),
            "per_seed": per_seed,
        }

    def format(self, value: float, signed: bool = False) -> str:
        value = round(value, 9) + 0.0  # no "-0.0"
        if self.percent:
            return f"{value:+.1%}" if signed else f"{value:.1%}"
        return f"{value:+.3f}" if signed else f"{value:.3f}"


def _seed_list(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def evidence_markdown(measurements: list[Measurement], samples: int = 10_000) -> str:
    """The evidence table: one row per measurement (module docstring), the effect's interval in brackets, a verdict
    that says whether the interval is above 0 (the signal beats its control), below it, or contains it, and each
    seed's own effect (how much the seeds agree)."""
    lines = [
        "| signal | measurement | control | signal | control | effect [95% interval] | verdict | effect per seed "
        "| seeds | units |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in measurements:
        if not row.num_units:
            lines.append(f"| {row.signal} | {row.measurement} | {row.control} | - | - | - | not measured | - | - | 0 |")
            continue
        summary = row.summary(samples)
        verdict = ("beats its control" if summary["low"] > 0 else "below its control" if summary["high"] < 0
                   else "no difference shown")
        lines.append(
            f"| {row.signal} | {row.measurement} | {row.control} | {row.format(summary['signal_mean'])} | "
            f"{row.format(summary['control_mean'])} | {row.format(summary['effect'], True)} "
            f"[{row.format(summary['low'], True)}, {row.format(summary['high'], True)}] | {verdict} | "
            f"{' / '.join(row.format(value, True) for value in summary['per_seed'])} | "
            f"{_seed_list(summary['seeds'])} | {summary['num_units']} {row.unit} |"
        )
    return "\n".join(lines)


def evidence_json(measurements: list[Measurement], samples: int = 10_000) -> str:
    """Every measurement with its summary and every unit's ``(signal, control)`` pair, as JSON."""
    rows = []
    for row in measurements:
        entry = asdict(row)
        entry["pairs"] = {str(seed): [list(pair) for pair in units] for seed, units in row.pairs.items()}
        entry["summary"] = row.summary(samples) if row.num_units else None
        rows.append(entry)
    return json.dumps(rows, indent=2) + "\n"


def load_measurements(text: str) -> list[Measurement]:
    """The measurements of :func:`evidence_json`'s output."""
    rows = []
    for entry in json.loads(text):
        pairs = {int(seed): [tuple(pair) for pair in units] for seed, units in entry["pairs"].items()}
        rows.append(Measurement(entry["signal"], entry["measurement"], entry["control"], entry["unit"], pairs,
                                entry["percent"], entry.get("shared_units", False)))
    return rows
