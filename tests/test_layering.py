"""The layers are folders (README, "How it works"): every import of the package, checked against them.

A module's layer is its folder: `autopart/core/` is the vocabulary every layer
shares, `cost_models/` and `passes/` sit at the repository's top level, and so on
up to the command line and the public API at `autopart/`'s top. A layer imports
only the layers beneath it. Imports inside functions count as much as those at
the top, and no two files import each other, directly or around a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"autopart": ROOT / "autopart", "autopart.cost_models": ROOT / "cost_models",
           "autopart.passes": ROOT / "passes"}

LAYERS: dict[str, str] = {
    "autopart.core": "core",
    "autopart.cost_models": "cost_models",
    "autopart.solver": "solver",
    "autopart.passes": "passes",
    "autopart.axes": "axes",
    "autopart.frontend": "frontend",
    "autopart.planner": "planner",
    "autopart.runtime": "runtime",
    "autopart.report": "report",
    "autopart.cli": "cli",
    "autopart.__main__": "cli",
}
"""Folder (package prefix) -> layer (`python -m autopart` is the command line too). The other modules
at autopart/'s top (the public API: compile, CompiledModel, verify, calibrate, zoo) are the layer 'api'."""

MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),                 # plain dataclasses and pure functions every layer shares
    "cost_models": set(),          # devices, links, formulas: nothing else of autopart
    "solver": {"core"},            # plain arrays: no torch.fx, no passes, not even torch
    "passes": {"core", "cost_models"},  # never the solver: the planner solves what they build
    "axes": {"core", "cost_models"},    # what each parallel axis declares for the layers above
    "frontend": {"core", "cost_models", "passes"},
    "planner": {"core", "cost_models", "solver", "passes", "axes", "frontend"},
    "runtime": {"core", "axes"},   # the Plan and what codegen hands them, never passes or the tracer
    "report": {"core", "axes"},    # the Plan, never the runtimes
    "cli": {"core", "cost_models", "solver", "passes", "axes", "frontend", "planner", "runtime", "report", "api"},
    "api": {"core", "cost_models", "solver", "passes", "axes", "frontend", "planner", "runtime", "report"},
}
NO_TORCH = {"solver"}
"""Layers that must not import torch at all."""

MAX_TOP_FILES = 10
"""Python files at autopart/'s top: the public API only."""


def layer_of(module: str) -> str:
    """The layer of a module of the package: its folder, or 'api' at autopart/'s top."""
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    if module == "autopart" or module.count(".") == 1:
        return "api"
    raise AssertionError(f"{module} is in no layer: put it in a folder of LAYERS in tests/test_layering.py")


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the installed package's sources."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `source`, those inside functions too; `known`
    resolves `from a import b` to module a.b when b is one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else node.module))
    return found


def violations(module: str, source: str, known: set[str]) -> list[str]:
    """Every import of `module` (whose text is `source`) that its layer may not make."""
    layer = layer_of(module)
    bad = []
    for line, target in sorted(set(imports_of(source, known))):
        if target.split(".")[0] == "torch" and layer in NO_TORCH:
            bad.append(f"{module}:{line} imports {target}: the {layer} layer works on plain arrays")
        if target != "autopart" and not target.startswith("autopart."):
            continue
        other = layer_of(target)
        if other != layer and other not in MAY_IMPORT[layer]:
            bad.append(f"{module}:{line} imports {target} ({other}): the {layer} layer may import only "
                       f"{sorted(MAY_IMPORT[layer])}")
    return bad


def test_layers_only_import_downward() -> None:
    """MAY_IMPORT is itself a ladder: no two layers may import each other, around any circle."""
    state: dict[str, int] = {}

    def visit(layer: str, path: list[str]) -> None:
        state[layer] = 1
        for below in sorted(MAY_IMPORT[layer]):
            assert state.get(below) != 1, "layers import each other: " + " -> ".join(path + [below])
            if below not in state:
                visit(below, path + [below])
        state[layer] = 2

    for layer in MAY_IMPORT:
        if layer not in state:
            visit(layer, [layer])


def test_every_import_follows_the_layers() -> None:
    modules = package_modules()
    known = set(modules)
    bad = [v for name, path in modules.items() for v in violations(name, path.read_text(encoding="utf-8"), known)]
    assert not bad, "\n".join(bad)


def test_files_import_no_circle() -> None:
    """No file reaches itself through imports, those inside functions included (a package's
    `__init__` counts as the files it imports)."""
    modules = package_modules()
    known = set(modules)
    edges = {name: {t for _, t in imports_of(path.read_text(encoding="utf-8"), known) if t in known and t != name}
             for name, path in modules.items()}
    # importing a submodule runs its packages' __init__ first; a package's own __init__ importing
    # its submodules is how it exports them, not a circle
    for name in modules:
        edges[name] -= {p for p in modules if name.startswith(p + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])


def test_the_top_of_autopart_holds_the_public_api_only() -> None:
    top = sorted(p.name for p in (ROOT / "autopart").glob("*.py"))
    assert len(top) <= MAX_TOP_FILES, f"{len(top)} files at autopart/'s top: {top}; move them into a layer's folder"


@pytest.mark.parametrize("module,line", [
    ("autopart.runtime.local", "from autopart.passes.codegen import stage_interface"),
    ("autopart.runtime.distributed", "from autopart.frontend.tracing import flatten_inputs"),
    ("autopart.runtime.spmd", "from autopart.passes.tensor_parallel.collectives import TPCollective"),
    ("autopart.passes.tensor_parallel.problem", "from autopart.solver import solve_tp"),
    ("autopart.solver.strategy_ilp", "import torch.fx"),
    ("autopart.report.html", "from autopart.runtime.local import LocalPipeline"),
    ("autopart.cost_models.comm", "from autopart.core.plan import Plan"),
    ("autopart.core.plan", "from autopart.planner.search import search"),
    ("autopart.axes.data", "from autopart.planner.step_costs import block_state_bytes"),
    ("autopart.planner.pricing", "from autopart.api import compile"),
])
def test_a_forbidden_import_is_caught(module: str, line: str) -> None:
    """Imports the layering forbids fail the check if they come back."""
    known = set(package_modules())
    assert violations(module, line + "\n", known)


def test_a_file_level_circle_is_caught(tmp_path: Path) -> None:
    """The planner <-> search circle (a function-level import back) would be found."""
    known = {"autopart.planner.pricing", "autopart.planner.search"}
    pricing = imports_of("def f():\n    from autopart.planner.search import search\n", known)
    search = imports_of("from autopart.planner.pricing import price_candidate\n", known)
    assert ("autopart.planner.search" in {t for _, t in pricing}
            and "autopart.planner.pricing" in {t for _, t in search})
