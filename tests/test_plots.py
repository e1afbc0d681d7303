"""``tokenweave plot``: figures whose lines match their legend, no metric left out without a word, readable axes, PNG
and SVG, ``runs.md`` (step time for every trainer, runs with the same folder name told apart), and a command that
starts without torch or TRL. Fake run directories (``run_info.json``, checkpoints' ``trainer_state.json``): no
training."""

import json
import subprocess
import sys

import pytest
from matplotlib.colors import to_hex
from PIL import Image

from tokenweave.cli import main as cli_main
from tokenweave.plots import (
    comparison_table,
    load_run,
    plot_command,
    run_labels,
    run_styles,
    step_time,
    token_metric_keys,
    training_figure,
)

from .conftest import REPO_ROOT


def write_run(directory, name, history, **info):
    run = directory / name
    run.mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"log_history": history, **info}))
    return run


def train_summary(step, runtime, steps_run=None):
    """The last entry transformers' ``Trainer.train`` logs: its runtime and rates over the steps this call ran."""
    steps_run = step if steps_run is None else steps_run
    return {"train_runtime": runtime, "train_steps_per_second": round(steps_run / runtime, 3), "train_loss": 0.5,
            "epoch": 1.0, "step": step}


def test_plot_writes_png_and_svg_and_a_table_with_one_row_per_run(tmp_path, capsys):
    grpo = [{"step": step, "loss": 1.0 / step, "reward": 0.1 * step, "rewards/correctness/mean": 0.05 * step,
             "hapo/sampling_temperature": 1 + 0.01 * step, "entropy/q50": 2.0 + step, "step_time": 2.0 + step % 2}
            for step in range(1, 6)]
    dpo = [{"step": step, "loss": 0.69 - 0.01 * step, "weights/rejected": 0.7 - 0.1 * step,
            "rewards/margins": 0.1 * step} for step in range(1, 4)]
    runs = [write_run(tmp_path, "hapo-run", grpo, method="grpo", token_method="hapo", global_step=5,
                      token_metric_prefixes=["entropy/q", "hapo/"]),
            write_run(tmp_path, "cdpo-run", dpo + [train_summary(3, 6.0)], method="dpo", token_method="cdpo",
                      global_step=3, token_metric_prefixes=["weights/", "kl/"])]
    (runs[1] / "eval.json").write_text(json.dumps({"accuracy": 0.25}))
    cli_main(["plot", *map(str, runs), "--output", str(tmp_path / "plots")])
    printed = capsys.readouterr().out
    for stem in ("loss", "rewards", "token_metrics"):
        for suffix in (".png", ".svg"):
            assert f"wrote {tmp_path / 'plots' / stem}{suffix}" in printed
        image = Image.open(tmp_path / "plots" / f"{stem}.png")
        assert image.size[0] >= 400 and image.size[1] >= 250
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 10  # lines, text and axes, not a blank page
        svg = (tmp_path / "plots" / f"{stem}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    table = (tmp_path / "plots" / "runs.md").read_text().splitlines()
    assert len(table) == 4  # nothing constant: no note under the table
    # final loss 1/5, final reward 0.5, no accuracy, step time the median of 3, 2, 3, 2, 3
    assert table[2] == "| hapo-run | grpo | hapo | 5 | 0.2 | 0.5 |  | 3 (median step_time) |"
    # the accuracy of its eval.json; DPO logs no step_time: 6 s over 3 steps
    assert table[3] == "| cdpo-run | dpo | cdpo | 3 | 0.66 |  | 0.25 | 2 (train_runtime / 3 steps) |"
    # the token metrics: the names with a prefix its run declared (run_info.json)
    assert token_metric_keys([load_run(run) for run in runs]) == ["entropy/q50", "hapo/sampling_temperature",
                                                                  "weights/rejected"]
    assert load_run(runs[0]).series("reward") == ([1, 2, 3, 4, 5], [0.1 * step for step in range(1, 6)])
    assert comparison_table([load_run(runs[1])], [runs[1]], accuracies={"cdpo-run": 0.5}).endswith(
        "| 0.5 | 2 (train_runtime / 3 steps) |\n")


def test_each_run_has_one_colour_in_every_panel_and_the_figure_one_legend(tmp_path):
    """The bug: each panel coloured its runs in its own order (the first run with data was blue) and only the first
    panel had a legend, so in a panel the first run did not log the second run's line wore the first run's colour."""
    grpo = [{"step": step, "reward": 0.1 * step} for step in (1, 2, 3)]
    dpo = [{"step": step, "rewards/margins": 0.2 * step, "rewards/accuracies": 0.5 + 0.1 * step} for step in (1, 2, 3)]
    other_dpo = [{"step": step, "rewards/margins": -0.1 * step} for step in (1, 2, 3)]
    runs = [load_run(write_run(tmp_path, name, history))
            for name, history in (("dapo_tiny", grpo), ("cdpo_tiny", dpo), ("dpo_tiny", other_dpo))]
    keys = ["reward", "rewards/accuracies", "rewards/margins"]
    figure, constant = training_figure(runs, keys, "rewards")
    assert constant == {}
    styles = {run.name: to_hex(style["color"]) for run, style in zip(runs, run_styles(len(runs)))}
    assert len(set(styles.values())) == 3
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_ylabel() for axis in panels] == keys and all(axis.get_xlabel() == "step" for axis in panels)
    # every line wears its run's colour, in every panel; the runs in each panel are those that logged its metric
    seen = {key: {line.get_label(): to_hex(line.get_color()) for line in axis.get_lines()}
            for key, axis in zip(keys, panels)}
    assert seen == {"reward": {"dapo_tiny": styles["dapo_tiny"]},
                    "rewards/accuracies": {"cdpo_tiny": styles["cdpo_tiny"]},
                    "rewards/margins": {"cdpo_tiny": styles["cdpo_tiny"], "dpo_tiny": styles["dpo_tiny"]}}
    # one legend, the figure's, naming every run in its colour; none in a panel
    assert all(axis.get_legend() is None for axis in figure.axes) and len(figure.legends) == 1
    (legend,) = figure.legends
    assert {text.get_text(): to_hex(handle.get_color()) for text, handle in zip(legend.get_texts(),
                                                                                 legend.legend_handles)} == styles


def test_a_metric_that_varies_always_gets_a_panel_and_a_constant_one_is_named(tmp_path, capsys):
    """The bug: a 16-panel cap on the sorted names let all-zero ``clip_ratio/*`` panels push ``kl/*`` and
    ``weights/*`` out of the figure without a word."""
    history = [{"step": step, **{f"clip_ratio/c{index:02d}": 0.0 for index in range(16)},
                "kl/mean": 0.01 * step, "weights/chosen": 1.0 + step, "weights/rejected": 0.5}
               for step in (1, 2, 3)]
    other = [{"step": step, "weights/rejected": 0.25, "clip_ratio/c00": 0.0} for step in (1, 2)]
    prefixes = ["clip_ratio/", "kl/", "weights/"]
    runs = [write_run(tmp_path, "cdpo", history, token_metric_prefixes=prefixes),
            write_run(tmp_path, "dpo", other, token_metric_prefixes=prefixes)]
    figure, constant = training_figure([load_run(run) for run in runs],
                                       token_metric_keys([load_run(run) for run in runs]), "token-aware metrics")
    # what varies gets a panel: over the steps (kl/mean, weights/chosen) or across runs (weights/rejected, constant
    # in each run but 0.5 in one and 0.25 in the other)
    assert [axis.get_ylabel() for axis in figure.axes if axis.get_visible()] == ["kl/mean", "weights/chosen",
                                                                                 "weights/rejected"]
    assert constant == {f"clip_ratio/c{index:02d}": 0.0 for index in range(16)}
    cli_main(["plot", *map(str, runs), "--output", str(tmp_path / "plots")])
    note = "ot plotted, the same value at every logged step of every run: `clip_ratio/c00` = 0, "
    table = (tmp_path / "plots" / "runs.md").read_text()
    assert f"\n\nN{note}" in table and table.endswith("`clip_ratio/c15` = 0.\n")  # under the table
    assert f"[plot] n{note}" in capsys.readouterr().out  # and in the command's output


def test_single_point_panels_have_no_offset_tick_labels(tmp_path):
    """Two runs of one step each, their values apart by 4e-7: matplotlib wrote the y ticks as 0.5, 1.0, ... under an
    offset ``1e-7+6.93147e-1``, and the one step's x ticks as 4.7, 4.8, ..."""
    runs = [load_run(write_run(tmp_path, name, [{"step": 5, "loss": value}]))
            for name, value in (("a", 0.6931471), ("b", 0.6931475))]
    figure, _ = training_figure(runs, ["loss"], "training loss")
    figure.canvas.draw()
    (axis,) = figure.axes
    for ticks in (axis.xaxis, axis.yaxis):
        assert ticks.get_major_formatter().get_offset() == ""
    x_ticks = [float(label.get_text().replace("\N{MINUS SIGN}", "-")) for label in axis.get_xticklabels()]
    assert 5 in x_ticks and all(tick == int(tick) for tick in x_ticks)
    y_ticks = [float(label.get_text()) for label in axis.get_yticklabels()]
    assert all(abs(tick - 0.6931473) < 1e-5 for tick in y_ticks)  # the values themselves, not 0.5, 1.0, ...


def test_plot_imports_neither_torch_nor_trl(tmp_path):
    """The command reads JSON and draws: importing torch and TRL made a figure take 42 s."""
    run = write_run(tmp_path, "run", [{"step": step, "loss": 1.0 / step} for step in (1, 2)], method="sft")
    script = ("import sys, tokenweave.cli, tokenweave.plots\n"
              f"tokenweave.cli.main(['plot', {str(run)!r}, '--output', {str(tmp_path / 'plots')!r}])\n"
              "print(sorted(name for name in ('torch', 'trl', 'transformers') if name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "plots" / "loss.svg").is_file()


def test_step_time_of_each_trainer_and_where_it_comes_from(tmp_path):
    # GRPO: TRL logs step_time each step
    grpo = [{"step": step, "loss": 0.1, "step_time": time} for step, time in ((1, 5.0), (2, 1.0), (3, 2.0))]
    assert step_time(load_run(write_run(tmp_path, "grpo", grpo + [train_summary(3, 30.0)]))) == (
        2.0, "median step_time")
    # SFT (and DPO): only transformers' train_runtime, over the steps of the training call
    sft = [{"step": step, "loss": 0.1} for step in (1, 2, 3, 4)]
    assert step_time(load_run(write_run(tmp_path, "sft", sft + [train_summary(4, 10.0)]))) == (
        2.5, "train_runtime / 4 steps")
    # resumed at step 6: the last call ran 4 of the 10 steps in 12 s
    resumed = [{"step": step, "loss": 0.1} for step in range(1, 11)] + [train_summary(10, 12.0, steps_run=4)]
    assert step_time(load_run(write_run(tmp_path, "resumed", resumed))) == (3.0, "train_runtime / 4 steps")
    # still going (no train_runtime logged yet): an empty cell
    going = write_run(tmp_path, "going", sft, method="sft")
    assert step_time(load_run(going)) is None
    assert comparison_table([load_run(going)], [going]).splitlines()[2].endswith("|  |")


def test_two_runs_with_the_same_folder_name_are_told_apart(tmp_path, capsys):
    history = [{"step": step, "loss": 1.0 / step} for step in (1, 2)]
    runs = [write_run(tmp_path / "x" / "a", "run", history), write_run(tmp_path / "y" / "a", "run", history),
            write_run(tmp_path / "b", "run", history), write_run(tmp_path / "b", "other", history)]
    assert run_labels(runs) == ["x/a/run", "y/a/run", "b/run", "other"]
    assert run_labels([runs[3]]) == ["other"] and run_labels([runs[0], runs[0]]) == [str(runs[0])] * 2
    _, table = plot_command([str(run) for run in runs], str(tmp_path / "plots"))
    assert [line.split(" | ")[0] for line in table.read_text().splitlines()[2:]] == [
        "| x/a/run", "| y/a/run", "| b/run", "| other"]
    figure, _ = training_figure([load_run(run, label) for run, label in zip(runs, run_labels(runs))], ["loss"],
                                "training loss")
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["x/a/run", "y/a/run", "b/run", "other"]


def test_plot_of_a_directory_that_is_not_a_run_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenweave run directory"):
        plot_command([str(tmp_path)], str(tmp_path / "plots"))


def test_plot_reads_a_run_without_run_info_from_its_newest_complete_checkpoint(tmp_path):
    for step, complete in ((2, True), (10, True), (12, False)):  # 10 > 2 by number, not by name; 12 half-written
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        if complete:
            (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": step, "loss": 1.0}]}))
    assert load_run(tmp_path / "run").series("loss") == ([10], [1.0])
