"""A pipeline step's output is not reused once something replaced it (``tokenweave.pipelines.steps``), and no shipped
run config writes into a pipeline's work directory (running ``configs/critical_sft_tiny.yaml`` on its own used to
replace the positive model the pipeline had scored its pairs with)."""

import shutil
from pathlib import Path

import pytest
import yaml

from tokenweave.pipelines.steps import Step, StepOutputChanged, run_steps

from .conftest import CONFIGS


def write_model(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(b"trained by the pipeline")


def test_a_step_whose_output_was_replaced_is_not_reused(tmp_path):
    built = []
    step = Step("positive", {"seed": 0}, lambda directory: (built.append(1), write_model(directory)))
    run_steps(tmp_path, [step], "test")
    run_steps(tmp_path, [step], "test")  # reused as it is
    (tmp_path / "positive" / "cache-1234.arrow").write_bytes(b"added by a reader")  # an added file is no change
    run_steps(tmp_path, [step], "test")
    assert built == [1]
    model = tmp_path / "positive" / "adapter_model.safetensors"
    copy = tmp_path.parent / (tmp_path.name + "-copy")  # a copy of the work directory (new times) is no change
    shutil.copytree(tmp_path, copy)
    run_steps(copy, [step], "test")
    model.write_bytes(b"trained by another run!")  # a standalone run with its output_dir there: the same size
    with pytest.raises(StepOutputChanged, match=r"The output of the step 'positive' .* changed after the step wrote "
                                                r"it: adapter_model.safetensors replaced or removed"):
        run_steps(tmp_path, [step], "test")
    model.unlink()
    with pytest.raises(StepOutputChanged, match="adapter_model.safetensors replaced or removed"):
        run_steps(tmp_path, [step], "test")
    assert built == [1]


def test_no_shipped_run_config_writes_into_a_pipelines_work_directory():
    configs = {str(path.relative_to(CONFIGS)): yaml.safe_load(path.read_text()) for path in sorted(CONFIGS.rglob("*.yaml"))}
    work_dirs = {name: Path(config["work_dir"]) for name, config in configs.items() if "work_dir" in config}
    output_dirs = {name: Path(config["output_dir"]) for name, config in configs.items() if "method" in config}
    assert len(work_dirs) >= 3 and len(output_dirs) >= 40
    inside = {name: str(output) for name, output in output_dirs.items()
              if any(output == work or work in output.parents for work in work_dirs.values())}
    assert inside == {}
    assert len(set(output_dirs.values())) == len(output_dirs)  # and no two runs share a directory
