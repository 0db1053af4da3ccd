"""The pipeline cost model in float64: what every solve reports its answer with.

`pipeline_costs` turns a `PipelineProblem` into per-term coefficient arrays;
`evaluate_assignments` prices any number of stage assignments with them (the
ILP in `pipeline_ilp.py` reports its answer through it, recomputed exactly;
so do the dynamic program of `chain_split.py` and the references of
`brute_force.py`).

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

from dataclasses import dataclass

import numpy as np

from autopart.core.problems import PipelineProblem


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
    return PipelineCosts(
        compute=fwd + bwd,
        value_seconds=directions * np.asarray(problem.boundary_seconds, dtype=np.float64).reshape(
            len(problem.values), num_stages - 1
        ),
        block_memory=_block_memory(problem, in_flight),
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


def _block_memory(problem: PipelineProblem, in_flight: np.ndarray) -> np.ndarray:
    """[n, S] `problem.block_memory(s)` for every stage at once (the same sums, in the same order)."""
    k = in_flight[None, :]
    state = np.asarray(problem.state_bytes, dtype=np.float64)[:, None]
    act = np.asarray(problem.activation_bytes, dtype=np.float64)[:, None]
    grads = (np.zeros_like(state) if problem.gradient_bytes is None
             else np.asarray(problem.gradient_bytes, np.float64)[:, None])
    transient = (np.zeros_like(state) if problem.transient_bytes is None
                 else np.asarray(problem.transient_bytes, np.float64)[:, None])
    steady = (problem.num_microbatches > k).astype(np.float64)
    at_activation_peak = state + steady * grads + k * act + transient
    if problem.gradient_bytes is None:
        return at_activation_peak
    once_all_gradients = state + grads + np.maximum(k - 1, 0) * act
    return np.maximum(at_activation_peak, once_all_gradients)
