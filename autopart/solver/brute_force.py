"""Exact answers by enumeration, for tiny instances: the references the ILPs are tested against.

`brute_force_pipeline` prices every valid stage assignment with the pipeline
cost model (pipeline_costs.py); `brute_force_tp` tries every strategy choice
with the strategy objective (strategy_ilp.py).
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from autopart.core.errors import InputError, PlanError
from autopart.core.problems import PipelineProblem, PipelineSolution, TPProblem, TPSolution
from autopart.solver.pipeline_costs import evaluate_assignments, pipeline_costs
from autopart.solver.strategy_ilp import evaluate, validate


def valid_assignments(problem: PipelineProblem) -> np.ndarray:
    """[K, n] every assignment with monotone edges (and value flows) and no empty stage."""
    num_blocks, num_stages = problem.num_blocks, problem.num_stages
    preds: list[list[int]] = [[] for _ in range(num_blocks)]
    for u, v in problem.edges:
        preds[v].append(u)
    for value in problem.values:
        for c in value.consumers:
            preds[c].append(value.producer)
    found: list[tuple[int, ...]] = []
    current = [0] * num_blocks

    def place(b: int) -> None:
        if b == num_blocks:
            if len(set(current)) == num_stages:
                found.append(tuple(current))
            return
        for s in range(max((current[u] for u in preds[b]), default=0), num_stages):
            current[b] = s
            place(b + 1)

    place(0)
    return np.array(found, dtype=np.int64).reshape(len(found), num_blocks)


def brute_force_pipeline(problem: PipelineProblem) -> PipelineSolution | None:
    """The optimum over every valid assignment (tiny instances), or None if none fits."""
    if problem.num_blocks > 8 or problem.num_stages > 4:
        raise ValueError(
            f"brute force is for tiny instances (≤ 8 blocks, ≤ 4 stages), got "
            f"{problem.num_blocks} blocks and {problem.num_stages} stages"
        )
    start = time.perf_counter()
    assignments = valid_assignments(problem)
    if assignments.shape[0] == 0:
        return None
    seconds, memory = evaluate_assignments(pipeline_costs(problem), assignments)
    fits = np.all(memory <= np.asarray(problem.memory_capacity, dtype=np.float64), axis=1)
    if not fits.any():
        return None
    worst = np.where(fits, seconds.max(axis=1), np.inf)
    k = int(np.argmin(worst))
    step = problem.step_factor() * float(worst[k])
    return PipelineSolution(
        stage_of_block=tuple(int(s) for s in assignments[k]),
        stage_seconds=tuple(float(t) for t in seconds[k]),
        stage_memory_bytes=tuple(float(m) for m in memory[k]),
        step_seconds=step,
        bound_seconds=step,
        status="OPTIMAL",
        solve_seconds=time.perf_counter() - start,
        backend="brute_force",
    )


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
