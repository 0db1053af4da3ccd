"""Who may import whom (README, "How it works"): every import of the package, checked against the rules.

Each module belongs to one layer; a layer may import only the layers listed
for it. Imports inside functions count as much as those at the top. The
module-level imports must also form no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"autopart": ROOT / "autopart", "autopart.cost_models": ROOT / "cost_models",
           "autopart.passes": ROOT / "passes"}

VOCABULARY = ("autopart.errors", "autopart.plan", "autopart.schedules", "autopart.problems", "autopart.interfaces",
              "autopart.units", "autopart.batch", "autopart.tp_random", "autopart.recompute")
"""Plain dataclasses and pure functions every layer shares (tp_random: the random streams that
codegen gives a rank module and the runtime seeds; recompute: the region call that codegen
writes into a rank module and the runtimes run)."""
DRIVER = ("autopart", "autopart.__main__", "autopart.api", "autopart.mesh_search", "autopart.planner",
          "autopart.plan_choices", "autopart.step_costs", "autopart.recompute_choice", "autopart.plan_assembly",
          "autopart.plan_errors", "autopart.search", "autopart.search_bounds", "autopart.block_arrays",
          "autopart.analysis", "autopart.input_checks", "autopart.fit_advice",
          "autopart.compiled", "autopart.cli", "autopart.verify", "autopart.devices", "autopart.zoo",
          "autopart.calibrate")
"""The public API and the driver, module by module: they may import every layer."""

LAYERS: dict[str, tuple[str, ...]] = {
    "vocabulary": VOCABULARY,
    "cost_models": ("autopart.cost_models",),
    "tracing": ("autopart.tracing",),
    "passes": ("autopart.passes",),
    "solver": ("autopart.solver",),
    "runtime": ("autopart.runtime",),
    "report": ("autopart.report",),
    "driver": DRIVER,
}
MAY_IMPORT: dict[str, set[str]] = {
    "vocabulary": {"vocabulary"},
    "cost_models": {"cost_models"},  # nothing else of autopart
    "tracing": {"tracing", "vocabulary"},
    "passes": {"passes", "cost_models", "vocabulary"},  # never the solver: the driver solves what they build
    "solver": {"solver", "vocabulary"},  # plain arrays: no torch.fx, no passes
    "runtime": {"runtime", "vocabulary"},  # the Plan and what codegen hands them, never passes or the tracer
    "report": {"report", "vocabulary"},  # the Plan, never the runtimes
    "driver": set(LAYERS),
}
NO_TORCH = {"solver"}
"""Layers that must not import torch at all."""


def layer_of(module: str) -> str:
    """The layer a module of the package belongs to (the longest matching prefix)."""
    matches = [(len(prefix), layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
               if module == prefix or (layer != "driver" and module.startswith(prefix + "."))]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")
    return max(matches)[1]


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


def imports_of(source: str, known: set[str]) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) of every import in `source`; `known` resolves
    `from a import b` to module a.b when b is one."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else node.module, id(node) in top))
    return found


def violations(module: str, source: str, known: set[str]) -> list[str]:
    """Every import of `module` (whose text is `source`) that its layer may not make."""
    layer = layer_of(module)
    bad = []
    for line, target in sorted({(line, target) for line, target, _ in imports_of(source, known)}):
        if target.split(".")[0] == "torch" and layer in NO_TORCH:
            bad.append(f"{module}:{line} imports {target}: the {layer} layer works on plain arrays")
        if target != "autopart" and not target.startswith("autopart."):
            continue
        other = layer_of(target)
        if other not in MAY_IMPORT[layer]:
            bad.append(f"{module}:{line} imports {target} ({other}): the {layer} layer may import only "
                       f"{sorted(MAY_IMPORT[layer])}")
    return bad


def test_every_import_follows_the_layers() -> None:
    modules = package_modules()
    known = set(modules)
    bad = [v for name, path in modules.items() for v in violations(name, path.read_text(encoding="utf-8"), known)]
    assert not bad, "\n".join(bad)


def test_module_level_imports_form_no_circle() -> None:
    modules = package_modules()
    known = set(modules)
    edges = {name: {t for _, t, at_top in imports_of(path.read_text(encoding="utf-8"), known)
                    if at_top and t in known and t != name}
             for name, path in modules.items()}
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


@pytest.mark.parametrize("module,line", [
    ("autopart.runtime.local", "from autopart.passes.codegen import stage_interface"),
    ("autopart.runtime.distributed", "from autopart.tracing import flatten_inputs"),
    ("autopart.runtime.spmd", "from autopart.passes.tensor_parallel.collectives import TPCollective"),
    ("autopart.passes.tensor_parallel.problem", "from autopart.solver import solve_tp"),
    ("autopart.solver.strategy_ilp", "import torch.fx"),
    ("autopart.report.html", "from autopart.runtime.local import LocalPipeline"),
    ("autopart.cost_models.comm", "from autopart.plan import Plan"),
])
def test_a_forbidden_import_is_caught(module: str, line: str) -> None:
    """The imports this layering removed fail the check if they come back."""
    known = set(package_modules())
    assert violations(module, line + "\n", known)
