"""Names in a registry, or your own ``package.module:attribute``: the one lookup of every tokenweave registry (policy
losses, preference losses, token signals, reward functions, rank gain functions, item parsers), and the
:class:`Paper` a registered method cites.

A registry is a plain dict from name to object, filled by its module's decorator. :func:`lookup` answers a registered
name, imports ``package.module`` for a name with a colon and returns its attribute, and otherwise raises one
``ValueError`` that lists the registered names, so that a typo in a config fails before anything heavy loads.

A ``package.module`` is imported from the current directory (put on ``sys.path`` as TRL's scripts do for reward
functions, whether the run has one process or a launcher started many) or the installed packages: a config that names
code runs that code, so run only configs you trust.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Paper:
    """The paper a method comes from, as the model card cites it and ``run_info.json`` records it."""

    title: str
    arxiv: str
    key: str
    authors: str
    year: int

    def bibtex(self) -> str:
        return (f"@misc{{{self.key},\n    title         = {{{{{self.title}}}}},\n"
                f"    author        = {{{self.authors}}},\n    year          = {self.year},\n"
                f"    eprint        = {{{self.arxiv}}},\n    archivePrefix = {{arXiv}},\n}}")


def lookup(name: str, registry: Mapping[str, T], what: str, accepts: Callable[[object], bool] = callable,
           expected: str = "function") -> T:
    """``registry[name]``, or the attribute at ``package.module:attribute`` (importing the module, which may register
    it). ``what`` names the kind of thing in the errors ("policy loss"); ``accepts`` checks an imported attribute,
    which ``expected`` describes ("function", "TokenSignal subclass")."""
    if name in registry:
        return registry[name]
    if ":" not in name:
        raise ValueError(f"unknown {what} {name!r}; registered: {', '.join(sorted(registry))}, or "
                         f"'package.module:{expected.split()[0]}'")
    module_name, _, attribute = name.partition(":")
    if os.getcwd() not in sys.path:  # as TRL's scripts import user reward functions: the same on one process or many
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {name!r}: cannot import {module_name!r} ({err})") from err
    found = getattr(module, attribute, None)
    if found is None:
        raise ValueError(f"{what} {name!r}: {module_name} has no {expected} {attribute!r}")
    if not accepts(found):
        raise ValueError(f"{what} {name!r} is not a {expected}")
    return found
