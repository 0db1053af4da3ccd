"""Choose one sharding strategy per op with an integer program (Alpa's intra-operator ILP).

Zheng et al., "Alpa" (OSDI'22) §4.2: one-hot strategy vectors per op, edge
resharding costs linearised, objective Σ compute + communication + resharding,
memory bounded. Here ops are *groups*: identical repeated layers share one
vector (meta-pytorch/autoparallel ties them too), so the model's size stays
flat in depth. Plain arrays in, a dataclass out; no torch.fx.

Notation: groups g with strategies k = 0..K_g−1; cost c[g,k] (seconds, already
summed over the group's members); edges (u, v) with matrix C[a,b] (seconds,
∞ = not allowed); shared costs s with cost c_s, an optional source (g_s, a_s)
and triggers T_s (pairs (g, k)): paid once when the source is chosen and any
trigger is — one collective per value and target placement however many ops
read it (a resharding of value u from strategy a_s to the placement the
triggers need; Megatron's f when there is no source); parameter bytes m[g,k]
per device; budget M.

    x[g,k] ∈ {0,1},  Σ_k x[g,k] = 1                                    (1)
    x[g,k] = 0                       where c[g,k] = ∞                  (2)
    x[u,a] + x[v,b] ≤ 1              where C_uv[a,b] = ∞               (3)
    e[u,v,a,b] ≥ x[u,a] + x[v,b] − 1, e ∈ {0,1}, where 0 < C_uv[a,b] < ∞ (4)
    y_s ≥ x[g_s,a_s] + x[g,k] − 1     for (g,k) ∈ T_s, y_s ∈ {0,1}      (5)
                                     (y_s ≥ x[g,k] when s has no source)
    Σ_{g,k} m[g,k] x[g,k] ≤ M                                          (6)
    minimise Σ c[g,k] x[g,k] + Σ C_uv[a,b] e[u,v,a,b] + Σ c_s y_s

All costs are ≥ 0, so at the optimum e and y equal the products and maxima
they bound. CP-SAT needs integers: seconds are scaled by 2^30 / U (U ≥ the
objective of any assignment) and rounded, so the optimum in seconds is exact
to about (number of terms)·2^-31 relative; bytes are integral.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from autopart.errors import InputError, PlanError

_UNITS = 2**30
"""Integer time units per upper bound of the objective."""


@dataclass(frozen=True, kw_only=True)
class SharedCost:
    """A cost paid once when `source` (if any) and at least one trigger are chosen."""

    seconds: float
    """Its cost (s)."""
    triggers: tuple[tuple[int, int], ...]
    """(group, strategy) pairs that need it."""
    source: tuple[int, int] | None = None
    """(group, strategy) that must also be chosen; None: the triggers alone decide."""

    def paid(self, choice) -> bool:
        if self.source is not None and choice[self.source[0]] != self.source[1]:
            return False
        return any(choice[g] == k for g, k in self.triggers)


@dataclass(frozen=True, kw_only=True)
class TPProblem:
    """Strategy choice per group as arrays (see the module docstring for the model)."""

    group_names: tuple[str, ...]
    """A readable name per group (its first node)."""
    node_seconds: tuple[np.ndarray, ...]
    """[K_g] compute + collectives inside the op, summed over the group's members (s); inf = not allowed."""
    param_bytes: tuple[np.ndarray, ...]
    """[K_g] parameter bytes each device holds for the group's members under strategy k."""
    edges: tuple[tuple[int, int], ...]
    """(u, v) group pairs, u ≠ v, with a resharding matrix each."""
    edge_seconds: tuple[np.ndarray, ...]
    """[K_u, K_v] resharding seconds summed over the node edges between the groups; inf = not allowed."""
    shared: tuple[SharedCost, ...] = ()
    """Collectives shared by several consumers (resharding of one value, Megatron's f)."""
    memory_budget_bytes: float = float("inf")
    """Parameter bytes allowed per device."""

    @property
    def num_groups(self) -> int:
        return len(self.group_names)


@dataclass(frozen=True, kw_only=True)
class TPSolution:
    """The chosen strategy per group and what it costs."""

    choice: tuple[int, ...]
    """Strategy index per group."""
    objective_seconds: float
    """Objective recomputed in float64 from the choice (s)."""
    param_bytes: float
    """Parameter bytes per device under the choice."""
    status: str
    """'OPTIMAL', 'FEASIBLE' (time limit hit) or 'BRUTE_FORCE'."""
    solve_seconds: float


def validate(problem: TPProblem) -> None:
    """Raise InputError naming the first malformed array."""
    n = problem.num_groups
    if len(problem.node_seconds) != n or len(problem.param_bytes) != n:
        raise InputError(f"TPProblem: {n} groups but {len(problem.node_seconds)} cost vectors and "
                         f"{len(problem.param_bytes)} memory vectors; give one of each per group")
    for g, (c, m) in enumerate(zip(problem.node_seconds, problem.param_bytes)):
        if c.ndim != 1 or c.shape != m.shape or c.size == 0:
            raise InputError(f"TPProblem group {problem.group_names[g]}: costs {c.shape} and memory {m.shape} "
                             "must be equal non-empty vectors")
        if np.any(c < 0) or np.any(m < 0):
            raise InputError(f"TPProblem group {problem.group_names[g]}: negative cost or bytes")
    if len(problem.edges) != len(problem.edge_seconds):
        raise InputError("TPProblem: one edge matrix per edge")
    for (u, v), mat in zip(problem.edges, problem.edge_seconds):
        if u == v or mat.shape != (problem.node_seconds[u].size, problem.node_seconds[v].size):
            raise InputError(f"TPProblem edge ({u}, {v}): matrix {mat.shape} does not match the strategy counts "
                             "(and u must differ from v: fold a self-edge's diagonal into the node cost)")
        if np.any(mat < 0):
            raise InputError(f"TPProblem edge ({u}, {v}): negative cost")


def evaluate(problem: TPProblem, choice: tuple[int, ...] | np.ndarray) -> tuple[float, float]:
    """(objective seconds, parameter bytes) of a choice; seconds are inf if it is not allowed."""
    total = sum(float(problem.node_seconds[g][k]) for g, k in enumerate(choice))
    total += sum(float(mat[choice[u], choice[v]]) for (u, v), mat in zip(problem.edges, problem.edge_seconds))
    total += sum(s.seconds for s in problem.shared if s.paid(choice))
    memory = sum(float(problem.param_bytes[g][k]) for g, k in enumerate(choice))
    return total, memory


def _upper_bound(problem: TPProblem) -> float:
    finite_max = lambda a: float(a[np.isfinite(a)].max()) if np.isfinite(a).any() else 0.0  # noqa: E731
    bound = sum(finite_max(c) for c in problem.node_seconds)
    bound += sum(finite_max(m) for m in problem.edge_seconds) + sum(s.seconds for s in problem.shared)
    return bound or 1.0


def _check_memory(problem: TPProblem) -> None:
    least = 0.0
    for c, m in zip(problem.node_seconds, problem.param_bytes):
        allowed = m[np.isfinite(c)]
        least += float(allowed.min()) if allowed.size else 0.0
    if least > problem.memory_budget_bytes:
        short = least - problem.memory_budget_bytes
        raise PlanError(
            f"parameters need at least {least / 2**20:.1f} MiB per device even with every shardable "
            f"parameter split, but the budget is {problem.memory_budget_bytes / 2**20:.1f} MiB "
            f"({short / 2**20:.1f} MiB short); use a larger tensor-parallel axis, add pipeline stages, "
            "or raise the budget"
        )


def solve_tp(problem: TPProblem, *, time_limit_s: float = 10.0, num_workers: int = 2) -> TPSolution:
    """Minimise the objective with CP-SAT; PlanError if nothing fits the memory budget."""
    start = time.perf_counter()
    validate(problem)
    _check_memory(problem)
    scale = _UNITS / _upper_bound(problem)
    units = lambda s: int(round(s * scale))  # noqa: E731
    model = cp_model.CpModel()
    x = [[model.NewBoolVar(f"x{g}_{k}") for k in range(c.size)] for g, c in enumerate(problem.node_seconds)]
    objective = []
    for g, costs in enumerate(problem.node_seconds):
        model.AddExactlyOne(x[g])                                               # (1)
        for k, c in enumerate(costs):
            if not np.isfinite(c):
                model.Add(x[g][k] == 0)                                         # (2)
            elif c > 0:
                objective.append(units(c) * x[g][k])
    for (u, v), mat in zip(problem.edges, problem.edge_seconds):
        for a, b in zip(*np.nonzero(mat)):
            if not np.isfinite(mat[a, b]):
                model.AddBoolOr([x[u][a].Not(), x[v][b].Not()])                # (3)
            else:
                e = model.NewBoolVar(f"e{u}_{v}_{a}_{b}")
                model.AddBoolOr([x[u][a].Not(), x[v][b].Not(), e])              # (4)
                objective.append(units(mat[a, b]) * e)
    for i, term in enumerate(problem.shared):
        y = model.NewBoolVar(f"y{i}")
        for g, k in term.triggers:
            if term.source is None:
                model.AddImplication(x[g][k], y)                                # (5)
            else:
                model.AddBoolOr([x[term.source[0]][term.source[1]].Not(), x[g][k].Not(), y])
        objective.append(units(term.seconds) * y)
    if np.isfinite(problem.memory_budget_bytes):
        terms = [(int(m), x[g][k]) for g, mem in enumerate(problem.param_bytes) for k, m in enumerate(mem) if m]
        if terms:
            model.Add(sum(c * v for c, v in terms) <= int(problem.memory_budget_bytes))  # (6)
    model.Minimize(sum(objective))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = num_workers
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise PlanError(
            f"no strategy assignment satisfies the constraints (CP-SAT: {solver.StatusName(status)}); "
            f"the parameter budget is {problem.memory_budget_bytes / 2**20:.1f} MiB per device — "
            "raise it or use a larger tensor-parallel axis"
        )
    choice = tuple(next(k for k, var in enumerate(row) if solver.Value(var)) for row in x)
    seconds, memory = evaluate(problem, choice)
    return TPSolution(choice=choice, objective_seconds=seconds, param_bytes=memory,
                      status="OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE",
                      solve_seconds=time.perf_counter() - start)


def brute_force_tp(problem: TPProblem, *, max_assignments: int = 200_000) -> TPSolution:
    """Try every choice (small problems only): the reference the ILP is tested against."""
    start = time.perf_counter()
    validate(problem)
    sizes = [c.size for c in problem.node_seconds]
    if np.prod(sizes, dtype=float) > max_assignments:
        raise InputError(f"brute_force_tp: {np.prod(sizes, dtype=float):.0f} assignments exceed {max_assignments}")
    best: tuple[float, tuple[int, ...], float] | None = None
    for choice in itertools.product(*(range(s) for s in sizes)):
        seconds, memory = evaluate(problem, choice)
        if memory <= problem.memory_budget_bytes and np.isfinite(seconds):
            if best is None or seconds < best[0]:
                best = (seconds, choice, memory)
    if best is None:
        raise PlanError("brute_force_tp: no assignment fits the memory budget")
    return TPSolution(choice=best[1], objective_seconds=best[0], param_bytes=best[2], status="BRUTE_FORCE",
                      solve_seconds=time.perf_counter() - start)
