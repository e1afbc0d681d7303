"""The ``tokenweave`` command as a TRL user meets it: help with defaults for every option, launch flags as ``trl``
has them, ``tokenweave env``, and clear refusals (``tokenweave plot``: test_plots.py)."""

import pytest

from tokenweave.cli import build_parser
from tokenweave.cli import main as cli_main
from tokenweave.environment import STACK, environment
from tokenweave.launch import accelerate_config_names, resolve_accelerate_config, split_launch_arguments
from tokenweave.pipelines.quickstart import NUM_TEST_EXAMPLES

from .conftest import LAUNCH, REPO_ROOT


def subcommands():
    parser = build_parser()
    (choices,) = [action.choices for action in parser._actions if getattr(action, "choices", None)]
    return choices


def test_every_option_of_every_command_has_help_and_shows_its_default():
    for name, command in subcommands().items():
        options = [action for action in command._actions if action.option_strings and action.dest != "help"]
        options = [action for action in options if action.dest != "debug"]  # the switch of every command: off
        for action in options:
            assert action.help, f"tokenweave {name} {action.option_strings[0]} has no help text"
        if options:
            assert "(default:" in command.format_help(), name
    quickstart_help = subcommands()["quickstart"].format_help()
    assert f"(default: {NUM_TEST_EXAMPLES})" in " ".join(quickstart_help.split())


def test_train_help_without_a_method_is_a_usage_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli_main(["train", "--help"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert "--accelerate_config" in printed and "usage: tokenweave train --config FILE.yaml" in printed


def test_critical_without_a_config_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="needs --config"):
        cli_main(["critical"])
    assert list(tmp_path.iterdir()) == []


def test_launch_flags_are_split_from_the_run_flags():
    launch, rest = split_launch_arguments(["--config", "c.yaml", "--accelerate_config", "zero2", "--num_processes",
                                           "2", "--max_steps", "3"])
    assert launch == {"accelerate_config": "zero2", "num_processes": 2}
    assert rest == ["--config", "c.yaml", "--max_steps", "3"]
    assert split_launch_arguments(["--config", "c.yaml"]) == ({}, ["--config", "c.yaml"])


def test_accelerate_configs_by_name_or_path():
    assert {"ddp", "zero2", "zero3", "zero3_offload", "fsdp2", "cpu_zero2", "cpu_zero3", "cpu_ddp"} <= set(
        accelerate_config_names())
    assert resolve_accelerate_config("zero3") == LAUNCH / "zero3.yaml"  # the one copy: launch/, not in the package
    assert not list((REPO_ROOT / "tokenweave").rglob("*.yaml"))
    assert resolve_accelerate_config(str(resolve_accelerate_config("zero2"))).name == "zero2.yaml"
    with pytest.raises(ValueError, match="one of .*cpu_zero2"):
        resolve_accelerate_config("zero4")


def test_the_fsdp2_launch_config_parses_as_fsdp_version_2():
    """FSDP2 cannot run on CPU (accelerate turns FSDP on for accelerator devices only; a use_cpu run is refused,
    README), so its config is checked by accelerate's own parser."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(resolve_accelerate_config("fsdp2")))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2


def test_env_prints_every_version(capsys):
    cli_main(["env"])
    printed = capsys.readouterr().out
    for _, label in STACK:
        assert f"- {label} version: " in printed
    assert environment()["PyTorch version"].startswith("2.") and "Built-in model cache" in printed


def test_progress_that_the_modules_log_is_shown_on_the_commands_stdout(tmp_path, capsys):
    from tokenweave.cli import show_progress
    from tokenweave.pipelines.steps import Step, run_steps

    show_progress()
    show_progress()  # once: no second handler
    step = Step("a", {}, lambda staging: (staging.mkdir(), (staging / "out.txt").write_text("1")))
    run_steps(tmp_path, [step], "test")
    run_steps(tmp_path, [step], "test")
    printed = capsys.readouterr().out
    assert printed.count("[test] a: running") == 1 and printed.count("[test] a: done already") == 1


def test_an_unrecognized_argument_of_a_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli_main(["env", "--verbose"])
    assert stopped.value.code == 2 and "unrecognized arguments: --verbose" in capsys.readouterr().err
