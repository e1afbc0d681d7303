"""The critical-token pipeline (sample, label, positive/negative LoRA, score, pairs, cDPO) and the quickstart, on the tiny model."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import Dataset, load_from_disk
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from trl import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

import tokenweave.data.critical as pipeline
import tokenweave.quickstart as quickstart
from tokenweave.cli import main as cli_main
from tokenweave.data.critical import CriticalPipelineConfig, parse_pipeline_config
from tokenweave.data.preferences import SAMPLE_COLUMNS, select_by_answer_frequency
from tokenweave.data.token_columns import tokenize_like_dpo
from tokenweave.inference.scoring import ScoringModel, load_contrastive_models, score_dataset
from tokenweave.models import CHATML_TEMPLATE, build_tiny_llama, build_tiny_tokenizer, resolve_model
from tokenweave.tokens.critical import chunked_contrastive_scores, contrastive_log_scores
from tokenweave.train import RUN_INFO_FILE, train

from .conftest import CONFIGS
from .test_critical_scores import trl_tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


NUM_QUESTIONS, NUM_SAMPLES = 4, 3


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
        sft_max_steps=1,
        sft_batch_size=4,
        cdpo_config=None,
    )
    config_path = directory / "critical.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cli_main(["critical", "--config", str(config_path)])
    return config_path


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


def test_pipeline_rerun_skips_done_steps_and_redoes_a_deleted_one(pipeline_run, monkeypatch):
    work = pipeline_run.parent / "work"
    files = [path for step in ("samples", "sft_data", "positive", "negative") for path in (work / step).rglob("*")]
    mtimes = {path: path.stat().st_mtime_ns for path in files}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    for name in ("sample_trajectories", "train", "score_dataset"):
        monkeypatch.setattr(pipeline, name, must_not_run)
    cli_main(["critical", "--config", str(pipeline_run)])

    # A deleted step (and a stale partial directory of it) is redone; nothing else is.
    scores_before = load_from_disk(str(work / "pairs"))["rejected_scores"]
    shutil.rmtree(work / "pairs")
    (work / ".pairs.partial").mkdir()
    (work / ".pairs.partial" / "junk").write_text("left by an interrupted run")
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "sample_trajectories", must_not_run)
    monkeypatch.setattr(pipeline, "train", must_not_run)
    cli_main(["critical", "--config", str(pipeline_run)])
    assert load_from_disk(str(work / "pairs"))["rejected_scores"] == scores_before
    assert not (work / ".pairs.partial").exists()
    assert {path: path.stat().st_mtime_ns for path in files} == mtimes


def test_pipeline_step_f_trains_cdpo_and_the_dpo_baseline_on_the_scored_pairs(pipeline_run, tmp_path, monkeypatch):
    cdpo_config = yaml.safe_load((CONFIGS / "cdpo_tiny.yaml").read_text()) | {"max_steps": 1}
    (tmp_path / "cdpo.yaml").write_text(yaml.safe_dump(cdpo_config))
    runs = []
    monkeypatch.setattr(pipeline, "train", lambda argv: runs.append(argv) or train(argv))
    cli_main(["critical", "--config", str(pipeline_run), "--cdpo_config", str(tmp_path / "cdpo.yaml"),
              "--compare_dpo", "true"])
    work = pipeline_run.parent / "work"
    for name in ("cdpo", "dpo"):
        info = json.loads((work / name / RUN_INFO_FILE).read_text())
        assert info["method"] == "dpo" and info["global_step"] == 1
    cdpo_argv, dpo_argv = runs  # the SFT runs were done by the fixture
    assert dpo_argv == [arg.replace("/.cdpo.partial", "/.dpo.partial") for arg in cdpo_argv] + ["--loss_type", "sigmoid"]
    assert cdpo_config["loss_type"] == "cdpo"


def test_compare_dpo_needs_the_cdpo_config():
    with pytest.raises(ValueError, match="set cdpo_config"):
        CriticalPipelineConfig(compare_dpo=True)


def test_a_bad_cdpo_config_fails_before_any_step(tmp_path, monkeypatch):
    (tmp_path / "cdpo.yaml").write_text((CONFIGS / "cdpo_tiny.yaml").read_text() + "warmup_ratio: 0.1\n")
    monkeypatch.setattr(pipeline, "sample_trajectories", lambda *args, **kwargs: pytest.fail("sampling started"))
    config = CriticalPipelineConfig(work_dir=str(tmp_path / "work"), cdpo_config=str(tmp_path / "cdpo.yaml"))
    with pytest.raises(ValueError, match="warmup_ratio"):
        pipeline.run_critical_pipeline(config)


# -- the config -------------------------------------------------------------------------------------------


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny-llama\nnum_sampels_per_prompt: 4\n")
    with pytest.raises(ValueError, match="num_sampels_per_prompt"):
        parse_pipeline_config(["--config", str(path)])


def test_shipped_configs_parse_and_sft_args_are_checked():
    for name in ("critical_tiny.yaml", "critical_smollm2.yaml"):
        config = parse_pipeline_config(["--config", str(CONFIGS / name)])
        assert (config.lora_r, config.lora_alpha) == (8, 16)
    with pytest.raises(ValueError, match=r"lora_r \(set it with the pipeline field 'lora_r'\)"):
        CriticalPipelineConfig(sft_args={"lora_r": 4})
    with pytest.raises(ValueError, match="not_a_field"):
        CriticalPipelineConfig(sft_args={"not_a_field": 1})


# -- the quickstart ---------------------------------------------------------------------------------------


def test_quickstart_runs_the_pipeline_and_reports_four_models(tmp_path, monkeypatch):
    # The quickstart on the tiny model: its pipeline config with 4 questions, 1 step per training run.
    config = yaml.safe_load((CONFIGS / "critical_tiny.yaml").read_text()) | {"num_examples": 4, "sft_max_steps": 1}
    (tmp_path / "critical.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(quickstart, "CONFIG", tmp_path / "critical.yaml")
    rows = quickstart.run_quickstart(str(tmp_path / "out"), num_test_examples=3)

    assert [row["model"] for row in rows] == [label for label, _ in quickstart.MODELS]
    assert all(row["total"] == 3 and row["correct"] == round(row["accuracy"] * 3) for row in rows)
    work = tmp_path / "out" / "critical"
    for step in ("positive", "cdpo", "dpo"):
        assert (work / step / RUN_INFO_FILE).exists()
    evaluated = [json.loads((tmp_path / "out" / f"eval_{name}.json").read_text()) for name in ("base", "dpo")]
    assert evaluated[0]["model"] == "tiny-llama" and evaluated[1]["model"] == str(work / "dpo")
    assert json.loads((tmp_path / "out" / quickstart.RESULTS_FILE).read_text())["rows"] == rows
    page = (tmp_path / "out" / quickstart.HEATMAP_FILE).read_text()
    pairs = load_from_disk(str(work / "pairs"))
    assert page.count('title="s = ') == sum(len(row["chosen_tokens"]) + len(row["rejected_tokens"]) for row in pairs)
