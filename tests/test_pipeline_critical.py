"""The critical-token pipeline (sample, label, positive/negative LoRA, score, pairs, cDPO), its resumable steps and
the quickstart, on the tiny model."""

import json
import shutil
import subprocess
from dataclasses import asdict

import pytest
import yaml
from datasets import load_from_disk
from PIL import Image

import tokenweave.launch as launch_module
import tokenweave.pipelines.critical as pipeline
import tokenweave.pipelines.quickstart as quickstart
from tokenweave.cli import QUICKSTART_HEATMAP_FILE, QUICKSTART_PLOTS_DIR
from tokenweave.cli import main as cli_main
from tokenweave.config import parse_run_config
from tokenweave.data.preferences import SAMPLE_COLUMNS, select_by_answer_frequency
from tokenweave.models import build_tiny_tokenizer
from tokenweave.pipelines.critical import CriticalPipelineConfig, parse_pipeline_config, training_runs
from tokenweave.pipelines.steps import STEP_RECORD, Step, StepConfigChanged, run_steps
from tokenweave.train import RUN_INFO_FILE, train_from_args

from .conftest import CONFIGS
from .test_critical_scores import trl_tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


NUM_QUESTIONS, NUM_SAMPLES = 4, 3
STEPS_A_TO_E = ("samples", "sft_data", "positive", "negative", "pairs")


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return path


def tiny_sft_config(directory, **overrides):
    """configs/critical_sft_tiny.yaml with ``overrides``, written under ``directory``."""
    values = yaml.safe_load((CONFIGS / "critical_sft_tiny.yaml").read_text()) | overrides
    return write_yaml(directory / "sft.yaml", values)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """Steps a-e of the pipeline on the tiny model, through `tokenweave critical`; returns its config file."""
    directory = tmp_path_factory.mktemp("critical")
    config = yaml.safe_load((CONFIGS / "critical_tiny.yaml").read_text())
    config.update(
        work_dir=str(directory / "work"),
        num_examples=NUM_QUESTIONS,
        num_samples_per_prompt=NUM_SAMPLES,
        max_new_tokens=12,
        sft_config=str(tiny_sft_config(directory, max_steps=1, per_device_train_batch_size=4)),
        cdpo_config=None,
    )
    config_path = write_yaml(directory / "critical.yaml", config)
    cli_main(["critical", "--config", str(config_path)])
    return config_path


def must_not_run(*args, **kwargs):
    raise AssertionError("a finished step ran again")


def test_pipeline_writes_every_step_as_a_dataset_or_adapter(pipeline_run):
    work = pipeline_run.parent / "work"
    samples = load_from_disk(str(work / "samples"))
    assert set(SAMPLE_COLUMNS) | {"solution"} <= set(samples.column_names)
    assert len(samples) == NUM_QUESTIONS * NUM_SAMPLES
    positive_data, negative_data = (load_from_disk(str(work / "sft_data" / side)) for side in ("positive", "negative"))
    assert positive_data.column_names == negative_data.column_names == ["prompt", "completion"]
    # cDPO's selection (critical_tiny.yaml keeps the defaults): one correct sample per question that has one, plus
    # every reference solution; the incorrect samples whose answers cover half of each question's incorrect ones
    questions = [[row for row in samples if row["question_id"] == index] for index in range(NUM_QUESTIONS)]
    with_correct = sum(any(row["correct"] for row in rows) for rows in questions)
    assert len(positive_data) == with_correct + NUM_QUESTIONS
    negative = [
        row for rows in questions
        for row in select_by_answer_frequency([row for row in rows if not row["correct"]], top_p=0.5)
    ]
    assert negative_data["completion"] == [row["completion"] for row in negative]
    assert 0 < len(negative_data) < len(samples) - sum(samples["correct"])
    for side in ("positive", "negative"):
        adapter = json.loads((work / side / "adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
        assert set(adapter["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}
        assert json.loads((work / side / RUN_INFO_FILE).read_text())["global_step"] == 1

    pairs = load_from_disk(str(work / "pairs"))
    assert {"prompt", "chosen", "rejected", "chosen_scores", "rejected_scores"} <= set(pairs.column_names)
    assert len(pairs) == len({row["question_id"] for row in samples if not row["correct"]})
    tokenized = trl_tokenize(pairs, build_tiny_tokenizer())
    for row, trl_row in zip(pairs, tokenized, strict=True):
        for side in ("chosen", "rejected"):
            assert len(row[f"{side}_scores"]) == len(trl_row[f"{side}_ids"]) == len(row[f"{side}_tokens"])
            assert all(0 < score <= 1 for score in row[f"{side}_scores"])

    # Each step records the config it was made from; a step's record holds those of the steps it read.
    records = {step: json.loads((work / step / STEP_RECORD).read_text()) for step in STEPS_A_TO_E}
    assert records["samples"]["num_samples_per_prompt"] == NUM_SAMPLES
    assert records["positive"]["run"]["max_steps"] == 1 and records["positive"] == records["negative"]
    assert records["pairs"]["inputs"]["positive"] == records["positive"]
    assert records["positive"]["inputs"]["sft_data"]["inputs"]["samples"] == records["samples"]


def test_pipeline_rerun_skips_done_steps_and_redoes_a_deleted_one(pipeline_run, monkeypatch):
    work = pipeline_run.parent / "work"
    files = [path for step in ("samples", "sft_data", "positive", "negative") for path in (work / step).rglob("*")]
    mtimes = {path: path.stat().st_mtime_ns for path in files}

    for name in ("sample_trajectories", "train_from_args", "score_with_models"):
        monkeypatch.setattr(pipeline, name, must_not_run)
    cli_main(["critical", "--config", str(pipeline_run)])

    # A deleted step (and a stale partial directory of it) is redone; nothing else is.
    scores_before = load_from_disk(str(work / "pairs"))["rejected_scores"]
    shutil.rmtree(work / "pairs")
    (work / ".pairs.partial").mkdir()
    (work / ".pairs.partial" / "junk").write_text("left by an interrupted run")
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "sample_trajectories", must_not_run)
    monkeypatch.setattr(pipeline, "train_from_args", must_not_run)
    cli_main(["critical", "--config", str(pipeline_run)])
    assert load_from_disk(str(work / "pairs"))["rejected_scores"] == scores_before
    assert not (work / ".pairs.partial").exists()
    assert {path: path.stat().st_mtime_ns for path in files} == mtimes


def test_a_changed_config_stops_the_pipeline_naming_what_changed(pipeline_run, tmp_path, monkeypatch):
    work = pipeline_run.parent / "work"
    records = {step: (work / step / STEP_RECORD).read_text() for step in STEPS_A_TO_E}
    for name in ("sample_trajectories", "train_from_args", "score_with_models"):
        monkeypatch.setattr(pipeline, name, must_not_run)

    with pytest.raises(StepConfigChanged) as changed:
        cli_main(["critical", "--config", str(pipeline_run), "--temperature", "0.5", "--debug"])
    message = str(changed.value)
    assert "samples/: temperature: 1.0 -> 0.5" in message
    for step in ("sft_data", "positive", "negative", "pairs"):  # every step made from the samples, at once
        assert f"{step}/: input " in message
    assert "Delete these step directories" in message

    # A changed SFT run config: the positive and negative models and the pairs made from them.
    sft_config = yaml.safe_load((pipeline_run.parent / "sft.yaml").read_text()) | {"learning_rate": 0.002}
    write_yaml(tmp_path / "sft.yaml", sft_config)
    with pytest.raises(StepConfigChanged) as changed:
        cli_main(["critical", "--config", str(pipeline_run), "--sft_config", str(tmp_path / "sft.yaml"), "--debug"])
    message = str(changed.value)
    assert "positive/: run.learning_rate: 0.001 -> 0.002" in message and "negative/: run.learning_rate" in message
    assert "pairs/: input negative/ changed; input positive/ changed" in message
    assert "samples/" not in message and "sft_data/" not in message
    assert {step: (work / step / STEP_RECORD).read_text() for step in STEPS_A_TO_E} == records


def test_pipeline_step_f_trains_cdpo_and_the_dpo_baseline_on_the_scored_pairs(pipeline_run, tmp_path, monkeypatch):
    cdpo_config = yaml.safe_load((CONFIGS / "cdpo_tiny.yaml").read_text()) | {"max_steps": 1}
    write_yaml(tmp_path / "cdpo.yaml", cdpo_config)
    runs = []

    def recording_train(run_args, training_args, model_args):
        runs.append((run_args, training_args, model_args))
        return train_from_args(run_args, training_args, model_args)

    monkeypatch.setattr(pipeline, "train_from_args", recording_train)
    cli_main(["critical", "--config", str(pipeline_run), "--cdpo_config", str(tmp_path / "cdpo.yaml"),
              "--compare_dpo", "true"])
    work = pipeline_run.parent / "work"
    for name in ("cdpo", "dpo"):
        info = json.loads((work / name / RUN_INFO_FILE).read_text())
        assert info["method"] == "dpo" and info["global_step"] == 1
    (cdpo_run, cdpo_args, cdpo_model), (dpo_run, dpo_args, dpo_model) = runs  # the SFT runs were done by the fixture
    assert cdpo_run.dataset_name == dpo_run.dataset_name == str(work / "pairs")
    assert cdpo_model.model_name_or_path == "tiny-llama" and asdict(cdpo_model) == asdict(dpo_model)
    assert (cdpo_args.loss_type, dpo_args.loss_type) == (["cdpo"], ["sigmoid"])
    assert cdpo_args.output_dir.endswith("/.cdpo.partial") and dpo_args.output_dir.endswith("/.dpo.partial")
    differing = {
        key for key, value in cdpo_args.to_dict().items() if dpo_args.to_dict()[key] != value
    }
    assert differing == {"loss_type", "token_signals", "output_dir"}  # cDPO's weights: the critical_tokens signal
    assert (cdpo_args.token_signals, dpo_args.token_signals) == (["critical_tokens"], [])
    assert cdpo_config["loss_type"] == "cdpo"


def test_pipeline_runs_equal_the_run_configs_with_the_pipeline_keys_on_the_command_line(tmp_path):
    config = parse_pipeline_config(["--config", str(CONFIGS / "critical_tiny.yaml"), "--seed", "3"])
    runs = training_runs(config)
    for name, path, extra in (
        ("sft", config.sft_config, ["--seed", "3"]),
        ("cdpo", config.cdpo_config, []),
    ):
        run = runs[name]
        expected = parse_run_config(["--config", path, "--model_name_or_path", config.model, *extra])
        for got, want in zip((run.run_args, run.training_args, run.model_args), expected, strict=True):
            assert (got.to_dict() if hasattr(got, "to_dict") else asdict(got)) == (
                want.to_dict() if hasattr(want, "to_dict") else asdict(want)
            )
    assert runs["sft"].training_args.seed == 3 and runs["cdpo"].training_args.seed == 0


def as_dicts(configs):
    return [config.to_dict() if hasattr(config, "to_dict") else asdict(config) for config in configs]


def test_a_launched_training_step_runs_the_configs_it_would_run_in_process(tmp_path, monkeypatch):
    """With launch flags, a training step is ``tokenweave train --config <its run config> <flags>`` in a process of
    its own; that run config parses to the dataclasses the step trains in process (seed, variants, model, dataset,
    output directory included)."""
    config = parse_pipeline_config(["--config", str(CONFIGS / "critical_tiny.yaml"), "--seed", "3",
                                    "--compare_dpo", "true", "--compare_shuffled", "true"])
    in_process, launched = [], []
    monkeypatch.setattr(pipeline, "train_from_args", lambda *configs: in_process.append(configs))

    def fake_run(command):
        config_file = command[command.index("--config") + 1]
        launched.append((command, parse_run_config(["--config", config_file])))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch_module.subprocess, "run", fake_run)
    runs = training_runs(config)
    assert {"sft", "cdpo", "dpo", "cdpo_shuffled"} <= set(runs)
    for name, run in runs.items():
        dataset = None if name == "warm_start" else tmp_path / "pairs"
        run.train("some/model", dataset, tmp_path / name)
        run.train("some/model", dataset, tmp_path / name, launch={"accelerate_config": "cpu_zero2", "num_processes": 2})
        command, parsed = launched[-1]
        assert command[1:5] == ["-m", "tokenweave.cli", "train", "--config"]
        assert command[-4:] == ["--accelerate_config", "cpu_zero2", "--num_processes", "2"]
        assert as_dicts(parsed) == as_dicts(in_process[-1]), name
    assert in_process[0][1].seed == 3 and in_process[-1][1].signal_control == "shuffle"


def test_compare_dpo_needs_the_cdpo_config():
    with pytest.raises(ValueError, match="compare_dpo trains a variant of the cdpo_config run"):
        CriticalPipelineConfig(compare_dpo=True)


def test_the_sft_config_is_required_and_must_be_an_sft_run(tmp_path):
    with pytest.raises(ValueError, match="sft_config is required"):
        CriticalPipelineConfig()
    with pytest.raises(FileNotFoundError, match="no-such.yaml"):
        CriticalPipelineConfig(sft_config=str(tmp_path / "no-such.yaml"))
    config = CriticalPipelineConfig(sft_config=str(CONFIGS / "dpo_tiny.yaml"))
    with pytest.raises(ValueError, match="is a 'dpo' run; the pipeline needs a 'sft' run config"):
        training_runs(config)
    bad_key = tiny_sft_config(tmp_path, not_a_field=1)
    with pytest.raises(ValueError, match="not_a_field"):
        training_runs(CriticalPipelineConfig(sft_config=str(bad_key)))


def test_a_bad_cdpo_config_fails_before_any_step(tmp_path, monkeypatch):
    (tmp_path / "cdpo.yaml").write_text((CONFIGS / "cdpo_tiny.yaml").read_text() + "warmup_ratio: 0.1\n")
    monkeypatch.setattr(pipeline, "sample_trajectories", lambda *args, **kwargs: pytest.fail("sampling started"))
    config = CriticalPipelineConfig(
        work_dir=str(tmp_path / "work"),
        sft_config=str(CONFIGS / "critical_sft_tiny.yaml"),
        cdpo_config=str(tmp_path / "cdpo.yaml"),
    )
    with pytest.raises(ValueError, match="warmup_ratio"):
        pipeline.run_critical_pipeline(config)
    assert not (tmp_path / "work").exists()


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny-llama\nnum_sampels_per_prompt: 4\n")
    with pytest.raises(ValueError, match="num_sampels_per_prompt"):
        parse_pipeline_config(["--config", str(path)])


# -- resumable steps --------------------------------------------------------------------------------------


def counting_step(name, config, built, inputs=()):
    """A step that writes ``out.txt`` and counts its builds in ``built``."""

    def build(directory):
        directory.mkdir()
        (directory / "out.txt").write_text(name)
        built.append(name)

    return Step(name, config, build, inputs=inputs)


def test_steps_run_once_record_their_config_and_refuse_a_changed_one(tmp_path):
    built = []

    def steps(size, seed):
        return [counting_step("a", {"size": size}, built), counting_step("b", {"seed": seed}, built, inputs=("a",))]

    outputs = run_steps(tmp_path, steps(size=2, seed=0), "test")
    assert built == ["a", "b"] and outputs == {"a": tmp_path / "a", "b": tmp_path / "b"}
    assert json.loads((tmp_path / "b" / STEP_RECORD).read_text()) == {"seed": 0, "inputs": {"a": {"size": 2, "inputs": {}}}}
    run_steps(tmp_path, steps(size=2, seed=0), "test")
    assert built == ["a", "b"]  # both done already

    with pytest.raises(StepConfigChanged, match=r"(?s)a/: size: 2 -> 3\n  b/: input a/ changed"):
        run_steps(tmp_path, steps(size=3, seed=0), "test")
    with pytest.raises(StepConfigChanged, match=r"b/: seed: 0 -> \(unset\)"):
        run_steps(tmp_path, [counting_step("a", {"size": 2}, built), counting_step("b", {}, built, inputs=("a",))], "t")
    assert built == ["a", "b"]

    shutil.rmtree(tmp_path / "b")  # deleted: redone with the new config
    run_steps(tmp_path, steps(size=2, seed=1), "test")
    assert built == ["a", "b", "b"]


def test_a_failed_step_leaves_no_output_and_a_foreign_directory_is_refused(tmp_path):
    def fail(directory):
        directory.mkdir()
        (directory / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        run_steps(tmp_path, [Step("a", {}, fail)], "test")
    assert not (tmp_path / "a").exists() and (tmp_path / ".a.partial" / "half.txt").exists()
    run_steps(tmp_path, [counting_step("a", {}, [])], "test")  # the stale partial directory is replaced
    assert (tmp_path / "a" / "out.txt").exists() and not (tmp_path / ".a.partial").exists()

    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError, match="has no step_config.json"):
        run_steps(tmp_path, [counting_step("b", {}, [])], "test")
    with pytest.raises(ValueError, match=r"reads \['z'\], which are not earlier steps"):
        run_steps(tmp_path, [counting_step("c", {}, [], inputs=("z",))], "test")
    with pytest.raises(ValueError, match="'inputs' is the record's key"):
        run_steps(tmp_path, [counting_step("c", {"inputs": 1}, [])], "test")


# -- the quickstart ---------------------------------------------------------------------------------------


def test_quickstart_runs_the_pipeline_and_reports_five_models(tmp_path, monkeypatch, capsys):
    # The quickstart on the tiny model: its pipeline config with a warm start, 4 questions, 1 step per training run.
    sft_config = tiny_sft_config(tmp_path, max_steps=1)
    config = yaml.safe_load((CONFIGS / "critical_tiny.yaml").read_text()) | {
        "num_examples": 4, "sft_config": str(sft_config),  # the other run configs: relative to the repository root
        "warm_start_config": "configs/critical_warm_start_tiny.yaml", "rollout_trajectories": 2, "rollout_samples": 2,
        "max_new_tokens": 16,
    }
    monkeypatch.setattr(quickstart, "CONFIG", write_yaml(tmp_path / "critical.yaml", config))
    returned = []
    run_quickstart = quickstart.run_quickstart
    monkeypatch.setattr(quickstart, "run_quickstart", lambda *args, **kwargs: returned.append(
        run_quickstart(*args, **kwargs)) or returned[-1])
    cli_main(["quickstart", "--output_dir", str(tmp_path / "out"), "--num_test_examples", "3"])
    (results,) = returned
    rows = results["rows"]

    assert [row["model"] for row in rows] == [label for label, _ in quickstart.MODELS]
    assert all(row["total"] == 3 and row["correct"] == round(row["accuracy"] * 3) for row in rows)
    work = tmp_path / "out" / "critical"
    for step in ("positive", "cdpo", "dpo", "cdpo_shuffled"):
        assert (work / step / RUN_INFO_FILE).exists()
    evaluated = [json.loads((tmp_path / "out" / f"eval_{name}.json").read_text()) for name in ("base", "warm_start", "dpo")]
    assert evaluated[0]["model"] == "tiny-llama" and evaluated[1]["model"] == str(work / "warm_start")
    assert evaluated[2]["model"] == str(work / "dpo")
    assert json.loads((tmp_path / "out" / quickstart.RESULTS_FILE).read_text()) == results
    assert results["localization"]["num_trajectories"] == len(load_from_disk(str(work / "pairs")))
    assert results["rollout"]["num_trajectories"] <= 2
    printed = capsys.readouterr().out
    assert quickstart.format_summary(results) in printed
    assert "questions have both correct and incorrect samples" in printed and "Rollout test: " in printed
    assert "Localization of the first error" in printed and "| cDPO, shuffled weights |" in printed
    page = (tmp_path / "out" / QUICKSTART_HEATMAP_FILE).read_text()
    pairs = load_from_disk(str(work / "pairs"))
    assert page.count('title="s = ') == sum(len(row["chosen_tokens"]) + len(row["rejected_tokens"]) for row in pairs)
    # its training curves and the table of its runs, with the accuracies it measured
    plots = tmp_path / "out" / QUICKSTART_PLOTS_DIR
    assert Image.open(plots / "loss.png").size[0] > 100
    table = (plots / "runs.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("|")]) == 2 + len(results["runs"])
    assert set(results["runs"]) == {"warm_start", "positive", "negative", "cdpo", "dpo", "cdpo_shuffled"}
    assert any(line.startswith("| warm_start | sft |") for line in table)  # its run: the adapter before the merge
    cdpo_row = next(line for line in table if line.startswith("| cdpo |"))
    accuracy = next(row["accuracy"] for row in rows if row["name"] == "cdpo")
    assert f"| {accuracy:.4g} |" in cdpo_row and "| dpo | cdpo |" in cdpo_row


# -- the warm start, the evidence steps and the shuffled control -----------------------------------------------


def test_a_warm_started_pipeline_starts_every_later_step_from_the_warm_start(tmp_path, monkeypatch):
    cdpo_config = write_yaml(tmp_path / "cdpo.yaml", yaml.safe_load((CONFIGS / "cdpo_tiny.yaml").read_text()) | {"max_steps": 1})
    config = yaml.safe_load((CONFIGS / "critical_tiny.yaml").read_text()) | dict(
        work_dir=str(tmp_path / "work"), num_examples=3, num_samples_per_prompt=3, max_new_tokens=12, seed=5,
        warm_start_config=str(CONFIGS / "critical_warm_start_tiny.yaml"),
        sft_config=str(tiny_sft_config(tmp_path, max_steps=1)), cdpo_config=str(cdpo_config),
        compare_dpo=True, compare_shuffled=True, rollout_trajectories=2, rollout_samples=2,
    )
    runs, sampled = [], []

    def recording_train(run_args, training_args, model_args):
        runs.append((run_args, training_args, model_args))
        return train_from_args(run_args, training_args, model_args)

    def recording_sample(**kwargs):
        sampled.append(kwargs["model"])
        return sample_trajectories(**kwargs)

    sample_trajectories = pipeline.sample_trajectories
    monkeypatch.setattr(pipeline, "train_from_args", recording_train)
    monkeypatch.setattr(pipeline, "sample_trajectories", recording_sample)
    cli_main(["critical", "--config", str(write_yaml(tmp_path / "critical.yaml", config))])
    work = tmp_path / "work"

    # The warm start: its own dataset and seed, from the base model; merged into a plain model directory.
    warm_run, warm_args, warm_model = runs[0]
    assert warm_model.model_name_or_path == "tiny-llama" and warm_run.dataset_name == "arithmetic"
    assert warm_run.task_seed == 1 and warm_args.seed == 0
    assert (work / "warm_start" / "config.json").exists() and not (work / "warm_start" / "adapter_config.json").exists()
    adapter = json.loads((work / "warm_start" / "adapter" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [1]
    # Everything after it starts from it.
    assert sampled == [str(work / "warm_start")]
    assert [model.model_name_or_path for _, _, model in runs[1:]] == [str(work / "warm_start")] * 5
    for side in ("positive", "negative"):
        assert json.loads((work / side / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
            work / "warm_start"
        )
    # The shuffled control: the cDPO run with signal_control shuffle, seeded by the pipeline's seed.
    (_, cdpo_args, _), (_, dpo_args, _), (_, shuffled_args, _) = runs[3:]
    assert (cdpo_args.signal_control, shuffled_args.signal_control) == ("none", "shuffle")
    assert shuffled_args.signal_control_seed == 5 and dpo_args.loss_type == ["sigmoid"]
    differing = {key for key, value in cdpo_args.to_dict().items() if shuffled_args.to_dict()[key] != value}
    assert differing == {"signal_control", "signal_control_seed", "output_dir"}
    # The records: every step after the warm start reads it; the evidence steps read the pairs.
    records = {step: json.loads((work / step / STEP_RECORD).read_text()) for step in ("warm_start", "samples", "rollout")}
    assert records["samples"]["inputs"]["warm_start"] == records["warm_start"]
    assert records["warm_start"]["run"]["dataset_name"] == "arithmetic" and records["warm_start"]["run"]["seed"] == 0
    assert records["rollout"]["num_rollouts"] == 2 and "pairs" in records["rollout"]["inputs"]
    # The evidence and the statistics.
    statistics = json.loads((work / "pairs" / pipeline.STATISTICS_FILE).read_text())
    assert statistics["samples"]["num_trajectories"] == 9 and 0 <= statistics["samples"]["with_both_share"] <= 1
    pairs = load_from_disk(str(work / "pairs"))
    assert statistics["pairs"]["num_pairs"] == len(pairs) and {"solution", "chosen_source"} <= set(pairs.column_names)
    localization = json.loads((work / "localization" / pipeline.REPORT_FILE).read_text())
    assert localization["num_trajectories"] == len(pairs)
    assert localization["num_readable"] + sum(localization["unreadable"].values()) == len(pairs)
    rollout = json.loads((work / "rollout" / pipeline.REPORT_FILE).read_text())
    assert rollout["num_trajectories"] == min(2, len(pairs)) and rollout["num_rollouts"] == 2
    assert all(0 <= entry["critical_correct_share"] <= 1 for entry in rollout["trajectories"])


def test_the_shuffled_control_needs_the_cdpo_config():
    with pytest.raises(ValueError, match="compare_shuffled trains a variant of the cdpo_config run"):
        CriticalPipelineConfig(compare_shuffled=True, sft_config=str(CONFIGS / "critical_sft_tiny.yaml"))
