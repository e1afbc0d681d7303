"""Which tokenweave made a result: the version and git commit (``tokenweave.provenance``) in ``tokenweave env`` and
the model card; the card names the dataset and tells TRL's ``loss_type: dapo`` from tokenweave's ``policy_loss: dapo``."""

import json
import re
import subprocess
import tomllib

import pytest
import yaml

import tokenweave
from tokenweave import provenance
from tokenweave.config import parse_run_config
from tokenweave.environment import environment
from tokenweave.trainers.card import ModelCardMixin, token_method

from .conftest import CONFIGS, REPO_ROOT


def git(*arguments: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *arguments], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def uncached_state():
    """:func:`provenance.provenance` reads the package's state afresh in this test (and again after it)."""
    provenance._this_package_state.cache_clear()
    yield
    provenance._this_package_state.cache_clear()


def test_the_version_is_pyprojects():
    with open(REPO_ROOT / "pyproject.toml", "rb") as file:
        assert tokenweave.__version__ == tomllib.load(file)["project"]["version"]


def test_a_checkout_is_described_by_its_commit_and_whether_it_is_dirty(uncached_state):
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    assert provenance.provenance() == {"version": tokenweave.__version__, "git_commit": commit, "git_dirty": dirty}
    assert provenance.version_string() == (
        f"tokenweave {tokenweave.__version__} (git {commit[:7]}{', dirty' if dirty else ''})")
    assert environment()["tokenweave version"] == provenance.version_string().removeprefix("tokenweave ")


def test_a_package_in_another_repository_or_in_none_is_no_checkout(tmp_path):
    """A package installed in a folder that is no repository, or deep in someone else's repository (a virtual
    environment inside a project), has no commit of its own."""
    package = tmp_path / "project" / "venv" / "site-packages" / "tokenweave"
    package.mkdir(parents=True)
    assert provenance.checkout_state(package) is None
    subprocess.run(["git", "init", "-q", str(tmp_path / "project")], check=True)
    subprocess.run(["git", "-C", str(tmp_path / "project"), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "project"], check=True)
    assert provenance.checkout_state(package) is None
    (tmp_path / "project" / "tokenweave").mkdir()
    assert provenance.checkout_state(tmp_path / "project" / "tokenweave")[1] is False  # at the top: a checkout


def test_an_installed_package_reads_the_commit_it_was_built_from(tmp_path, monkeypatch, uncached_state):
    """A package folder that is no checkout, with the build's record beside the module."""
    (tmp_path / provenance.BUILD_INFO_FILE).write_text(json.dumps({"git_commit": "a" * 40, "git_dirty": True}))
    monkeypatch.setattr(provenance, "PACKAGE_DIR", tmp_path)
    assert provenance.provenance() == {"version": tokenweave.__version__, "git_commit": "a" * 40, "git_dirty": True}
    assert provenance.version_string() == f"tokenweave {tokenweave.__version__} (git aaaaaaa, dirty)"


def test_without_a_checkout_or_a_build_record_the_commit_is_unknown(tmp_path, monkeypatch, uncached_state):
    monkeypatch.setattr(provenance, "PACKAGE_DIR", tmp_path)
    assert provenance.provenance() == {"version": tokenweave.__version__, "git_commit": "unknown", "git_dirty": None}
    assert provenance.version_string() == f"tokenweave {tokenweave.__version__}"


# -- the model card --------------------------------------------------------------------------------------------------


class CardOnly(ModelCardMixin):
    """What :meth:`ModelCardMixin.create_model_card` reads of a GRPO trainer, without building one."""

    trainer_kind, _tag_names, _paper, _name, hub_model_id = "grpo", ["trl", "grpo"], {}, "GRPO", None

    def __init__(self, args):
        self.args = args

    def is_world_process_zero(self):
        return True

    def model_base_name(self):
        return "smollm2-135m"


def grpo_args(config: str, tmp_path):
    return parse_run_config(["--config", str(CONFIGS / config), "--output_dir", str(tmp_path)])[1]


def card(args, **kwargs) -> tuple[dict, str]:
    """The front matter and the text of the card written for a GRPO run with ``args``."""
    CardOnly(args).create_model_card(model_name="run", **kwargs)
    text = open(f"{args.output_dir}/README.md").read()
    return yaml.safe_load(text.split("---")[1]), text


def test_trls_dapo_and_tokenweaves_dapo_are_named_apart(tmp_path):
    """``grpo_tiny.yaml`` runs TRL's ``loss_type: dapo``; ``dapo_tiny.yaml`` tokenweave's ``policy_loss: dapo``,
    which sets ``loss_type: dapo`` too: the method names, the tags and the cards' loss lines differ."""
    trl_args, tokenweave_args = grpo_args("grpo_tiny.yaml", tmp_path / "trl"), grpo_args("dapo_tiny.yaml", tmp_path)
    assert trl_args.loss_type == tokenweave_args.loss_type == "dapo"
    assert token_method(trl_args, "grpo")["method"] == "trl-dapo"
    assert token_method(tokenweave_args, "grpo")["method"] == "dapo"
    (trl_meta, trl_card), (tokenweave_meta, tokenweave_card) = card(trl_args), card(tokenweave_args)
    assert "trl-dapo" in trl_meta["tags"] and "dapo" not in trl_meta["tags"]
    assert "dapo" in tokenweave_meta["tags"] and "trl-dapo" not in tokenweave_meta["tags"]
    assert "- loss: TRL's GRPO loss, `loss_type: dapo`" in trl_card
    assert "- loss: tokenweave's registered policy loss `policy_loss: dapo`" in tokenweave_card


def test_the_card_names_the_tokenweave_version_and_the_dataset(tmp_path):
    args = grpo_args("grpo_tiny.yaml", tmp_path)
    meta, text = card(args, dataset_name="arithmetic")
    assert f"- trained with: {provenance.version_string()}" in text
    assert "- dataset: `arithmetic`" in text and "datasets" not in meta  # a built-in task: no hub link
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    trainer = CardOnly(args)
    trainer.card_dataset_name = "openai/gsm8k"  # as `tokenweave train` sets it: every card names it
    trainer.create_model_card(model_name="run")
    text = (tmp_path / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["datasets"] == "openai/gsm8k"
    assert "- dataset: `openai/gsm8k`" in text

    local = tmp_path / "my-pairs"
    local.mkdir()
    meta, text = card(args, dataset_name=str(local))
    assert "- dataset: `my-pairs` (a local dataset)" in text and str(tmp_path) not in text and "datasets" not in meta
    assert re.search(r"- trained with: tokenweave \S+", text)


def test_version_flag_prints_the_version_and_commit(capsys):
    from tokenweave.cli import main
    from tokenweave.provenance import version_string

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.strip() == version_string()
