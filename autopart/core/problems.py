"""The problems the solver solves, as plain arrays, and its answers.

What passes between the graph side and the integer programs, in both
directions, and nothing of torch.fx (DESIGN: "a Problem: plain arrays"):

- `PipelineProblem` / `PipelineSolution`: where to cut the blocks into pipeline
  stages. `autopart/planner.py` builds it from the blocks of passes/coarsen.py;
  `autopart.solver.solve_pipeline` answers it.
- `TPProblem` / `TPSolution`: which sharding strategy every op of a
  tensor-parallel group runs. passes/tensor_parallel/problem.py builds it from a
  costed graph; `autopart.solver.solve_tp` answers it.

Units: seconds, bytes, bytes per second.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from autopart.core.schedules import build_schedule, interleaved_in_flight, peak_in_flight, step_factor


@dataclass(frozen=True, kw_only=True)
class ValueFlow:
    """One tensor value that leaves the block that computes it."""

    producer: int
    """Index of the block that computes the value."""
    consumers: tuple[int, ...]
    """Indices of the blocks that read it (each > nothing: any block, DAG order)."""
    num_bytes: int
    """Size of the value for one microbatch."""


@dataclass(frozen=True, kw_only=True)
class PipelineProblem:
    """Assign `num_blocks` blocks of a DAG to `num_stages` pipeline stages.

    Stage s runs on device s of the arrays below (the planner orders devices).
    Blocks are numbered in a topological order of the DAG.
    """

    block_names: tuple[str, ...]
    """A readable name per block (for errors and reports)."""
    fwd_seconds: np.ndarray
    """[num_blocks, num_stages] forward time of one microbatch of block b on stage s's device."""
    bwd_seconds: np.ndarray
    """[num_blocks, num_stages] backward time of one microbatch (0 for inference)."""
    state_bytes: np.ndarray
    """[num_blocks] bytes held the whole step, once per stage: parameters, optimizer state, buffers
    (and gradients, unless `gradient_bytes` lists them apart)."""
    activation_bytes: np.ndarray
    """[num_blocks] bytes kept for backward per microbatch in flight."""
    edges: tuple[tuple[int, int], ...]
    """DAG edges (u, v): block v reads a value of block u; u < v."""
    values: tuple[ValueFlow, ...]
    """Values crossing blocks, for the boundary traffic between stages."""
    memory_capacity: np.ndarray
    """[num_stages] bytes usable on stage s's device."""
    boundary_seconds: np.ndarray
    """[num_values, num_stages - 1] seconds to send value v once over the link from stage s to
    stage s + 1 (the planner prices it with cost_models.comm.p2p_seconds: α + n/β)."""
    num_microbatches: int
    """m: microbatches per step."""
    schedule: str
    """One of `schedules.SCHEDULES`: fixes how many microbatches each stage keeps in flight."""
    virtual_stages: int = 1
    """v: stages per pipeline rank (interleaved schedules); stage s runs on rank s % (S / v). The
    arrays' stage columns then hold rank s % R's device, `memory_capacity` that device's bytes / v."""
    gradient_bytes: np.ndarray | None = None
    """[num_blocks] gradients, which the stage's first backward allocates and the step keeps; None:
    counted in `state_bytes`. At the peak of activations (k_s microbatches in flight) they are held
    only if an earlier backward ran (m > k_s); once they all exist, one microbatch has been freed."""
    transient_bytes: np.ndarray | None = None
    """[num_blocks] bytes held once, at the peak of activations (the loss's backward temporaries)."""
    reserved_bytes: float = 0.0
    """Bytes every stage holds once whichever blocks it gets (a recomputed block's rebuilt activations,
    ZeRO-3's gathered units), already taken off `memory_capacity`."""

    @property
    def held_bytes(self) -> np.ndarray:
        """[num_blocks] state and gradients: what a block holds once the step's backward is done."""
        state = np.asarray(self.state_bytes, dtype=np.float64)
        return state if self.gradient_bytes is None else state + np.asarray(self.gradient_bytes, np.float64)

    def stage_memory_terms(self, stage: int) -> tuple[np.ndarray, np.ndarray]:
        """Per block, the bytes it holds on `stage` at the activation peak and once all gradients
        exist: state + [m > k]·grads + k·act + transient, and state + grads + (k − 1)·act."""
        k = self.in_flight(stage)
        state = np.asarray(self.state_bytes, dtype=np.float64)
        act = np.asarray(self.activation_bytes, dtype=np.float64)
        grads = np.zeros_like(state) if self.gradient_bytes is None else np.asarray(self.gradient_bytes, np.float64)
        transient = (np.zeros_like(state) if self.transient_bytes is None
                     else np.asarray(self.transient_bytes, np.float64))
        steady = 1.0 if self.num_microbatches > k else 0.0
        at_activation_peak = state + steady * grads + k * act + transient
        once_all_gradients = state + grads + max(k - 1, 0) * act
        if self.gradient_bytes is None:  # everything in state: the classic sum
            once_all_gradients = at_activation_peak
        return at_activation_peak, once_all_gradients

    def block_memory(self, stage: int) -> np.ndarray:
        """[num_blocks] bytes each block charges to `stage` in the solver's linear memory row: the larger
        of its two terms (their sum over a stage bounds the stage's true peak from above)."""
        return np.maximum(*self.stage_memory_terms(stage))

    def stage_peak_bytes(self, stage: int, members: np.ndarray) -> float:
        """The stage's peak for the blocks in `members` (indices): the larger of the two sums."""
        first, second = self.stage_memory_terms(stage)
        return float(max(first[members].sum(), second[members].sum()))

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def num_stages(self) -> int:
        return int(self.memory_capacity.shape[0])

    @property
    def num_ranks(self) -> int:
        """R = S / v: pipeline ranks (devices of one pipeline)."""
        return self.num_stages // self.virtual_stages

    def in_flight(self, stage: int) -> int:
        """Microbatches whose activations stage `stage` holds at its peak, counted on the
        schedule's action lists: GPipe keeps all m, 1F1B at most S - s (REFERENCES.md,
        Narayanan et al. 2021); interleaved and zero-bubble schedules as they run."""
        return _in_flight(self.schedule, self.num_ranks, self.num_microbatches, self.virtual_stages,
                          bool(np.any(self.bwd_seconds)))[stage]

    def step_factor(self) -> float:
        """A step lasts this many slowest-stage slots: m + S - 1 for GPipe and 1F1B,
        m·v + R - 1 interleaved, less for zero bubble (`schedules.step_factor`)."""
        return step_factor(self.schedule, self.num_ranks, self.num_microbatches, self.virtual_stages,
                           bool(np.any(self.bwd_seconds)))


@dataclass(frozen=True, kw_only=True)
class PipelineSolution:
    """What the solver decided, and how sure it is."""

    stage_of_block: tuple[int, ...]
    """Stage index per block; non-decreasing along every edge; every stage used."""
    stage_seconds: tuple[float, ...]
    """Per stage: forward + backward + boundary communication per microbatch."""
    stage_memory_bytes: tuple[float, ...]
    """Per stage: peak bytes under the schedule's in-flight count."""
    step_seconds: float
    """Objective: (m + S - 1) * max stage_seconds."""
    bound_seconds: float
    """Best proven lower bound on the objective."""
    status: str
    """'OPTIMAL' or 'FEASIBLE'."""
    solve_seconds: float
    """Wall time spent in the solver."""
    backend: str
    """Which OR-Tools backend produced it."""


@lru_cache(maxsize=4096)
def _in_flight(schedule: str, num_ranks: int, m: int, virtual_stages: int, training: bool) -> dict[int, int]:
    """Peak in-flight microbatches per stage, from the schedule's action lists (cached: the
    planner asks for every stage of every candidate)."""
    if not training or (schedule in ("gpipe", "1f1b") and virtual_stages == 1):
        # forward only: activations are dropped; boundary buffers as 1F1B / GPipe would keep them.
        # Training: the same counts, in closed form (what peak_in_flight counts on their lists).
        stages = num_ranks * virtual_stages
        return {s: m if schedule == "gpipe" else min(m, stages - s) for s in range(stages)}
    if schedule == "interleaved_1f1b":
        return interleaved_in_flight(num_ranks, m, virtual_stages)
    return peak_in_flight(build_schedule(schedule, num_ranks, m, training, virtual_stages))


# ----------------------------------------------------------------------------- tensor-parallel strategies


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
    """Strategy choice per group as arrays (the model: autopart/solver/strategy_ilp.py)."""

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
