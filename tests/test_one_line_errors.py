"""A refused input ends ``tokenweave`` with one line (what, where, the fix) and exit status 2, no traceback
(``--debug`` shows it), before anything heavy loads: a missing dataset path and an uninstalled ``report_to`` backend
before torch and TRL are imported; an unknown DPO ``loss_type`` (which TRL refuses only at the first step) before the
model loads; under launch flags, a bad option in the launching process, once, before any worker starts."""

import importlib.util
import inspect
import re
import subprocess
import sys
import time

import pytest
import transformers
from trl import DPOTrainer

from tokenweave.cli import main
from tokenweave.trainers.dpo import TRL_DPO_LOSS_TYPES

from .conftest import CONFIGS, REPO_ROOT

NOT_INSTALLED_BACKEND = "swanlab"


def run_cli(*args: str, env_debug: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """``tokenweave <args>`` in a fresh interpreter that reports, on its last stdout line, whether torch or TRL were
    imported; ``(the finished process, its wall seconds)``."""
    code = ("import sys\nfrom tokenweave.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
            "    print('imported:', sorted(m for m in ('torch', 'trl') if m in sys.modules))")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin",
           **({"TOKENWEAVE_DEBUG": "1"} if env_debug else {})}
    start = time.perf_counter()
    finished = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                              env=env, timeout=300)
    return finished, time.perf_counter() - start


def one_error_line(finished: subprocess.CompletedProcess) -> str:
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == 2 and len(lines) == 1, finished.stderr
    assert "Traceback" not in finished.stderr
    return lines[0]


def test_a_missing_dataset_path_is_one_line_before_torch_is_imported(tmp_path):
    output_dir = tmp_path / "run"
    finished, _ = run_cli("train", "--config", str(CONFIGS / "sft_tiny.yaml"), "--dataset_name", "data/missing.jsonl",
                          "--output_dir", str(output_dir))
    line = one_error_line(finished)
    assert line.startswith("tokenweave train: error: dataset_name 'data/missing.jsonl': no such file or folder")
    assert "give an existing dataset path" in line
    assert finished.stdout.strip().splitlines()[-1] == "imported: []" and not output_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec(NOT_INSTALLED_BACKEND) is not None, reason="the backend is installed")
def test_an_uninstalled_report_to_backend_names_what_to_install_before_torch():
    finished, _ = run_cli("train", "--config", str(CONFIGS / "sft_tiny.yaml"), "--report_to", NOT_INSTALLED_BACKEND)
    assert one_error_line(finished) == (f"tokenweave train: error: report_to {NOT_INSTALLED_BACKEND!r}: "
                                        f"{NOT_INSTALLED_BACKEND} is not installed; pip install {NOT_INSTALLED_BACKEND}, "
                                        "or set report_to: none.")
    assert finished.stdout.strip().splitlines()[-1] == "imported: []"


def test_debug_shows_the_traceback():
    """``tokenweave --debug train ...`` or TOKENWEAVE_DEBUG=1; ``--debug`` after ``train`` is transformers' option."""
    args = ("train", "--config", str(CONFIGS / "sft_tiny.yaml"), "--dataset_name", "./missing.jsonl")
    for finished in (run_cli("--debug", *args)[0], run_cli(*args, env_debug=True)[0]):
        assert finished.returncode == 1 and "Traceback" in finished.stderr and "ConfigError" in finished.stderr


def test_an_unknown_dpo_loss_type_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path, tiny_model_cache):
    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the loss_type was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(CONFIGS / "dpo_tiny.yaml"), "--loss_type", "sigmoidd",
              "--output_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and time.perf_counter() - start < 20  # today: 37 s, at step 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tokenweave train: error: Unknown loss_type ['sigmoidd']: TRL's DPO losses are sigmoid, ")
    assert "tokenweave's token-level losses are aligndistil, cdpo" in line and not (tmp_path / "run").exists()


def test_trl_dpo_loss_types_mirror_trls_own_branches():
    """TRL_DPO_LOSS_TYPES is every ``loss_type == "..."`` branch of TRL's DPOTrainer._compute_loss, and only those."""
    source = inspect.getsource(DPOTrainer._compute_loss)
    assert sorted(set(re.findall(r'loss_type == "(\w+)"', source))) == sorted(TRL_DPO_LOSS_TYPES)


def test_under_launch_flags_a_bad_option_is_refused_once_before_workers_start():
    finished, seconds = run_cli("train", "--config", str(CONFIGS / "dpo_tiny.yaml"), "--beta", "-1",
                                "--accelerate_config", "cpu_ddp", "--num_processes", "2")
    line = one_error_line(finished)  # one line: not one per worker
    assert line.startswith("tokenweave train: error: Invalid TokenDPOConfig option(s): beta must be")
    assert "torch" in finished.stdout  # parsed in this process (TRL's config), not in launched workers


def test_an_error_from_deep_in_a_library_keeps_its_traceback(monkeypatch, capsys):
    """Only a refused input is one line: a ValueError raised inside a library while the work runs is a bug to see."""
    import tokenweave.cli as cli

    def library_failure(args):
        import json

        json.loads("{")  # raises json.JSONDecodeError (a ValueError) inside the json module

    monkeypatch.setattr(cli, "_env_command", library_failure)
    with pytest.raises(ValueError, match="Expecting property name"):
        main(["env"])


def test_a_multi_process_grpo_config_is_checked_as_its_workers_see_it(monkeypatch, tmp_path):
    """A generation batch of 2 x 2 processes is divisible by num_generations 4: valid under --num_processes 2, refused
    by TRL in one process. The launcher checks it with the planned world size, then launches."""
    import tokenweave.launch as launch

    launched = []
    monkeypatch.setattr(launch, "relaunch", lambda module, argv, options: launched.append(argv) or True)
    config = tmp_path / "grpo.yaml"
    config.write_text((CONFIGS / "grpo_tiny.yaml").read_text().replace("per_device_train_batch_size: 4",
                                                                       "per_device_train_batch_size: 2"))
    argv = ["train", "--config", str(config), "--output_dir", str(tmp_path / "run")]
    main([*argv, "--num_processes", "2", "--accelerate_config", "cpu_ddp"])
    assert len(launched) == 1
    with pytest.raises(SystemExit):  # on one process the same config is refused, as TRL refuses it
        main([*argv, "--num_processes", "1", "--accelerate_config", "cpu_ddp"])
