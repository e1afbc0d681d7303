"""Which tokenweave made a run, a model card or a bug report: its version and the git commit of its code.

A result is only reproducible from the code that made it, and ``0.1.0`` names many commits. So ``run_info.json``
(:func:`provenance`), the model card, ``tokenweave env`` and ``tokenweave --version`` (:func:`version_string`, e.g.
``tokenweave 0.1.0 (git 1582fad, dirty)``) record the commit, found in this order:

- **a git checkout** (an editable install or the repository itself): ``git rev-parse HEAD`` of the repository whose
  top level holds this package, and "dirty" when its tracked files differ from that commit (as ``git describe
  --dirty``; untracked files do not count). A package installed into a folder that happens to sit inside some other
  repository (a virtual environment in a project) is not taken for a checkout: the top level must be this package's
  parent folder.
- **the build**: ``build_info.json`` beside this module, ``{"git_commit": ..., "git_dirty": ...}``, written into a
  wheel when it is built from a checkout.
- else the commit is "unknown" (a wheel built from an sdist), and the version string has no git part.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

from tokenweave import __version__  # absolute: the package root, not a module of a layer

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_INFO_FILE = "build_info.json"
"""The commit a wheel was built from (in the package folder), for an installed package that is no git checkout."""
UNKNOWN_COMMIT = "unknown"


def _git(repository: Path, *arguments: str) -> str | None:
    """The stripped stdout of ``git -C repository ARGUMENTS``; None when git is missing or fails (not a checkout, a
    repository git refuses to read)."""
    try:
        done = subprocess.run(["git", "-C", str(repository), *arguments], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def checkout_state(package_dir: Path) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout whose top level holds ``package_dir``; None when it is not in one."""
    lines = (_git(package_dir, "rev-parse", "--show-toplevel", "HEAD") or "").splitlines()
    if len(lines) != 2 or Path(lines[0]).resolve() != package_dir.resolve().parent:
        return None
    changes = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    return lines[1], bool(changes)


def build_state(package_dir: Path) -> tuple[str, bool] | None:
    """``(commit, dirty)`` recorded in ``package_dir / build_info.json`` when the package was built; None without one."""
    path = package_dir / BUILD_INFO_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    return recorded["git_commit"], bool(recorded["git_dirty"])


@functools.lru_cache(maxsize=1)
def _this_package_state() -> tuple[str, bool] | None:
    """This package's ``(commit, dirty)``, from its checkout or its build; read once per process (git runs once)."""
    return checkout_state(PACKAGE_DIR) or build_state(PACKAGE_DIR)


def provenance() -> dict:
    """What ``run_info.json`` records of the code that ran: ``{"version", "git_commit", "git_dirty"}``
    (``git_commit`` "unknown" and ``git_dirty`` None when neither a checkout nor the build says)."""
    state = _this_package_state()
    commit, dirty = state if state else (UNKNOWN_COMMIT, None)
    return {"version": __version__, "git_commit": commit, "git_dirty": dirty}


def describe(record: dict) -> str:
    """``0.1.0 (git 1582fad, dirty)`` for a :func:`provenance` record: the version, then the short commit when known
    and "dirty" when the code differed from it."""
    if record["git_commit"] == UNKNOWN_COMMIT:
        return record["version"]
    return f"{record['version']} (git {record['git_commit'][:7]}{', dirty' if record['git_dirty'] else ''})"


def version_string() -> str:
    """``tokenweave 0.1.0 (git 1582fad, dirty)``: what ``tokenweave --version`` prints and the model card shows."""
    return f"tokenweave {describe(provenance())}"
