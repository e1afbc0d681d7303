"""``tokenweave plot RUN_DIR [RUN_DIR ...] --output DIR``: training curves (PNG and SVG) and a Markdown table comparing
runs.

A run directory is a ``tokenweave train`` output directory (its ``run_info.json``) or a directory with a
``checkpoint-N`` (its ``trainer_state.json``, for a run still going or stopped). A run is labelled by its directory's
name, or by the shortest end of its path that tells it apart from the other runs (``a/run`` and ``b/run``). The
figures, written as ``.png`` and ``.svg``:

=====================  ===============================================================================================
file                   what it shows
=====================  ===============================================================================================
``loss``               the training loss per step
``rewards``            GRPO: the mean reward per step, and each reward function's; DPO: reward margins and accuracies
``token_metrics``      the token-aware metrics the runs logged, one panel each: those whose names start with a prefix
                       the run declared (its trainer's and its token signals', in ``run_info.json`` or a
                       checkpoint's ``token_metrics.json``)
=====================  ===============================================================================================

Each run has one colour (and line style) in every panel of every figure, named in the figure's one legend. A metric
gets a panel unless it has the same value at every logged step of every run (an all-zero ``clip_ratio/*``, say): such
a flat line is not drawn, and its value is listed under the table in ``runs.md`` and in the command's output instead,
so that no metric is left out without a word.

``runs.md``: one row per run: its label, method, token-level method, steps, final loss, final mean reward, eval
accuracy (``eval_accuracy``, or the ``accuracy`` of an ``eval.json`` beside the run), and step time with where it
comes from (:func:`step_time`).
"""

from __future__ import annotations

import json
import logging
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .run_files import RUN_INFO_FILE, TOKEN_METRICS_FILE, TRAINER_STATE_NAME, checkpoints_newest_first

logger = logging.getLogger(__name__)  # what was not plotted; the tokenweave command shows it

EARLIER_TOKEN_METRIC_PREFIXES = ("weights/", "kl/", "entropy/q", "entropy_signal/", "hapo/", "clip_ratio/", "rank/",
                                 "attention_credit/", "rewards/non_finite")
"""The token metrics of a run saved before runs recorded their own prefixes (its ``run_info.json`` has none)."""
FIGURE_FORMATS = (".png", ".svg")
LINE_STYLES = ("-", "--", ":", "-.")  # with more runs than the palette has colours, a run is a colour and a style


@dataclass
class RunLog:
    """One run's label, its ``run_info.json`` (empty for a checkpoint only), log history and the name prefixes of its
    token-aware metrics."""

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


def run_labels(directories: list[Path]) -> list[str]:
    """A label per run directory: the shortest end of its absolute path that no other directory's path ends with
    (``run`` alone, ``a/run`` and ``b/run`` for two runs both named ``run``); the whole path for a directory given
    twice."""
    parts = [Path(directory).resolve().parts for directory in directories]
    labels = []
    for index, own in enumerate(parts):
        others = [other for position, other in enumerate(parts) if position != index]
        length = next((length for length in range(1, len(own) + 1)
                       if all(other[-length:] != own[-length:] for other in others)), len(own))
        labels.append(str(Path(*own[-length:])))
    return labels


def token_metric_keys(runs: list[RunLog]) -> list[str]:
    """The token-aware metrics any of ``runs`` logged (names with a prefix the run declared), sorted."""
    return sorted({key for run in runs for entry in run.history for key in entry
                   if not key.startswith("eval_") and key.startswith(run.token_metric_prefixes)})


def constant_value(runs: list[RunLog], key: str) -> float | None:
    """The value of ``key`` if it is the same at every logged step of every run, and logged at least twice (a flat
    line, not worth a panel); None if it varies (or was logged once: a single point is drawn)."""
    values = [value for run in runs for value in run.series(key)[1]]
    return values[0] if len(values) >= 2 and all(value == values[0] for value in values) else None


def run_styles(count: int) -> list[dict]:
    """The line style of each of ``count`` runs, the same in every panel: matplotlib's ``tab10`` colours (``tab20``
    past 10 runs), then the same colours with the next line style."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors
    return [{"color": palette[index % len(palette)], "linestyle": LINE_STYLES[index // len(palette) % len(LINE_STYLES)]}
            for index in range(count)]


def training_figure(runs: list[RunLog], keys: list[str], title: str):
    """The matplotlib figure of ``keys`` (module docstring): a panel per metric that varies, a line per run in the
    run's style (:func:`run_styles`), axis labels, one legend for the figure; and ``{key: value}`` of the metrics
    left out for being constant. The figure is None if no metric of ``keys`` got a panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    logged = [key for key in keys if any(run.series(key)[0] for run in runs)]
    constant = {key: value for key in logged if (value := constant_value(runs, key)) is not None}
    panels = [key for key in logged if key not in constant]
    if not panels:
        return None, constant
    styles = run_styles(len(runs))
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows + 0.8), squeeze=False,
                                layout="constrained")
    drawn = set()  # the runs with a line in this figure: the legend's entries
    for axis, key in zip(axes.flat, panels):
        for index, run in enumerate(runs):
            steps, values = run.series(key)
            if steps:
                axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=run.name, **styles[index])
                drawn.add(index)
        logged_steps = [step for run in runs for step in run.series(key)[0]]
        if min(logged_steps) == max(logged_steps):  # one step: a whole-number axis around it, not 4.8, 4.9, ...
            axis.set_xlim(min(logged_steps) - 1, max(logged_steps) + 1)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.ticklabel_format(useOffset=False)  # values as they are, not "1e-7 + 6.93e-1" beside the axis
        axis.set_xlabel("step")
        axis.set_ylabel(key, fontsize=9)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    handles = [Line2D([], [], marker=".", **styles[index]) for index in sorted(drawn)]
    figure.legend(handles, [runs[index].name for index in sorted(drawn)], loc="outside lower center",
                  ncols=min(len(handles), 4), fontsize=8)
    figure.suptitle(title)
    return figure, constant


def plot_runs(runs: list[RunLog], output_dir: str | Path) -> tuple[list[Path], dict[str, float]]:
    """Write the figures of the module docstring into ``output_dir``, each as PNG and SVG; returns the files written
    (a figure with no panel is left out) and the metrics not plotted for being constant, with their values."""
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reward_keys = sorted({key for run in runs for entry in run.history for key in entry
                          if key == "reward" or (key.startswith("rewards/") and key.endswith("/mean"))
                          or key in ("rewards/margins", "rewards/accuracies")})
    written, constant = [], {}
    for stem, keys, title in (("loss", ["loss"], "training loss"), ("rewards", reward_keys, "rewards"),
                              ("token_metrics", token_metric_keys(runs), "token-aware metrics")):
        figure, left_out = training_figure(runs, keys, title)
        constant |= left_out
        if figure is not None:
            for suffix in FIGURE_FORMATS:
                figure.savefig(output_dir / f"{stem}{suffix}", dpi=100)
                written.append(output_dir / f"{stem}{suffix}")
            plt.close(figure)
    return written, constant


def step_time(run: RunLog) -> tuple[float, str] | None:
    """A run's step time in seconds and where it comes from: the median of the ``step_time`` TRL's GRPOTrainer logs
    each step (the time of the training step, generation included); else, for SFT and DPO, which log no time per step,
    the ``train_runtime`` of transformers' last training call over the steps that call ran (so evaluation and saving
    are in it); None if the log has neither (a run still going)."""
    step_times = run.series("step_time")[1]
    if step_times:
        return statistics.median(step_times), "median step_time"
    summary = next((entry for entry in reversed(run.history) if "train_runtime" in entry and entry.get("step")), None)
    if summary is None:
        return None
    runtime, steps = summary["train_runtime"], summary["step"]
    rate = summary.get("train_steps_per_second")  # steps of this call / runtime, rounded to 3 decimals
    if rate and runtime and abs(steps / runtime - rate) > 0.0005 + 1e-9 and round(rate * runtime) >= 1:
        steps = round(rate * runtime)  # a resumed run: this call ran fewer steps than the run has
    return runtime / steps, f"train_runtime / {steps} step{'' if steps == 1 else 's'}"


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


def number(value, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits; empty for None."""
    return "" if value is None else f"{value:.{digits}g}"


def comparison_table(runs: list[RunLog], directories: list[Path], accuracies: dict[str, float] | None = None,
                     constant: dict[str, float] | None = None) -> str:
    """The Markdown table of the module docstring, one row per run (``accuracies``: eval accuracy by run name), and
    under it the metrics not plotted for being ``constant`` (``{name: value}``), if any."""
    lines = ["| run | method | token method | steps | final loss | final reward | eval accuracy | step time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for run, directory in zip(runs, directories):
        steps = run.info.get("global_step") or max((entry.get("step", 0) for entry in run.history), default=0)
        timed = step_time(run)
        lines.append(
            f"| {run.name} | {run.info.get('method', '')} | {run.info.get('token_method', '')} | {steps} | "
            f"{number(run.last('loss'))} | {number(run.last('reward'))} | {number(eval_accuracy(run, directory, accuracies or {}))} | "
            f"{'' if timed is None else f'{number(timed[0], 3)} ({timed[1]})'} |"
        )
    if constant:
        lines += ["", f"Not plotted, the same value at every logged step of every run: {constant_list(constant)}."]
    return "\n".join(lines) + "\n"


def constant_list(constant: dict[str, float]) -> str:
    """``name = value`` of each metric of ``constant``, comma-separated."""
    return ", ".join(f"`{key}` = {number(value)}" for key, value in sorted(constant.items()))


def plot_command(
    directories: list[str], output_dir: str, accuracies: dict[str, float] | None = None,
    names: list[str] | None = None,
) -> tuple[list[Path], Path]:
    """``tokenweave plot``: the figures and ``runs.md`` of the runs in ``directories`` (named ``names``, default
    :func:`run_labels`), into ``output_dir``; the metrics not plotted are logged too."""
    paths = [Path(directory) for directory in directories]
    runs = [load_run(path, name) for path, name in zip(paths, names or run_labels(paths), strict=True)]
    figures, constant = plot_runs(runs, output_dir)
    if constant:
        logger.info("[plot] not plotted, the same value at every logged step of every run: %s",
                    constant_list(constant))
    table = Path(output_dir) / "runs.md"
    table.write_text(comparison_table(runs, paths, accuracies, constant))
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
