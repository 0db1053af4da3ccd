"""Choose one sharding strategy per op with an integer program (Alpa's intra-operator ILP).

Zheng et al., "Alpa" (OSDI'22) §4.2: one-hot strategy vectors per op, edge
resharding costs linearised, objective Σ compute + communication + resharding,
memory bounded. Here ops are *groups*: identical repeated layers share one
vector (meta-pytorch/autoparallel ties them too), so the model's size stays
flat in depth. Plain arrays in (`TPProblem`, autopart/problems.py), a `TPSolution`
out; no torch.fx. The model goes through backends.py, like the pipeline model.

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
    minimise Σ c[g,k] x[g,k] + Σ C_uv[a,b] e[u,v,a,b] + Σ c_s y_s, then Σ m[g,k] x[g,k]

All costs are ≥ 0, so at the optimum e and y equal the products and maxima
they bound. CP-SAT needs integers: seconds are scaled by 2^30 / U (U ≥ the
objective of any assignment) and rounded, so the optimum in seconds is exact
to about (number of terms)·2^-31 relative; bytes are integral.

The same integer objective is first minimised without row (6) by variable
elimination (strategy_elimination.py); where the graph is narrow (transformer
layers are) and that choice fits the budget, it is the optimum, proven, in a
fraction of a second, and CP-SAT is not run.
"""

from __future__ import annotations

import time

import numpy as np

from autopart.core.errors import InputError, PlanError
from autopart.core.problems import TPProblem, TPSolution
from autopart.solver.backends import _make_backend
from autopart.solver.strategy_elimination import INFINITE, solve_by_elimination

_UNITS = 2**30
"""Integer time units per upper bound of the objective."""


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


def solve_tp(problem: TPProblem, *, time_limit_s: float = 10.0, num_workers: int = 2,
             method: str = "auto") -> TPSolution:
    """Minimise the objective; PlanError if nothing fits the memory budget.

    `method`: "auto" solves by variable elimination where the graph is narrow and the answer fits the
    budget (strategy_elimination.py: exact, and far faster on transformer layers), else with CP-SAT;
    "cpsat" always uses CP-SAT."""
    if method not in ("auto", "cpsat"):
        raise InputError(f"solve_tp: unknown method {method!r}; use 'auto' or 'cpsat'")
    start = time.perf_counter()
    validate(problem)
    _check_memory(problem)
    scale = _UNITS / _upper_bound(problem)
    units = lambda s: int(round(s * scale))  # noqa: E731
    exact = choice_by_elimination(problem) if method == "auto" else None
    if exact is not None:
        seconds, memory = evaluate(problem, exact)
        return TPSolution(choice=exact, objective_seconds=seconds, param_bytes=memory, status="OPTIMAL",
                          solve_seconds=time.perf_counter() - start)
    # Two workers and CP-SAT's default LP relaxation: the strategy model's objective sums many
    # booleans, unlike the pipeline model's min-max (which runs best on one worker without it).
    solver = _make_backend("cpsat", num_workers=num_workers, linearization_level=1)
    x = [[solver.bool_var() for _ in range(c.size)] for c in problem.node_seconds]
    objective: dict = {}
    for g, costs in enumerate(problem.node_seconds):
        solver.exactly_one(x[g])                                                # (1)
        for k, c in enumerate(costs):
            if not np.isfinite(c):
                solver.add_le({x[g][k]: 1}, 0)                                  # (2)
            elif c > 0:
                objective[x[g][k]] = units(c)
    for (u, v), mat in zip(problem.edges, problem.edge_seconds):
        for a, b in zip(*np.nonzero(mat)):
            if not np.isfinite(mat[a, b]):
                solver.add_le({x[u][a]: 1, x[v][b]: 1}, 1)                      # (3)
            else:
                e = solver.bool_var()
                solver.add_le({x[u][a]: 1, x[v][b]: 1, e: -1}, 1)               # (4)
                objective[e] = units(mat[a, b])
    for term in problem.shared:
        y = solver.bool_var()
        for g, k in term.triggers:
            if term.source is None:
                solver.implies(x[g][k], y)                                      # (5)
            else:
                source = x[term.source[0]][term.source[1]]
                terms = {source: 1, y: -1}
                terms[x[g][k]] = terms.get(x[g][k], 0) + 1
                solver.add_le(terms, 1)
        objective[y] = units(term.seconds)
    if np.isfinite(problem.memory_budget_bytes):
        terms = {x[g][k]: int(m) for g, mem in enumerate(problem.param_bytes) for k, m in enumerate(mem) if m}
        if terms:
            solver.add_le(terms, int(problem.memory_budget_bytes))              # (6)
    solver.minimize_sum(_fewest_bytes_among_fastest(objective, x, problem))
    status, _ = solver.solve(time_limit_s, log=False)
    if status not in ("OPTIMAL", "FEASIBLE"):
        raise PlanError(
            f"no strategy assignment satisfies the constraints (CP-SAT: {status}); "
            f"the parameter budget is {problem.memory_budget_bytes / 2**20:.1f} MiB per device — "
            "raise it or use a larger tensor-parallel axis"
        )
    choice = tuple(next(k for k, var in enumerate(row) if solver.value(var) > 0.5) for row in x)
    seconds, memory = evaluate(problem, choice)
    return TPSolution(choice=choice, objective_seconds=seconds, param_bytes=memory, status=status,
                      solve_seconds=time.perf_counter() - start)


_MIB = 2**20


def _tie_break_weight(problem: TPProblem) -> int:
    """Integer time units are multiplied by this: more than all the groups' parameter MiB together."""
    return 1 + sum(int(np.ceil(float(np.max(m)) / _MIB)) for m in problem.param_bytes if m.size)


def _fewest_bytes_among_fastest(objective: dict, x: list[list], problem: TPProblem) -> dict:
    """The time objective, ties broken by parameter bytes per device (MiB, rounded up): time units
    weigh more than all the bytes together, so the optimum in time is unchanged, and among equal
    times the solver returns the one that holds least (an embedding sharded rather than replicated
    at the same speed), whichever of its workers finds it first."""
    weight = _tie_break_weight(problem)
    terms = {var: units * weight for var, units in objective.items()}
    for g, mem in enumerate(problem.param_bytes):
        for k, m in enumerate(mem):
            if m > 0 and np.isfinite(problem.node_seconds[g][k]):
                terms[x[g][k]] = terms.get(x[g][k], 0) + int(np.ceil(m / _MIB))
    return terms


def choice_by_elimination(problem: TPProblem) -> tuple[int, ...] | None:
    """The optimum of `solve_tp`'s CP-SAT model (the same integer objective, term by term) found by
    variable elimination (strategy_elimination.py), if the graph is narrow enough and the choice
    fits the memory budget (then the memory row cannot change it); None otherwise."""
    scale = _UNITS / _upper_bound(problem)
    units = lambda s: int(round(s * scale))  # noqa: E731
    weight = _tie_break_weight(problem)
    unary = []
    for costs, mem in zip(problem.node_seconds, problem.param_bytes):
        row = np.array([units(c) * weight if c > 0 else 0 for c in np.where(np.isfinite(costs), costs, 0)], np.int64)
        row += np.array([int(np.ceil(m / _MIB)) if m > 0 else 0 for m in mem], np.int64)
        unary.append(np.where(np.isfinite(costs), row, INFINITE))
    pairs = []
    for (u, v), mat in zip(problem.edges, problem.edge_seconds):
        finite = np.isfinite(mat)
        scaled = np.vectorize(lambda c: units(c) * weight, otypes=[np.int64])(np.where(finite, mat, 0))
        pairs.append((u, v, np.where(finite, scaled, INFINITE)))
    shared = [(units(term.seconds) * weight, term.source, term.triggers) for term in problem.shared]
    choice = solve_by_elimination(unary, pairs, shared)
    if choice is None or evaluate(problem, choice)[1] > problem.memory_budget_bytes:
        return None
    return choice
