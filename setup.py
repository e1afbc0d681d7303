"""The package list, which pyproject.toml cannot declare (its ``packages`` is either a list or a ``find``, not both):
every ``tokenweave*`` package found in the tree, plus ``tokenweave.launch_configs``, the top-level ``launch/`` folder
mapped into the package (``[tool.setuptools.package-dir]`` in pyproject.toml). So the accelerate configs have one
copy in the repository, ``launch/*.yaml``, and the wheel ships them as ``tokenweave/launch_configs/*.yaml``, where
``tokenweave.launch`` finds them by name.

A wheel built from a git checkout also carries ``tokenweave/build_info.json``, the commit it was built from (and
whether the tracked files differed from it), which :mod:`tokenweave.provenance` reads where there is no checkout to
ask. Everything else about the build is in pyproject.toml."""

import json
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def git(*arguments: str) -> str | None:
    """``git <arguments>`` in this checkout: its output, or None without git or outside a checkout."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *arguments], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


class BuildPyWithCommit(build_py):
    """setuptools' ``build_py``, then ``build_info.json`` into the built package (a wheel from a checkout of this
    repository; an editable install reads the checkout itself)."""

    def run(self):
        super().run()
        top = git("rev-parse", "--show-toplevel")
        if self.editable_mode or top is None or Path(top).resolve() != ROOT:
            return
        record = {"git_commit": git("rev-parse", "HEAD"),
                  "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
        (Path(self.build_lib) / "tokenweave" / "build_info.json").write_text(json.dumps(record) + "\n")


setup(packages=[*find_packages(include=["tokenweave*"]), "tokenweave.launch_configs"],
      cmdclass={"build_py": BuildPyWithCommit})
