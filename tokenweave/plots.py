"""``tokenweave plot RUN_DIR [RUN_DIR ...] --output DIR``: training curves as PNG and a Markdown table comparing runs.

A run directory is a ``tokenweave train`` output directory (its ``run_info.json``) or a directory with a
``checkpoint-N`` (its ``trainer_state.json``, for a run still going or stopped). The figures, one line per run:

=====================  ===============================================================================================
file                   what it shows
=====================  ===============================================================================================
``loss.png``           the training loss per step
``rewards.png``        GRPO: the mean reward per step, and each reward function's; DPO: reward margins and accuracies
``token_metrics.png``  the token-aware metrics the runs logged, one panel each: those whose names start with a prefix
                       the run declared (its trainer's and its token signals', in ``run_info.json`` or a
                       checkpoint's ``token_metrics.json``)
=====================  ===============================================================================================

``runs.md``: one row per run: its name, method, token-level method, steps, final loss, final mean reward, eval
accuracy (``eval_accuracy``, or the ``accuracy`` of an ``eval.json`` beside the run), and median step time.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME

from .train import RUN_INFO_FILE, checkpoints_newest_first
from .trainers.host import TOKEN_METRICS_FILE

MAX_TOKEN_PANELS = 16
EARLIER_TOKEN_METRIC_PREFIXES = ("weights/", "kl/", "entropy/q", "entropy_signal/", "hapo/", "clip_ratio/", "rank/",
                                 "attention_credit/", "rewards/non_finite")
"""The token metrics of a run saved before runs recorded their own prefixes (its ``run_info.json`` has none)."""


@dataclass
class RunLog:
    """One run's name (its directory's), its ``run_info.json`` (empty for a checkpoint only), log history and the
    name prefixes of its token-aware metrics."""

    name: str
    info: dict
    history: list[dict]
    token_metric_prefixes: tuple[str, ...] = ()

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(entry["step"], entry[key]) for entry in self.history if key in entry and "step" in entry]
        return [step for step, _ in points], [value for _, value in points]

    def last(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None


def load_run(directory: str | Path, name: str | None = None) -> RunLog:
    """The log of the run in ``directory`` (module docstring), named ``name`` (default: the directory's name);
    ``FileNotFoundError`` naming the directory if it has none."""
    directory = Path(directory)
    name = name or directory.name
    if (directory / RUN_INFO_FILE).is_file():
        info = json.loads((directory / RUN_INFO_FILE).read_text())
        prefixes = info.get("token_metric_prefixes", EARLIER_TOKEN_METRIC_PREFIXES)
        return RunLog(name, info, info.get("log_history", []), tuple(prefixes))
    checkpoints = [checkpoint for checkpoint in checkpoints_newest_first(directory)
                   if (checkpoint / TRAINER_STATE_NAME).is_file()]
    if checkpoints:
        metrics = checkpoints[0] / TOKEN_METRICS_FILE
        prefixes = tuple(json.loads(metrics.read_text())) if metrics.is_file() else EARLIER_TOKEN_METRIC_PREFIXES
        return RunLog(name, {}, json.loads((checkpoints[0] / TRAINER_STATE_NAME).read_text()).get("log_history", []),
                      prefixes)
    raise FileNotFoundError(f"{str(directory)!r} has no {RUN_INFO_FILE} and no checkpoint-N/trainer_state.json: "
                            "not a tokenweave run directory.")


def token_metric_keys(runs: list[RunLog]) -> list[str]:
    """The token-aware metrics any of ``runs`` logged (names with a prefix the run declared), in a stable order."""
    keys = {key for run in runs for entry in run.history for key in entry
            if not key.startswith("eval_") and key.startswith(run.token_metric_prefixes)}
    return sorted(keys)[:MAX_TOKEN_PANELS]


def _figure(runs: list[RunLog], keys: list[str], path: Path, title: str) -> Path | None:
    """One panel per metric of ``keys`` (a line per run that logged it); None if no run logged any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in keys if any(run.series(key)[0] for run in runs)]
    if not keys:
        return None
    columns = min(4, len(keys))
    rows = -(-len(keys) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        for run in runs:
            steps, values = run.series(key)
            if steps:
                axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=run.name)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_runs(runs: list[RunLog], output_dir: str | Path) -> list[Path]:
    """Write the figures of the module docstring into ``output_dir``; returns those written (a figure no run has
    data for is left out)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reward_keys = sorted({key for run in runs for entry in run.history for key in entry
                          if key == "reward" or (key.startswith("rewards/") and key.endswith("/mean"))
                          or key in ("rewards/margins", "rewards/accuracies")})
    written = [
        _figure(runs, ["loss"], output_dir / "loss.png", "training loss"),
        _figure(runs, reward_keys, output_dir / "rewards.png", "rewards"),
        _figure(runs, token_metric_keys(runs), output_dir / "token_metrics.png", "token-aware metrics"),
    ]
    return [path for path in written if path is not None]


def eval_accuracy(run: RunLog, directory: Path, accuracies: dict[str, float]) -> float | None:
    """``accuracies[run.name]``, else ``eval_accuracy`` from the log, else the ``accuracy`` of ``eval.json`` in the
    run directory (``tokenweave eval --output``)."""
    if run.name in accuracies:
        return accuracies[run.name]
    logged = run.last("eval_accuracy")
    if logged is not None:
        return logged
    path = directory / "eval.json"
    return json.loads(path.read_text()).get("accuracy") if path.is_file() else None


def comparison_table(runs: list[RunLog], directories: list[Path], accuracies: dict[str, float] | None = None) -> str:
    """The Markdown table of the module docstring, one row per run (``accuracies``: eval accuracy by run name)."""

    def number(value, digits: int = 4) -> str:
        return "" if value is None else f"{value:.{digits}g}"

    lines = ["| run | method | token method | steps | final loss | final reward | eval accuracy | step time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for run, directory in zip(runs, directories):
        steps = run.info.get("global_step") or max((entry.get("step", 0) for entry in run.history), default=0)
        step_times = run.series("step_time")[1]
        lines.append(
            f"| {run.name} | {run.info.get('method', '')} | {run.info.get('token_method', '')} | {steps} | "
            f"{number(run.last('loss'))} | {number(run.last('reward'))} | {number(eval_accuracy(run, directory, accuracies or {}))} | "
            f"{number(statistics.median(step_times) if step_times else None, 3)} |"
        )
    return "\n".join(lines) + "\n"


def plot_command(
    directories: list[str], output_dir: str, accuracies: dict[str, float] | None = None,
    names: list[str] | None = None,
) -> tuple[list[Path], Path]:
    """``tokenweave plot``: the figures and ``runs.md`` of the runs in ``directories`` (named ``names``, default
    their directories' names), into ``output_dir``."""
    paths = [Path(directory) for directory in directories]
    runs = [load_run(path, name) for path, name in zip(paths, names or [None] * len(paths), strict=True)]
    figures = plot_runs(runs, output_dir)
    table = Path(output_dir) / "runs.md"
    table.write_text(comparison_table(runs, paths, accuracies))
    return figures, table


def plot_evidence(measurements, output_stem: str | Path, samples: int = 10_000) -> list[Path]:
    """``tokenweave evidence``'s figure: one row per measurement (a :class:`tokenweave.pipelines.evidence.Measurement`
    with units), its effect (signal − control, in percentage points for shares) and 95 % interval, a line at 0;
    written as ``<output_stem>.png`` and ``.svg``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(row, row.summary(samples)) for row in measurements if row.num_units]
    figure, axis = plt.subplots(figsize=(11, 0.9 * len(rows) + 1.6))
    for index, (row, summary) in enumerate(reversed(rows)):
        scale = 100.0 if row.percent else 1.0
        effect, low, high = (summary[key] * scale for key in ("effect", "low", "high"))
        colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:grey"
        axis.errorbar(effect, index, xerr=[[effect - low], [high - effect]], fmt="o", color=colour, capsize=4)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([textwrap.fill(f"{row.signal}: {row.measurement}, against {row.control}"
                                        + ("" if row.percent else " (raw)"), 70) for row, _ in reversed(rows)],
                         fontsize=7)
    axis.set_xlabel("effect: signal − its control, percentage points (95% interval)")
    seeds = sorted({seed for row, _ in rows for seed in row.seeds})
    axis.set_title(f"Token signals against their controls (seeds {', '.join(map(str, seeds))})", fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    stem = Path(output_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        figure.savefig(path, dpi=100)
    plt.close(figure)
    return paths
