"""Resuming as a requeued job does it (``tokenweave.resume``): a finished run resumes to nothing and leaves its model
as it is; a newest checkpoint with a truncated trainer state, weights file or optimizer archive is skipped with a
warning naming the file; a checkpoint of another method or model is refused, naming both."""

import json
import struct

import pytest
import torch

from tokenweave.config import parse_run_config
from tokenweave.resume import checkpoint_problem, resume_checkpoint
from tokenweave.run_files import RUN_IDENTITY_FILE
from tokenweave.train import train_from_args

from .conftest import CONFIGS
from .distributed.runs import RecordSteps, callbacks_added


def write_safetensors(path, truncate_by: int = 0) -> None:
    """A one-tensor safetensors file (4 float32 values), cut short by ``truncate_by`` bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    data = struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1, 2, 3, 4)
    path.write_bytes(data[:len(data) - truncate_by])


def make_checkpoint(directory, step: int, state: str = '{"global_step": 1}') -> object:
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(state)
    write_safetensors(checkpoint / "model.safetensors")
    torch.save({"step": step}, checkpoint / "optimizer.pt")
    return checkpoint


@pytest.mark.parametrize("damage", ["state", "weights", "optimizer", "deepspeed"])
def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file(tmp_path, caplog, damage):
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    damaged = {"state": newest / "trainer_state.json", "weights": newest / "model.safetensors",
               "optimizer": newest / "optimizer.pt",
               "deepspeed": newest / "global_step4" / "mp_rank_00_model_states.pt"}[damage]
    if damage == "state":
        damaged.write_text('{"global_step": 4, "log_hist')  # a write cut short
    elif damage == "weights":
        write_safetensors(damaged, truncate_by=5)
    else:
        damaged.parent.mkdir(exist_ok=True)
        torch.save({"step": 4}, damaged)
        damaged.write_bytes(damaged.read_bytes()[:-30])
    assert checkpoint_problem(newest).startswith(str(damaged))
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(tmp_path, True) == str(tmp_path / "checkpoint-2")
    assert f"Skipping the checkpoint checkpoint-4, which cannot be resumed from: {damaged}" in caplog.text
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None


@pytest.fixture(scope="module")
def finished_sft_run(tmp_path_factory):
    """A 2-step tiny SFT run with a checkpoint at each step, finished (run_info.json written); the built-in models
    cached in this session's temporary directory for the module's tests."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    argv = ["--config", str(CONFIGS / "sft_tiny.yaml"), "--max_steps", "2", "--save_strategy", "steps",
            "--save_steps", "1", "--output_dir", str(output_dir)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENWEAVE_CACHE", str(tmp_path_factory.getbasetemp() / "tokenweave-cache"))
        yield argv, output_dir, train_from_args(*parse_run_config(argv))


def test_a_finished_run_resumes_to_nothing_and_keeps_its_model(finished_sft_run, caplog):
    argv, output_dir, info = finished_sft_run
    model_files = {path: path.stat().st_mtime_ns for path in output_dir.glob("*.safetensors")}
    assert model_files and json.loads((output_dir / "checkpoint-2" / RUN_IDENTITY_FILE).read_text())["method"] == "sft"
    counter = RecordSteps()
    with callbacks_added(counter), caplog.at_level("WARNING"):
        again = train_from_args(*parse_run_config([*argv, "--resume_from_checkpoint", "true"]))
    assert counter.steps == [] and again["global_step"] == info["global_step"] == 2
    assert info["tokenweave"]["version"] and info["tokenweave"]["git_commit"]  # the code that trained it
    assert "has finished (step 2): nothing to resume" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in output_dir.glob("*.safetensors")} == model_files


def test_resuming_another_methods_checkpoint_is_refused_naming_both(finished_sft_run):
    argv, output_dir, _ = finished_sft_run
    other = ["--config", str(CONFIGS / "sft_dft_tiny.yaml"), "--max_steps", "4", "--output_dir", str(output_dir),
             "--resume_from_checkpoint", "true"]
    with pytest.raises(ValueError, match=r"was trained by another run \(token_signals \[\] there, \['dft'\] here"):
        train_from_args(*parse_run_config(other))
    model = ["--model_name_or_path", "tiny-llama-reference"]
    with pytest.raises(ValueError, match="model_name_or_path 'tiny-llama' there, 'tiny-llama-reference' here"):
        train_from_args(*parse_run_config([*argv, *model, "--max_steps", "4", "--resume_from_checkpoint", "true"]))


def test_a_finished_run_without_checkpoints_resumes_to_nothing(tmp_path, tiny_model_cache):
    argv = ["--config", str(CONFIGS / "sft_tiny.yaml"), "--max_steps", "1", "--output_dir", str(tmp_path / "run")]
    train_from_args(*parse_run_config(argv))  # save_strategy: "no"
    counter = RecordSteps()
    with callbacks_added(counter):
        again = train_from_args(*parse_run_config([*argv, "--resume_from_checkpoint", "true"]))
    assert counter.steps == [] and again["completed"] and again["global_step"] == 1


def test_a_finished_run_asked_for_more_steps_resumes_from_its_checkpoint(finished_sft_run):
    argv, _, _ = finished_sft_run  # last in this module: it trains the shared run on
    counter = RecordSteps()
    with callbacks_added(counter):
        resumed = train_from_args(*parse_run_config([*argv, "--max_steps", "3", "--resume_from_checkpoint", "true"]))
    assert counter.steps == [3] and resumed["global_step"] == 3 and resumed["completed"]
