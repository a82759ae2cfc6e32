"""Dependencies between shira_dist's subpackages run one way, read from the source with ``ast``:

    entry, launch ─► training ─► distributed ─► core ─► kernels

    entry        shira_dist/train.py, shira_dist/cli.py     the commands
    launch       launch/          (installed as shira_dist.launch)
    training     shira_dist/training/
    distributed  shira_dist/distributed/
    core         shira_dist/*.py, shira_dist/masks/
    kernels      kernels/         (installed as shira_dist.kernels)

Every import counts, also one inside a function or through ``importlib.import_module("...")``:
a lazy import ("as a plugin") is still a dependency. Imports of anything outside shira_dist
(torch, transformers, ...) are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A layer may import only layers of a higher rank (further down the chain).
RANK = {"entry": 0, "launch": 0, "training": 1, "distributed": 2, "core": 3, "kernels": 4}
ENTRY_POINTS = ("shira_dist.train", "shira_dist.cli")
# directory (relative to the root) -> (its module name, its layer, whether subfolders belong to it)
SOURCES = {
    "shira_dist": ("shira_dist", "core", False),
    "shira_dist/masks": ("shira_dist.masks", "core", True),
    "shira_dist/training": ("shira_dist.training", "training", True),
    "shira_dist/distributed": ("shira_dist.distributed", "distributed", True),
    "kernels": ("shira_dist.kernels", "kernels", True),
    "launch": ("shira_dist.launch", "launch", True),
}


def layer_of(module: str) -> str | None:
    """The layer of an absolute module name; None outside shira_dist."""
    parts = module.split(".")
    if parts[0] in ("kernels", "launch"):  # the repository folders, as they are named when on sys.path
        return parts[0]
    if parts[0] != "shira_dist":
        return None
    if module in ENTRY_POINTS:
        return "entry"
    if len(parts) > 1 and parts[1] in ("training", "distributed", "kernels", "launch"):
        return parts[1]
    return "core"


def source_files(root: Path) -> Iterator[tuple[Path, str, bool]]:
    """(file, its module name, whether it is a package's __init__) for every source file under ``root``."""
    for directory, (prefix, _, recursive) in SOURCES.items():
        base = root / directory
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py") if recursive else base.glob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield path, ".".join([prefix, *parts]), is_package


def imported_modules(path: Path, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (functions included)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                yield node.lineno, f"{target}.{alias.name}" if alias.name != "*" else target
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield node.lineno, node.args[0].value


def _is_import_module(func: ast.expr) -> bool:
    return isinstance(func, ast.Attribute) and func.attr == "import_module" or \
        isinstance(func, ast.Name) and func.id == "import_module"


def layer_edges(root: Path) -> list[tuple[str, str, str]]:
    """(importing layer, imported layer, "file:line imports module") for every import across layers."""
    edges = []
    for path, module, is_package in source_files(root):
        source = layer_of(module)
        for line, target in imported_modules(path, module, is_package):
            imported = layer_of(target)
            if imported is not None and imported != source:
                edges.append((source, imported, f"{path.relative_to(root)}:{line} imports {target}"))
    return edges


def upward_imports(edges: list[tuple[str, str, str]]) -> list[str]:
    return [f"{where} ({source} -> {target})" for source, target, where in edges if RANK[target] <= RANK[source]]


def cycles(edges: list[tuple[str, str, str]]) -> list[list[str]]:
    """Cycles in the graph of layers (depth-first search; each cycle as the layers along it)."""
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, set()).add(target)
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


# ---- the repository ---------------------------------------------------------------------------------
def test_the_sources_are_found():
    modules = {module for _, module, _ in source_files(ROOT)}
    assert {"shira_dist.train", "shira_dist.model", "shira_dist.masks.calibration", "shira_dist.training.run",
            "shira_dist.distributed.consistency", "shira_dist.kernels.layout", "shira_dist.launch.cli"} <= modules
    layers = {layer for source, target, _ in layer_edges(ROOT) for layer in (source, target)}
    assert {"entry", "launch", "training", "distributed", "core", "kernels"} <= layers


def test_no_cycle_between_subpackages():
    assert cycles(layer_edges(ROOT)) == []


def test_dependencies_run_one_way():
    assert upward_imports(layer_edges(ROOT)) == []


def test_neither_distributed_nor_the_core_imports_training():
    wrong = [where for source, target, where in layer_edges(ROOT)
             if target == "training" and source in ("distributed", "core", "kernels")]
    assert wrong == []


def test_the_core_does_not_import_distributed():
    wrong = [where for source, target, where in layer_edges(ROOT)
             if target == "distributed" and source in ("core", "kernels")]
    assert wrong == []


# ---- the checker itself, on a made-up tree ----------------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    return _tree(tmp_path, {
        "shira_dist/__init__.py": "from .model import X\n",
        "shira_dist/model.py": "import torch\n\ndef later():\n    import shira_dist.distributed.zero\n",
        "shira_dist/distributed/__init__.py": "from .zero import Y\n",
        "shira_dist/distributed/zero.py": "def plugin():\n    from ..training import strategy  # lazy\n",
        "shira_dist/training/__init__.py": "",
        "shira_dist/training/strategy.py": "from .. import distributed\nfrom ..distributed import zero\n",
        "shira_dist/masks/__init__.py": "import importlib\n\nimportlib.import_module('shira_dist.training')\n",
        "launch/cli.py": "from .training import job\nfrom shira_dist.training import run\n",
        "launch/training.py": "",
    })


def test_the_checker_sees_imports_inside_functions_relative_and_by_name(bad_tree):
    edges = layer_edges(bad_tree)
    assert sorted(upward_imports(edges)) == [
        "shira_dist/distributed/zero.py:2 imports shira_dist.training.strategy (distributed -> training)",
        "shira_dist/masks/__init__.py:3 imports shira_dist.training (core -> training)",
        "shira_dist/model.py:4 imports shira_dist.distributed.zero (core -> distributed)",
    ]
    assert ("launch", "training", "launch/cli.py:2 imports shira_dist.training.run") in edges
    assert not any("launch/cli.py:1" in where for _, _, where in edges)  # launch's own training.py
    assert ["distributed", "training", "distributed"] in cycles(edges)
