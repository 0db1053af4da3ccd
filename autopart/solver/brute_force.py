"""The pipeline cost model in float64, and exact searches that need no ILP.

`pipeline_costs` turns a `PipelineProblem` into per-term coefficient arrays;
`evaluate_assignments` prices any number of stage assignments with them (the
ILP in `pipeline_ilp.py` reports its answer through it, recomputed exactly).
`contiguous_split` is the exact dynamic program over splits that keep the
topological order contiguous (every split, when the DAG is a chain);
`brute_force_pipeline` enumerates every valid assignment of a tiny instance
and is the reference the ILP is tested against.

The cost of an assignment (see the model in `pipeline_ilp.py`): value v
crosses boundary s (between stages s and s+1) iff its producer sits on a stage
≤ s and some consumer on a stage > s;

    T_s = Σ_{b on s} (fwd[b,s] + bwd[b,s])
          + Σ_{v crossing s-1 or s} d·(α + bytes_v/β) of that boundary
    M_s = Σ_{b on s} (state_b + k_s·act_b) + k_s·Σ_{v crossing s-1 or s} bytes_v

with d = 2 in training (activation forward, gradient back), 1 in inference,
k_s = `problem.in_flight(s)`; step = `problem.step_factor()`·max_s T_s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from autopart.solver.problem import PipelineProblem, PipelineSolution


@dataclass(frozen=True, kw_only=True)
class PipelineCosts:
    """The coefficients of the stage-time and memory sums, per term."""

    compute: np.ndarray
    """[n, S] seconds of block b on stage s per microbatch (fwd + bwd)."""
    value_seconds: np.ndarray
    """[V, S-1] seconds each side of boundary s spends on value v: d·(α_s + bytes_v/β_s)."""
    block_memory: np.ndarray
    """[n, S] bytes block b holds on stage s: state_b + k_s·act_b, or with gradients and transients
    apart the larger of its two peaks (`PipelineProblem.block_memory`)."""
    value_memory: np.ndarray
    """[V, S] bytes stage s buffers per adjacent boundary value v crosses: k_s·bytes_v."""
    capacity: np.ndarray
    """[S] bytes usable per stage."""
    producer: np.ndarray
    """[V] block computing value v."""
    consumers: tuple[tuple[int, ...], ...]
    """Per value, the blocks reading it."""

    def scaled(self, seconds: float, byte_scale: np.ndarray, *, integral: bool) -> PipelineCosts:
        """Times multiplied by `seconds`, stage-s memory by `byte_scale[s]`.

        Integral: times rounded to nearest, bytes rounded up, capacities down
        (so a split feasible after scaling is feasible before it).
        """
        t = (lambda a: np.rint(a * seconds)) if integral else (lambda a: a * seconds)
        up = np.ceil if integral else (lambda a: a)
        down = np.floor if integral else (lambda a: a)
        return PipelineCosts(
            compute=t(self.compute),
            value_seconds=t(self.value_seconds),
            block_memory=up(self.block_memory * byte_scale[None, :]),
            value_memory=up(self.value_memory * byte_scale[None, :]),
            capacity=down(self.capacity * byte_scale),
            producer=self.producer,
            consumers=self.consumers,
        )


def pipeline_costs(problem: PipelineProblem) -> PipelineCosts:
    """The float64 coefficients of `problem`'s stage times and memory."""
    num_stages = problem.num_stages
    fwd = np.asarray(problem.fwd_seconds, dtype=np.float64)
    bwd = np.asarray(problem.bwd_seconds, dtype=np.float64)
    directions = 2.0 if np.any(bwd > 0) else 1.0
    in_flight = np.array([problem.in_flight(s) for s in range(num_stages)], dtype=np.float64)
    num_bytes = np.array([v.num_bytes for v in problem.values], dtype=np.float64)
    alpha = np.asarray(problem.link_latency, dtype=np.float64)
    beta = np.asarray(problem.link_bandwidth, dtype=np.float64)
    return PipelineCosts(
        compute=fwd + bwd,
        value_seconds=(directions * (alpha[None, :] + num_bytes[:, None] / beta[None, :])).reshape(
            len(problem.values), num_stages - 1
        ),
        block_memory=np.stack([problem.block_memory(s) for s in range(num_stages)], axis=1),
        value_memory=(num_bytes[:, None] * in_flight[None, :]).reshape(
            len(problem.values), num_stages
        ),
        capacity=np.asarray(problem.memory_capacity, dtype=np.float64),
        producer=np.array([v.producer for v in problem.values], dtype=np.int64),
        consumers=tuple(tuple(v.consumers) for v in problem.values),
    )


def crossings(costs: PipelineCosts, assignment: np.ndarray) -> np.ndarray:
    """[K, V, S-1] bool: value v crosses boundary s under assignment k ([K, n] stages)."""
    num_assign = assignment.shape[0]
    num_values = costs.producer.shape[0]
    num_boundaries = costs.value_seconds.shape[1]
    last = np.full((num_assign, num_values), -1, dtype=np.int64)
    for v, consumers in enumerate(costs.consumers):
        if consumers:
            last[:, v] = assignment[:, list(consumers)].max(axis=1)
    first = assignment[:, costs.producer]
    s = np.arange(num_boundaries)
    return (first[:, :, None] <= s) & (last[:, :, None] > s)


def evaluate_assignments(
    costs: PipelineCosts, assignment: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Stage seconds and bytes ([K, S] each) of K assignments ([K, n] stage per block)."""
    assignment = np.atleast_2d(np.asarray(assignment, dtype=np.int64))
    num_stages = costs.compute.shape[1]
    onehot = (assignment[:, :, None] == np.arange(num_stages)).astype(np.float64)
    seconds = np.einsum("kbs,bs->ks", onehot, costs.compute)
    memory = np.einsum("kbs,bs->ks", onehot, costs.block_memory)
    if num_stages > 1 and costs.producer.shape[0]:
        cross = crossings(costs, assignment).astype(np.float64)
        link_seconds = np.einsum("kvs,vs->ks", cross, costs.value_seconds)
        seconds[:, :-1] += link_seconds  # sender side of boundary s
        seconds[:, 1:] += link_seconds  # receiver side
        memory[:, :-1] += np.einsum("kvs,vs->ks", cross, costs.value_memory[:, :-1])
        memory[:, 1:] += np.einsum("kvs,vs->ks", cross, costs.value_memory[:, 1:])
    return seconds, memory


def contiguous_split(costs: PipelineCosts, *, objective: str = "time") -> np.ndarray | None:
    """Best split into S non-empty contiguous runs of blocks 0..n-1, or None.

    objective 'time': minimise max_s T_s subject to M_s ≤ capacity_s;
    'overflow': minimise max_s (M_s − capacity_s). Exact over contiguous splits
    (all splits of a chain) in O(S·n²). Returns the stage per block.
    """
    num_blocks, num_stages = costs.compute.shape
    # cut i: blocks < i left of the boundary; value v crosses it iff p_v < i ≤ last consumer.
    cuts = np.arange(num_blocks + 1)[:, None]
    last = np.array([max(c, default=-1) for c in costs.consumers], dtype=np.int64)
    cross = ((costs.producer[None, :] < cuts) & (cuts <= last[None, :])).astype(np.float64)
    cut_seconds = cross @ costs.value_seconds  # [n+1, S-1]
    cut_bytes = cross @ costs.value_memory  # [n+1, S]
    zeros = np.zeros((num_blocks + 1, 1))
    cut_seconds = np.hstack([zeros, cut_seconds, zeros])  # column s+1: boundary s
    prefix_t = np.vstack([np.zeros((1, num_stages)), np.cumsum(costs.compute, axis=0)])
    prefix_m = np.vstack([np.zeros((1, num_stages)), np.cumsum(costs.block_memory, axis=0)])
    invalid = np.tril(np.ones((num_blocks + 1, num_blocks + 1), dtype=bool))  # need i < j
    best = np.full(num_blocks + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((num_stages, num_blocks + 1), dtype=np.int64)
    for s in range(num_stages):
        left = cut_bytes[:, s] if s > 0 else np.zeros(num_blocks + 1)
        right = cut_bytes[:, s] if s < num_stages - 1 else np.zeros(num_blocks + 1)
        mem = prefix_m[None, :, s] - prefix_m[:, None, s] + left[:, None] + right[None, :]
        if objective == "time":
            cost = (
                prefix_t[None, :, s] - prefix_t[:, None, s] + cut_seconds[:, s][:, None]
                + cut_seconds[:, s + 1][None, :]
            )
            cost = np.where(mem <= costs.capacity[s], cost, np.inf)
        else:
            cost = mem - costs.capacity[s]
        cand = np.maximum(best[:, None], np.where(invalid, np.inf, cost))
        choice[s] = np.argmin(cand, axis=0)
        best = cand[choice[s], np.arange(num_blocks + 1)]
    if not np.isfinite(best[num_blocks]):
        return None
    stage_of_block = np.empty(num_blocks, dtype=np.int64)
    j = num_blocks
    for s in range(num_stages - 1, -1, -1):
        i = choice[s, j]
        stage_of_block[i:j] = s
        j = i
    return stage_of_block


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


__all__ = [
    "PipelineCosts",
    "brute_force_pipeline",
    "contiguous_split",
    "crossings",
    "evaluate_assignments",
    "pipeline_costs",
    "valid_assignments",
]
