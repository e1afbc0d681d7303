"""The package's layers: every module imports only from its own layer and the layers below it, and no module imports
itself through others (no import cycle, within a layer either).

The order (DESIGN.md; the README's layout section), top to bottom::

    cli.py, heatmap.py  >  pipelines/  >  train.py, config.py  >  inference/  >  trainers/  >  losses/  >  tokens/
    >  models/, data/, rewards/, checks.py, registry.py, stats.py

Every ``import`` and ``from ... import`` of the package's modules is read with ``ast``: at module level, under
``if TYPE_CHECKING:`` and inside functions alike (they tie the modules just the same), relative imports resolved
against the importing module.
"""

import ast
from pathlib import Path

from .conftest import REPO_ROOT

PACKAGE = "tokenweave"
LAYERS = (
    ("models", "data", "rewards", "checks", "registry", "stats", "run_files", "provenance"),
    ("tokens",),
    ("losses",),
    ("trainers",),
    ("inference",),
    ("train", "config", "launch", "preflight", "resume"),
    ("pipelines",),
    ("cli", "heatmap", "environment", "plots"),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path, package_dir: Path) -> str:
    """``tokenweave.pipelines.critical`` for ``<package_dir>/pipelines/critical.py`` (a package: its ``__init__``)."""
    parts = [PACKAGE, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every package module that the file at ``path`` imports."""
    is_package = path.name == "__init__.py"
    imports = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imports += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from . import x` may import the submodule x: name it, so that its layer is checked.
            imports += [(node.lineno, f"{target}.{alias.name}") for alias in node.names] if not node.module else []
            imports.append((node.lineno, target))
    return [(line, name) for line, name in imports if name == PACKAGE or name.startswith(PACKAGE + ".")]


def layer_of(module: str) -> str | None:
    """The package part a module belongs to (``pipelines`` for ``tokenweave.pipelines.critical``); None: the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(package_dir: Path) -> list[str]:
    """Every import in the package at ``package_dir`` that runs up the layers, and every module without a layer."""
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        module = module_name(path, package_dir)
        importer = layer_of(module)
        if importer is None:
            continue  # the package's __init__: imports nothing of its own
        if importer not in RANK:
            problems.append(f"{path.relative_to(package_dir.parent)}: {importer!r} has no layer in LAYERS")
            continue
        for line, imported in imported_modules(path, module):
            target = layer_of(imported)
            if target is None or target == importer:
                continue
            if target not in RANK:
                problems.append(f"{path.relative_to(package_dir.parent)}:{line} imports {imported}, which has no layer")
            elif RANK[target] > RANK[importer]:
                problems.append(
                    f"{path.relative_to(package_dir.parent)}:{line} imports {imported}: {importer} "
                    f"(layer {RANK[importer]}) must not import {target} (layer {RANK[target]}), a layer above it"
                )
    return problems


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module → the package's modules it imports (each import resolved to the most specific module that exists: a
    file, or a package's ``__init__``)."""
    modules = {module_name(path, package_dir): path for path in sorted(package_dir.rglob("*.py"))}

    def existing(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {module: {target for _, imported in imported_modules(path, module)
                     if (target := existing(imported)) not in (None, module)}
            for module, path in modules.items()}


def import_cycles(package_dir: Path) -> list[list[str]]:
    """Every import cycle of the package, as the modules around it (one per strongly connected component of the
    import graph with more than one module; Tarjan's algorithm)."""
    graph = import_graph(package_dir)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_runs_up_the_layers():
    assert layer_violations(REPO_ROOT / PACKAGE) == []


def test_the_package_has_no_import_cycle():
    assert import_cycles(REPO_ROOT / PACKAGE) == []


def test_a_cycle_through_type_checking_or_a_function_is_found(tmp_path):
    package = tmp_path / PACKAGE
    (package / "trainers").mkdir(parents=True)
    (package / "trainers" / "__init__.py").write_text("")
    (package / "trainers" / "signals.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .grpo import Trainer\n")
    (package / "trainers" / "grpo.py").write_text("from .signals import Signal\n")
    (package / "trainers" / "card.py").write_text("def method():\n    from .dpo import Config\n")
    (package / "trainers" / "dpo.py").write_text("from . import card\n")
    (package / "trainers" / "host.py").write_text("from .signals import Signal\n")  # imports, closes no cycle
    assert import_cycles(package) == [
        ["tokenweave.trainers.card", "tokenweave.trainers.dpo"],
        ["tokenweave.trainers.grpo", "tokenweave.trainers.signals"],
    ]


def test_relative_imports_resolve_against_the_importing_module(tmp_path):
    package = tmp_path / PACKAGE
    (package / "tokens").mkdir(parents=True)
    (package / "tokens" / "__init__.py").write_text("from . import entropy\nfrom ..losses import policy\n")
    (package / "tokens" / "entropy.py").write_text("from .. import inference\nimport tokenweave.models\n")
    assert imported_modules(package / "tokens" / "__init__.py", "tokenweave.tokens") == [
        (1, "tokenweave.tokens.entropy"), (1, "tokenweave.tokens"), (2, "tokenweave.losses")
    ]
    assert [problem.split(": ", 1)[0] for problem in layer_violations(package)] == [
        "tokenweave/tokens/__init__.py:2 imports tokenweave.losses",
        "tokenweave/tokens/entropy.py:1 imports tokenweave.inference",
    ]


def test_the_run_file_names_are_transformers_own():
    """``tokenweave.run_files`` names transformers' checkpoint files without importing it: the same names."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from tokenweave import run_files

    assert (run_files.TRAINER_STATE_NAME, run_files.PREFIX_CHECKPOINT_DIR) == (TRAINER_STATE_NAME, PREFIX_CHECKPOINT_DIR)
