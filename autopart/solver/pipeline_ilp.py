"""Cut a DAG of blocks into pipeline stages with an integer program.

Notation: blocks b = 0..n-1 (topological order), stages s = 0..S-1, values v
(producer p_v, consumers C_v, bytes_v), microbatches m, in-flight count k_s
(`PipelineProblem.in_flight`), d = 2 for training (activations go right,
gradients of the same size come back left) and d = 1 when every bwd is 0.

    x[b,s] ∈ {0,1}                     block b runs on stage s
    Σ_s x[b,s] = 1                                                       (1)
    P_b(s) = Σ_{t≤s} x[b,t]            1 iff block b sits on a stage ≤ s
    P_v(s) ≤ P_u(s)   ∀ edge (u,v), s  ⇔ z_u ≤ z_v, z_b = Σ_s s·x[b,s]   (2)
    Σ_b x[b,s] ≥ 1                     every stage non-empty              (3)
    w[v,s] ≥ P_p(s) − P_c(s) ∀ c ∈ C_v, w[v,s] ∈ [0,1]: v crosses s|s+1  (4)
    c[v,s] = d·(α_s + bytes_v/β_s)     one send and one receive per crossing value
    T_s = Σ_b x[b,s]·(fwd[b,s] + bwd[b,s])
          + Σ_v c[v,s-1]·w[v,s-1] + Σ_v c[v,s]·w[v,s]   (both sides pay)
    T_s ≤ T_max                                                          (5)
    M_s = Σ_b x[b,s]·(state_b + k_s·act_b)
          + k_s·Σ_v bytes_v·(w[v,s-1] + w[v,s]) ≤ capacity_s             (6)
    minimise T_max;   step = factor·T_max  (m + S − 1 for GPipe and 1F1B; problem.step_factor)

Choices.
- Latency α is paid per crossing value (each tensor is its own point-to-point
  send), which keeps (5) linear.
- Order encoding: the solver's booleans are y[b,s] = P_b(s) with
  P_b(s) ≤ P_b(s+1), and x[b,s] = P_b(s) − P_b(s−1); then x ∈ {0,1} and (1)
  hold by construction and (2) becomes two-literal implications. (2) is
  imposed per stage, not on the aggregated z: the integer solutions are the
  same but the LP relaxation is much tighter. (2) is only stated on a
  transitive reduction of edges ∪ value flows (implied on the rest).
- Block b can only sit on stages lo_b..hi_b: the stages after it hold
  non-ancestors and those before it non-descendants, so
  z_b ≥ S − n + |anc(b)| and z_b ≤ n − 1 − |desc(b)|; y outside is constant.
- (4) only for consumers that precede no other consumer of v. With one such
  consumer c, w[v,s] = P_p(s) − P_c(s) exactly and no w is created; otherwise
  w also gets w ≤ P_p(s) and w ≤ Σ_c (1 − P_c(s)), so it is exactly "crosses".
- A memory row that no split can violate is left out.
- No symmetry breaking: the DAG orders the stages, so permuting stages is no
  symmetry, and "identical" stages still differ in in-flight count (1f1b) and
  in how many boundaries they have; presolve closes these instances anyway.

`contiguous_split` (an exact O(S·n²) dynamic program over contiguous runs of
the topological order) gives the hint and the upper bound T_max ≤ its value;
for a chain it is the optimum, which backend='auto' returns without building
a model (and which CP-SAT proves during presolve). T_max also gets the lower
bound max(max_b min_s c_b,s, Σ_b min_s c_b,s / S).

Scaling. CP-SAT needs integers: seconds are multiplied by 2^30/UB (UB a
feasible T_max) and rounded to nearest, so each of a stage's ≤ n + 2·|values|
terms is off by at most half a unit: the scaled optimum is optimal in seconds
to about (n + 2·|values|)·2^-31 relative (1e-7 at 100 blocks). Bytes are
multiplied by a power of two (exact for integral counts) and rounded up,
capacities down, so a returned split never exceeds capacity. The MIP backend
gets the same model in floating point (times / UB, memory rows / capacity)
with a 1e-9 relative gap and primal tolerance. Reported stage times and
memory are recomputed in float64 from the assignment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from autopart.core.errors import InputError, PlanError
from autopart.solver.backends import _CpSat, _Mip, _make_backend
from autopart.core.problems import PipelineProblem, PipelineSolution
from autopart.core.modes import SCHEDULES, VIRTUAL_SCHEDULES
from autopart.solver.chain_split import contiguous_split
from autopart.solver.pipeline_costs import PipelineCosts, crossings, evaluate_assignments, pipeline_costs
from autopart.core.units import fmt_bytes

_TIME_UNITS = 2**30
"""CP-SAT integer time units per upper bound of T_max."""
_MAX_BYTES = 2**52
"""CP-SAT counts bytes in the power-of-two unit that brings the largest memory sum (or
capacity) to about this: fractions of a byte for today's models (so rounding fractional byte counts up
costs < 1/1000 byte a term), coarser units beyond 4 PiB."""
DEFAULT_BACKEND = "cpsat"
"""The ILP backend of backend='auto' (which answers chains with the exact DP first).
Measured with benchmarks/solver_backends.py (2 cores, best of 3, whole call), CP-SAT
against SCIP / HiGHS / CBC: 26-block chain on 8 stages 6.9 ms (21 / 15 / 9.6 ms);
100-block chain 40 ms (0.50 / 0.25 / 1.6 s); branching DAG of 60 blocks on 8 stages
0.53 s (11 / 2.1 / 15 s), of 100 blocks 1.2 s (13 / 5.7 / > 20 s); two towers of 12
blocks 19 ms (0.27 / 0.75 / 1.0 s). Median MIP time over the 13 instances: 3.9× / 3.8× /
1.7× CP-SAT's; only HiGHS on the 10-block instances was faster (0.8×, 0.3 ms less).
CP-SAT's presolve proves most chains optimal before any search; the MIPs must branch.
The DP answers the chains in 0.3–1.6 ms."""


def solve_pipeline(
    problem: PipelineProblem,
    *,
    backend: str = "auto",
    time_limit_s: float = 10.0,
    log_progress: bool = False,
    explain: bool = True,
) -> PipelineSolution:
    """Assign every block to a stage minimising the pipeline step time.

    backend: 'cpsat' (OR-Tools CP-SAT), 'mip' (pywraplp with SCIP, else HiGHS,
    else CBC; 'mip:HIGHS' names one) or 'auto': on a chain (every (b, b+1) an
    edge) the exact dynamic program `contiguous_split` ('dp', about 10× faster
    than building any model), else CP-SAT. Raises PlanError when no split fits
    in memory (naming the stage and its shortfall) or when there are more
    stages than blocks; InputError when the problem's arrays are malformed. With
    explain=False a split that cannot fit raises `MemoryInfeasible` (a PlanError) at once,
    without the second solve that finds the least-overflowing stage (a search that tries
    thousands of candidates explains only the closest one).
    """
    start = time.perf_counter()
    validate_problem(problem)
    chain = backend == "auto" and _is_chain(problem)
    structure = None if chain else _Structure.of(problem)
    costs = pipeline_costs(problem)
    hint = contiguous_split(costs)  # the best contiguous split: hint and upper bound
    if chain:  # every split of a chain is contiguous
        if hint is None:
            if not explain:
                raise MemoryInfeasible(f"no split of {problem.num_blocks} blocks into {problem.num_stages} "
                                       "stages fits in memory")
            _explain_memory(problem, structure, costs, None, time_limit_s, log_progress)
        return _solution(problem, costs, hint, "OPTIMAL", None, "dp", start)
    name = DEFAULT_BACKEND if backend == "auto" else backend
    solver = _make_backend(name)
    upper = float(evaluate_assignments(costs, hint)[0].max()) if hint is not None else 0.0
    time_scale = (_TIME_UNITS if solver.integral else 1.0) / (upper or _loose_time_bound(costs))
    scaled = _scale(costs, solver.integral, time_scale, per_stage_bytes=True)
    bounds = _time_bounds(scaled, hint, solver.integral)
    model = _build(solver, structure, scaled, objective="time", bounds=bounds, hint=hint)
    status, bound = solver.solve(time_limit_s, log_progress)
    if status == "INFEASIBLE":
        if not explain:
            raise MemoryInfeasible(f"no split of {problem.num_blocks} blocks into {problem.num_stages} "
                                   "stages fits in memory")
        _explain_memory(problem, structure, costs, name, time_limit_s, log_progress)
    if status in ("OPTIMAL", "FEASIBLE"):
        assignment = model.assignment(solver)
    elif hint is not None:  # time limit hit before the solver reported the hint back
        status, assignment, bound = "FEASIBLE", hint, bounds[0]
    else:
        raise PlanError(
            f"the {solver.name} solver found no split of {problem.num_blocks} blocks into "
            f"{problem.num_stages} stages within time_limit_s={time_limit_s}; raise the limit "
            f"or use fewer, coarser blocks"
        )
    _check_structure(problem, structure, assignment)
    return _solution(problem, costs, assignment, status, bound / time_scale, solver.name, start)


def price_assignment(problem: PipelineProblem, stage_of_block, *, status: str = "FEASIBLE",
                     backend: str = "given", solve_seconds: float = 0.0) -> PipelineSolution:
    """A given split (stage per block) priced exactly as a solve would report it; its bound is its own
    step (nothing is proven about other splits)."""
    start = time.perf_counter() - solve_seconds
    return _solution(problem, pipeline_costs(problem), np.asarray(stage_of_block, dtype=np.int64), status, None,
                     backend, start)


def _solution(
    problem: PipelineProblem,
    costs: PipelineCosts,
    assignment: np.ndarray,
    status: str,
    bound: float | None,
    backend: str,
    start: float,
) -> PipelineSolution:
    """The answer, priced exactly in float64; `bound` is a lower bound on T_max (seconds)."""
    seconds, memory = evaluate_assignments(costs, assignment)
    factor = problem.step_factor()
    step = factor * float(seconds[0].max())
    return PipelineSolution(
        stage_of_block=tuple(int(s) for s in assignment),
        stage_seconds=tuple(float(t) for t in seconds[0]),
        stage_memory_bytes=tuple(float(m) for m in memory[0]),
        step_seconds=step,
        bound_seconds=step if bound is None else min(step, factor * bound),
        status=status,
        solve_seconds=time.perf_counter() - start,
        backend=backend,
    )


def validate_problem(problem: PipelineProblem) -> None:
    """Raise InputError (malformed arrays) or PlanError (too many stages) with the fix."""
    if np.ndim(problem.memory_capacity) != 1 or np.size(problem.memory_capacity) < 1:
        raise InputError(
            f"memory_capacity must be a 1-D array with one entry per stage, got shape "
            f"{np.shape(problem.memory_capacity)}"
        )
    n, num_stages = problem.num_blocks, problem.num_stages
    if n < 1:
        raise InputError("the problem has no blocks: block_names is empty")
    shapes = {
        "fwd_seconds": (np.shape(problem.fwd_seconds), (n, num_stages)),
        "bwd_seconds": (np.shape(problem.bwd_seconds), (n, num_stages)),
        "state_bytes": (np.shape(problem.state_bytes), (n,)),
        "activation_bytes": (np.shape(problem.activation_bytes), (n,)),
        "boundary_seconds": (np.shape(problem.boundary_seconds), (len(problem.values), num_stages - 1)),
    }
    for field, (got, want) in shapes.items():
        if got != want:
            raise InputError(
                f"PipelineProblem.{field} has shape {got} but {n} blocks and {num_stages} "
                f"stages need {want} (rows: blocks or values, columns: stages, or links: stages - 1)"
            )
        values = np.asarray(getattr(problem, field), dtype=np.float64)
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise InputError(f"PipelineProblem.{field} must be finite and ≥ 0, got {values}")
    if not np.all(np.isfinite(problem.memory_capacity)):
        raise InputError(f"memory_capacity must be finite, got {problem.memory_capacity}")
    for u, v in problem.edges:
        if not 0 <= u < v < n:
            raise InputError(
                f"edge ({u}, {v}) must satisfy 0 ≤ u < v < num_blocks = {n}: blocks are "
                f"numbered in topological order"
            )
    for value in problem.values:
        bad = [c for c in value.consumers if not value.producer < c < n]
        if not 0 <= value.producer < n or bad or value.num_bytes < 0:
            raise InputError(
                f"value from block {value.producer} to {value.consumers} ({value.num_bytes} "
                f"bytes): consumers must come after the producer, below {n}, bytes ≥ 0"
            )
    if not isinstance(problem.num_microbatches, (int, np.integer)) or problem.num_microbatches < 1:
        raise InputError(
            f"num_microbatches must be an integer ≥ 1, got {problem.num_microbatches!r}"
        )
    if problem.schedule not in SCHEDULES:
        raise InputError(f"schedule {problem.schedule!r} is not one of {SCHEDULES}")
    v = problem.virtual_stages
    if v < 1 or num_stages % v or (v > 1 and problem.schedule not in VIRTUAL_SCHEDULES):
        raise InputError(
            f"virtual_stages={v} must be ≥ 1 and divide the {num_stages} stages, and above 1 needs an "
            f"interleaved schedule ({VIRTUAL_SCHEDULES}), not {problem.schedule!r}"
        )
    if num_stages > n:
        raise PlanError(
            f"cannot cut {n} blocks into {num_stages} pipeline stages: every stage needs at "
            f"least one block; use at most {n} stages, or coarsen the graph less so that "
            f"it has at least {num_stages} blocks"
        )


def _is_chain(problem: PipelineProblem) -> bool:
    """Every (b, b+1) is an edge or a value flow: the only valid splits are contiguous runs."""
    pairs = set(problem.edges)
    pairs.update((v.producer, c) for v in problem.values for c in v.consumers)
    return all((b, b + 1) in pairs for b in range(problem.num_blocks - 1))


class MemoryInfeasible(PlanError):
    """No split fits in memory (raised unexplained by `solve_pipeline(explain=False)`)."""


@dataclass(frozen=True)
class _Structure:
    """The DAG as the model needs it: edges (with value flows) and each block's stage range."""

    edges: tuple[tuple[int, int], ...]
    """A transitive reduction of edges ∪ value flows: (2) on it implies (2) on all."""
    consumers: tuple[tuple[int, ...], ...]
    """Per value, the consumers that precede no other consumer: (4) for them implies the rest."""
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    is_chain: bool
    """Every (b, b+1) is an edge: the only valid splits are contiguous runs."""

    @staticmethod
    def of(problem: PipelineProblem) -> _Structure:
        n, num_stages = problem.num_blocks, problem.num_stages
        edges = set(problem.edges)
        edges.update((v.producer, c) for v in problem.values for c in v.consumers)
        succ: list[list[int]] = [[] for _ in range(n)]
        anc, desc = [0] * n, [0] * n  # bitsets of ancestors / descendants
        for u, v in sorted(edges, key=lambda e: e[1]):
            anc[v] |= anc[u] | (1 << u)
        for u, v in sorted(edges, key=lambda e: -e[0]):
            desc[u] |= desc[v] | (1 << v)
            succ[u].append(v)
        reduced = [(u, v) for u, v in sorted(edges)
                   if not any(desc[w] >> v & 1 for w in succ[u] if w != v)]
        last = tuple(
            tuple(c for c in v.consumers if not any(desc[c] >> d & 1 for d in v.consumers))
            for v in problem.values
        )
        lo = tuple(max(0, num_stages - n + anc[b].bit_count()) for b in range(n))
        hi = tuple(min(num_stages - 1, n - 1 - desc[b].bit_count()) for b in range(n))
        chain = all((b, b + 1) in edges for b in range(n - 1))
        return _Structure(tuple(reduced), last, lo, hi, chain)


def _loose_time_bound(costs: PipelineCosts) -> float:
    """A T_max no split exceeds: every block and every crossing on one stage."""
    total = costs.compute.max(axis=1).sum() + 2 * costs.value_seconds.max(axis=1, initial=0).sum()
    return float(total) if total > 0 else 1.0


def _scale(
    costs: PipelineCosts, integral: bool, time_scale: float, *, per_stage_bytes: bool
) -> PipelineCosts:
    """The backend's units: CP-SAT integers (exact bytes), MIP floats of order 1.

    MIP memory rows are divided by their capacity (per_stage_bytes) or all by
    the largest one (the overflow model compares stages).
    """
    num_stages = costs.capacity.shape[0]
    if not integral:
        cap = np.maximum(costs.capacity, 1.0)
        per_byte = 1.0 / (cap if per_stage_bytes else np.full(num_stages, cap.max()))
        return costs.scaled(time_scale, per_byte, integral=False)
    total = max(costs.block_memory.max(axis=1).sum()
                + 2 * costs.value_memory.max(axis=1, initial=0).sum(),
                float(np.abs(costs.capacity).max()), 1.0)
    byte_unit = 2.0 ** np.floor(np.log2(_MAX_BYTES / total))  # exact on integers
    return costs.scaled(time_scale, np.full(num_stages, byte_unit), integral=True)


def _time_bounds(
    scaled: PipelineCosts, hint: np.ndarray | None, integral: bool
) -> tuple[float, float]:
    """Bounds on T_max in the scaled units: the hint's value above; below, the
    largest block and the average load (Σ_s T_s ≥ Σ_b min_s compute[b,s])."""
    cheapest = scaled.compute.min(axis=1)
    lower = max(float(cheapest.max()), float(cheapest.sum()) / scaled.capacity.shape[0])
    upper = _loose_time_bound(scaled)
    if hint is not None:
        seconds, memory = evaluate_assignments(scaled, hint)
        if np.all(memory[0] <= scaled.capacity):  # rounding may make the hint infeasible
            upper = float(seconds[0].max())
    if integral:
        lower = float(np.ceil(lower - 1e-9))
    return min(lower, upper), upper


def _check_structure(problem: PipelineProblem, st: _Structure, stage: np.ndarray) -> None:
    """The solver's answer must be a valid split; anything else is a bug here."""
    bad = [(u, v) for u, v in st.edges if stage[u] > stage[v]]
    empty = sorted(set(range(problem.num_stages)) - set(stage.tolist()))
    if bad or empty:
        raise RuntimeError(f"solver returned an invalid split {stage}: edges {bad}, empty {empty}")


@dataclass(frozen=True)
class _Model:
    """The order-encoding variables y[b,s] = P_b(s) of a built model."""

    y: dict[tuple[int, int], Any]
    st: _Structure

    def assignment(self, solver: _CpSat | _Mip) -> np.ndarray:
        """z_b = lo_b + #{s ∈ [lo_b, hi_b): P_b(s) = 0}."""
        stage = np.array(self.st.lo, dtype=np.int64)
        for (b, _), var in self.y.items():
            stage[b] += solver.value(var) < 0.5
        return stage


def _build(
    solver: _CpSat | _Mip,
    st: _Structure,
    costs: PipelineCosts,
    *,
    objective: str,
    bounds: tuple[float, float],
    hint: np.ndarray | None,
) -> _Model:
    """Model (1)-(6) in `solver`, minimising T_max ('time') or max_s M_s − cap_s ('overflow').

    Decision variables are y[b,s] = P_b(s) for lo_b ≤ s < hi_b (P_b is 0 below,
    1 from hi_b on) and x[b,s] = P_b(s) − P_b(s−1): the order encoding of x,
    whose constraints are mostly two-literal implications.
    """
    n, num_stages = costs.compute.shape
    num = int if solver.integral else float  # plain Python numbers build faster than numpy's
    compute, block_memory, value_seconds, value_memory, capacity = (
        np.asarray(a).astype(num).tolist() for a in (
            costs.compute, costs.block_memory, costs.value_seconds, costs.value_memory,
            costs.capacity))
    y = {(b, s): solver.bool_var() for b in range(n) for s in range(st.lo[b], st.hi[b])}

    def add(expr: dict, const: list, b: int, s: int, coef: float) -> None:
        """expr += coef·P_b(s) (the constant part goes to const[0])."""
        if s >= st.hi[b]:
            const[0] += coef
        elif s >= st.lo[b] and coef:
            expr[y[b, s]] = expr.get(y[b, s], 0) + coef

    for (b, s), var in y.items():  # (1): P_b(s) ≤ P_b(s+1), so x ∈ {0,1} and Σ_s x[b,s] = 1
        if s + 1 < st.hi[b]:
            solver.implies(var, y[b, s + 1])
    for u, v in st.edges:  # (2) P_v(s) ≤ P_u(s); where either is constant it holds already
        for s in range(max(st.lo[v], st.lo[u]), min(st.hi[v], st.hi[u])):
            solver.implies(y[v, s], y[u, s])
    on_stage = [[b for b in range(n) if st.lo[b] <= s <= st.hi[b]] for s in range(num_stages)]
    for s in range(num_stages):  # (3) −Σ_b (P_b(s) − P_b(s−1)) ≤ −1
        expr, const = {}, [0]
        for b in on_stage[s]:
            add(expr, const, b, s, -1)
            add(expr, const, b, s - 1, 1)
        solver.add_le(expr, -1 - const[0])
    cross: list[list] = [[] for _ in range(num_stages)]  # per boundary s|s+1: (v, expr, const)
    w: dict[tuple[int, int], Any] = {}
    for v, (p, consumers) in enumerate(zip(costs.producer, st.consumers)):
        for s in range(st.lo[p], num_stages - 1):
            if all(s >= st.hi[c] for c in consumers):
                continue  # every consumer is surely on a stage ≤ s
            if len(consumers) == 1:  # (4) with one consumer w = P_p(s) − P_c(s) exactly
                expr, const = {}, [0]
                add(expr, const, p, s, 1)
                add(expr, const, consumers[0], s, -1)
                cross[s].append((v, expr, const[0]))
                continue
            w[v, s] = var = solver.unit_var()
            cross[s].append((v, {var: 1}, 0))
            for c in consumers:  # (4) P_p(s) − P_c(s) − w ≤ 0
                expr, const = {var: -1}, [0]
                add(expr, const, p, s, 1)
                add(expr, const, c, s, -1)
                solver.add_le(expr, -const[0])
            # w ≤ P_p(s) and w ≤ Σ_c (1 − P_c(s)): w is exactly "v crosses s|s+1"
            expr, const = {var: 1}, [0]
            add(expr, const, p, s, -1)
            solver.add_le(expr, -const[0])
            expr, const = {var: 1}, [0]
            for c in consumers:
                add(expr, const, c, s, 1)
            solver.add_le(expr, len(consumers) - const[0])
    top = solver.num_var(*bounds)
    for s in range(num_stages):
        expr_t, const_t, expr_m, const_m = {top: -1}, [0], {top: -1}, [0]
        for b in on_stage[s]:  # x[b,s]·(fwd + bwd) and x[b,s]·(state + k_s·act)
            for t, sign in ((s, 1), (s - 1, -1)):
                add(expr_t, const_t, b, t, sign * compute[b][s])
                add(expr_m, const_m, b, t, sign * block_memory[b][s])
        for t in (s - 1, s):  # values crossing s−1|s and s|s+1
            for v, expr, const in cross[t] if t >= 0 else ():
                for var, coef in expr.items():
                    expr_t[var] = expr_t.get(var, 0) + coef * value_seconds[v][t]
                    expr_m[var] = expr_m.get(var, 0) + coef * value_memory[v][s]
                const_t[0] += const * value_seconds[v][t]
                const_m[0] += const * value_memory[v][s]
        if objective == "time":
            solver.add_le(expr_t, -const_t[0])  # (5) T_s − T_max ≤ 0
            del expr_m[top]
            most = sum(c for c in expr_m.values() if c > 0) + const_m[0]
            if most > capacity[s]:  # (6) M_s ≤ capacity_s, unless no split can break it
                solver.add_le(expr_m, capacity[s] - const_m[0])
        else:  # (6') M_s − O ≤ capacity_s, minimise O = the largest overflow
            solver.add_le(expr_m, capacity[s] - const_m[0])
    solver.minimize(top)
    if hint is not None:
        crossed = crossings(costs, hint[None])[0]
        seconds, memory = evaluate_assignments(costs, hint)
        worst = seconds[0].max() if objective == "time" else (memory[0] - costs.capacity).max()
        solver.hints([*y.values(), *w.values(), top],
                     [int(hint[b] <= s) for b, s in y] + [int(crossed[v, s]) for v, s in w]
                     + [min(max(num(worst), bounds[0]), bounds[1])])
    return _Model(y, st)


def _explain_memory(
    problem: PipelineProblem,
    st: _Structure,
    costs: PipelineCosts,
    backend: str | None,
    time_limit_s: float,
    log_progress: bool,
) -> None:
    """Raise PlanError naming the stage that overflows least badly, and how to fix it.

    Solves the same structure minimising O ≥ M_s − capacity_s for all s
    (backend None: the contiguous dynamic program, exact on a chain).
    """
    hint = contiguous_split(costs, objective="overflow")
    stage, status = hint, "OPTIMAL"  # with backend None (a chain) the DP is exact
    if backend is not None:
        solver = _make_backend(backend)
        scaled = _scale(costs, solver.integral, 1.0, per_stage_bytes=False)
        top = float(scaled.block_memory.max(axis=1).sum() + 2 * scaled.value_memory.sum())
        model = _build(solver, st, scaled, objective="overflow",
                       bounds=(-float(scaled.capacity.max()), top), hint=hint)
        status, _ = solver.solve(time_limit_s, log_progress)
        if status in ("OPTIMAL", "FEASIBLE"):
            stage = model.assignment(solver)
    memory = evaluate_assignments(costs, stage)[1][0]
    s = int(np.argmax(memory - costs.capacity))
    on_s = [b for b in range(problem.num_blocks) if stage[b] == s]
    m, num_stages, k = problem.num_microbatches, problem.num_stages, problem.in_flight(s)
    per_microbatch = (memory[s] - float(np.sum(problem.held_bytes[on_s]))) / k  # activations
    need = int(np.ceil((np.sum(problem.held_bytes) + np.sum(problem.activation_bytes))
                       / max(float(costs.capacity.max()), 1.0)))
    fixes = ["more pipeline stages/devices" + (
        f" (the blocks' state plus one microbatch of activations alone need at least {need} "
        f"devices of {fmt_bytes(costs.capacity.max(), exact=True)})" if need > num_stages else "")]
    if per_microbatch > 0 and k > 1:
        fixes.append(f"fewer microbatches (stage {s} keeps {k} in flight, "
                     f"{fmt_bytes(per_microbatch, exact=True)} each)")
    if per_microbatch > 0 and problem.schedule == "gpipe" and num_stages - s < k:
        fixes.append(f"the '1f1b' schedule (stage {s} would keep {num_stages - s} "
                     f"microbatch(es) in flight instead of {k})")
    fixes.append("devices with more memory")
    scope = "every split" if status == "OPTIMAL" else "the best split found"
    error = PlanError(
        f"no split of {problem.num_blocks} blocks into {num_stages} pipeline stages fits in "
        f"memory ({problem.schedule}, {m} microbatches): {scope} leaves a stage over capacity, "
        f"at best stage {s} ({len(on_s)} block{'s' * (len(on_s) != 1)}: "
        f"{problem.block_names[on_s[0]]} .. "
        f"{problem.block_names[on_s[-1]]}) needs "
        f"{fmt_bytes(memory[s], exact=True)} but has {fmt_bytes(costs.capacity[s], exact=True)}, "
        f"{fmt_bytes(memory[s] - costs.capacity[s], exact=True)} short. Try " + ", or ".join(fixes) + "."
    )
    error.shortfall_bytes = float(memory[s] - costs.capacity[s])  # for the planner: the closest attempt
    raise error

