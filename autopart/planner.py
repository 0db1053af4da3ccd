"""Search over pipeline configurations: replicas, pipeline ranks, virtual stages,
microbatch counts, schedules, how the replicas hold the state (DDP, ZeRO-2,
ZeRO-3, HSDP) and how blocks keep their activations (recomputation).

For each candidate (dp replicas and their mode, R ranks × v stages each, m
microbatches, schedule) the block graph becomes a `PipelineProblem` (costs
scaled to one microbatch, priced by autopart/step_costs.py) and the ILP places
the blocks. A candidate that does not fit without recomputation is solved
again with every block recomputed, and then each stage keeps as much as its
memory allows, block by block (autopart/recompute_choice.py). Candidates whose
lower bound cannot beat the best found are pruned without a solve. The best
candidate becomes the `Plan` (autopart/plan_assembly.py).

Scaling to a microbatch: the graph is traced at one microbatch size
(`PlanRequest.traced_batch_size`); FLOPs, roofline time, saved activations and
boundary bytes are linear in the batch, so a candidate with microbatches of b
samples scales them by b / traced size; per-op launch floors do not scale
(`BlockTimes`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from autopart.cost_models import Cluster
from autopart.errors import InputError, PlanError
from autopart.passes.blocks import BlockGraph
from autopart.plan import DATA_PARALLEL_MODES, Candidate, Plan, data_parallel_mode_name
from autopart.plan_assembly import assemble_plan, scale_of
from autopart.plan_errors import Failure, failure_of_error, infeasible_error, shortfall
from autopart.problems import PipelineProblem, PipelineSolution, ValueFlow
from autopart.recompute_choice import choose_recompute_per_block, recompute_choices, uniform_recompute
from autopart.schedules import SCHEDULES, VIRTUAL_SCHEDULES, microbatches_per_round
from autopart.solver import solve_pipeline
from autopart.step_costs import (
    Setting,
    activation_bytes,
    block_gradient_bytes,
    block_state_bytes,
    data_parallel_sync_seconds,
    fsdp_unit_transient_bytes,
    hsdp_shard_size,
    loss_backward_bytes,
    optimizer_seconds,
    recompute_seconds,
    recompute_transient_bytes,
    returned_output_bytes,
    sync_lower_bound,
)


# The integer program, always: on chains of blocks the solver's exact dynamic
# program ("auto") is ~10x faster, but the ILP also takes DAGs and is what the
# joint tensor-parallel model builds on; 24 solves of a 26-block chain take
# about 0.16 s (benchmarks/solver_backends.py).
SOLVER_BACKEND = "cpsat"

MAX_VIRTUAL_STAGES = 4
"""Most stages per rank the search tries: each one more adds a boundary per microbatch."""

DEFAULT_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
"""What the planner searches when the user names no schedule; 1F1B first, as on a tie (one
stage) it keeps fewer microbatches in flight than GPipe. Zero bubble only when asked for:
PyTorch's split weight pass (stage_backward_weight) fails on some graphs, e.g. T5's
("Trying to backward through the graph a second time"), which no plan-time check catches."""


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What the user fixed (None: the planner chooses)."""

    batch_size: int
    """Samples in the example batch: one step."""
    traced_batch_size: int
    """Samples in the batch the costed graph was traced with (one microbatch)."""
    num_stages: int | None = None
    num_microbatches: int | None = None
    """Microbatches per pipeline (per data-parallel replica)."""
    data_parallel: int | None = None
    """Replicas of the pipeline; None lets the planner choose."""
    schedule: str | None = None
    virtual_stages: int | None = None
    """Stages per pipeline rank (interleaved schedules); None lets the planner choose."""
    data_parallel_mode: str | None = None
    """One of plan.DATA_PARALLEL_MODES ('fsdp' reads as 'zero2'); None lets the planner choose."""
    recompute: str | None = None
    """'none', 'selective' or 'full' for every block; None lets the planner choose per block."""
    optimizer: str = "adam"
    mixed_precision: str | None = None
    """'bf16' or None (passes/precision.py); the graph's costs are already priced for it."""
    training: bool = True
    """False plans inference: no backward, gradients or optimizer state."""
    max_microbatches: int = 64
    """Largest microbatch count tried when the planner chooses."""
    verbose: bool = False
    """Print a line per candidate while searching."""


def microbatch_choices(request: PlanRequest, data_parallel: int = 1) -> list[int]:
    """Microbatch counts that divide one replica's share of the batch."""
    batch = request.batch_size // data_parallel
    if request.num_microbatches is not None:
        m = request.num_microbatches
        if m < 1 or batch % m:
            share = (f"the batch of {batch} samples" if data_parallel == 1
                     else f"the {batch} samples of each of {data_parallel} replicas")
            raise InputError(
                f"num_microbatches={m} does not divide {share}; "
                f"choose one of {[d for d in range(1, batch + 1) if batch % d == 0]}"
            )
        return [m]
    return [d for d in range(1, min(batch, request.max_microbatches) + 1) if batch % d == 0]


def data_parallel_choices(request: PlanRequest, cluster: Cluster) -> list[int]:
    """Replica counts that divide both the device count and the batch."""
    n, batch = cluster.num_devices, request.batch_size
    if request.num_stages is not None and not 1 <= request.num_stages <= n:
        raise InputError(f"num_stages={request.num_stages} must be between 1 and the {n} devices of the cluster")
    if request.data_parallel is not None:
        dp = request.data_parallel
        if dp < 1 or n % dp or batch % dp:
            raise InputError(
                f"data_parallel={dp} must divide both the {n} devices and the batch of {batch} samples; "
                f"choose one of {[d for d in range(1, n + 1) if n % d == 0 and batch % d == 0]}"
            )
        return [dp]
    fixed_stages = request.num_stages or 1
    choices = [d for d in range(1, n + 1) if n % d == 0 and batch % d == 0 and d * fixed_stages <= n]
    if request.num_microbatches is not None:
        choices = [d for d in choices if (batch // d) % max(request.num_microbatches, 1) == 0]
        if not choices:
            microbatch_choices(request, 1)  # raises the error that names the batch and the divisors
    return choices


def smallest_microbatch(request: PlanRequest, cluster: Cluster) -> int:
    """Samples in the smallest microbatch any candidate uses: the size to trace at."""
    return min(request.batch_size // dp // microbatch_choices(request, dp)[-1]
               for dp in data_parallel_choices(request, cluster))


def plan_pipeline(graph: BlockGraph, cluster: Cluster, request: PlanRequest, model_class: str) -> Plan:
    """The fastest feasible dp × pp plan for `graph` on `cluster`."""
    started = time.perf_counter()
    schedules = schedule_choices(request)
    search = _Search(graph, cluster, request)
    # Most replicas first: the plans that data parallelism alone makes fast are found early,
    # so the lower bound prunes the deeper pipelines without solving them.
    for dp in sorted(data_parallel_choices(request, cluster), reverse=True):
        for num_ranks in _stage_choices(request, cluster, len(graph.blocks), dp):
            for m in microbatch_choices(request, dp):
                for schedule in schedules:
                    if schedule == "gpipe" and num_ranks == 1 and "1f1b" in schedules:
                        continue  # one stage: GPipe is 1F1B with more in flight
                    for v in virtual_stage_choices(request, schedule, num_ranks, m, len(graph.blocks),
                                                   search.skipped):
                        for mode, shard in data_parallel_mode_choices(request, dp, cluster, num_ranks):
                            search.candidate(Setting(dp=dp, mode=mode, dp_shard=shard), num_ranks, m, schedule, v)
    if not search.candidates and search.skipped:
        raise InputError(f"no plan satisfies the choices fixed: {search.skipped[0]}")
    if search.best is None:
        raise infeasible_error(graph, cluster, request, search.failures)
    best = search.best
    chosen = best.tried
    candidates = [
        Candidate(**{**c.__dict__, "status": "chosen"})
        if c.status == "feasible" and all(getattr(c, k) == v for k, v in chosen.items())
        else c
        for c in search.candidates
    ]
    return assemble_plan(graph, cluster, request, model_class, best.problem, best.solution, candidates,
                         time.perf_counter() - started, search.num_problems, best.setting, best.step)


@dataclass
class _Best:
    step: float
    solution: PipelineSolution
    problem: PipelineProblem
    setting: Setting
    tried: dict


class _Search:
    """The candidates tried so far, the best one, and why the others failed."""

    def __init__(self, graph: BlockGraph, cluster: Cluster, request: PlanRequest) -> None:
        self.graph, self.cluster, self.request = graph, cluster, request
        self.best: _Best | None = None
        self.candidates: list[Candidate] = []
        self.failures: list[Failure] = []
        self.skipped: list[str] = []  # why fixed choices left a (schedule, ranks, microbatches) without any plan
        self.num_problems = 0

    def candidate(self, setting: Setting, num_ranks: int, m: int, schedule: str, v: int) -> None:
        """Price one (dp, mode, R, m, schedule, v): without recomputation first, then, when that does not
        fit and the user left it open, with recomputation chosen per block (autopart/recompute_choice.py)."""
        graph, cluster, request = self.graph, self.cluster, self.request
        tried = dict(data_parallel=setting.dp, num_stages=num_ranks, num_microbatches=m, schedule=schedule,
                     virtual_stages=v, data_parallel_mode=setting.mode)

        def build(with_setting: Setting) -> PipelineProblem:
            return build_problem(graph, cluster, request, num_ranks * v, m, schedule, with_setting, virtual_stages=v)

        for policy in recompute_choices(request):
            current = dataclasses.replace(setting, recompute=uniform_recompute(graph, policy))
            problem = build(current)
            bound = lower_bound(problem) + sync_lower_bound(graph, cluster, request, problem, current)
            label = dict(tried, recompute=current.recompute_label)
            if self.best is not None and bound >= self.best.step:
                self.candidates.append(Candidate(**label, step_seconds=None, status="pruned",
                                                 detail=f"lower bound {bound:.3g} s >= best {self.best.step:.3g} s"))
                return  # recomputing costs more time still
            if shortfall(problem) > 0:  # more than all devices together hold: no split can fit
                failure = Failure.of(problem, current, request, tried)
                self.failures.append(failure)
                self.candidates.append(Candidate(**label, step_seconds=None, status="infeasible",
                                                 detail=failure.summary))
                continue
            self.num_problems += 1
            try:
                solution = solve_pipeline(problem, backend=SOLVER_BACKEND)
            except PlanError as error:
                failure = failure_of_error(problem, current, request, tried, error)
                self.failures.append(failure)
                self.candidates.append(Candidate(**label, step_seconds=None, status="infeasible",
                                                 detail=str(error).splitlines()[0]))
                continue
            if request.recompute is None and policy != "none":
                current, problem, solution = choose_recompute_per_block(graph, request, build, current, problem,
                                                                        solution)
            step = (solution.step_seconds
                    + data_parallel_sync_seconds(graph, cluster, request, problem, solution, current)
                    + optimizer_seconds(graph, cluster, request, problem, solution, current))
            detail = _binding(problem, solution)
            label = dict(tried, recompute=current.recompute_label)
            self.candidates.append(Candidate(**label, step_seconds=step, status="feasible", detail=detail))
            if request.verbose:
                print(f"  dp={setting.dp} ({setting.mode}) pp={num_ranks}×v{v} m={m} {schedule} "
                      f"recompute {current.recompute_label}: {step * 1e3:.3f} ms ({detail})", file=sys.stderr)
            if self.best is None or step < self.best.step * (1 - 1e-9):
                self.best = _Best(step, solution, problem, current, label)
            return  # fits: recomputing more only costs time


def schedule_choices(request: PlanRequest) -> list[str]:
    """The schedules to try: the one fixed, else all (forward-only plans: GPipe and 1F1B)."""
    v = request.virtual_stages
    if v is not None and v > 1 and request.num_stages == 1:
        raise InputError(
            f"virtual_stages={v} needs at least 2 pipeline ranks, but num_stages=1: PyTorch's interleaved "
            "schedules send between consecutive stages, which cannot share a rank; use num_stages >= 2 or "
            "virtual_stages=1")
    if request.schedule is not None:
        if request.schedule not in SCHEDULES:
            raise InputError(f"schedule={request.schedule!r} is not known; use one of {SCHEDULES} or None")
        if not request.training and request.schedule in VIRTUAL_SCHEDULES:
            raise InputError(f"schedule={request.schedule!r} is a training schedule; plan inference with "
                             "'1f1b' or 'gpipe'")
        if v is not None and v > 1 and request.schedule not in VIRTUAL_SCHEDULES:
            raise InputError(f"schedule={request.schedule!r} runs one stage per rank but virtual_stages={v}; "
                             f"use one of {VIRTUAL_SCHEDULES}")
        return [request.schedule]
    if v is not None and v > 1:
        return [s for s in DEFAULT_SCHEDULES if s in VIRTUAL_SCHEDULES]
    return list(DEFAULT_SCHEDULES) if request.training else ["1f1b", "gpipe"]


def virtual_stage_choices(request: PlanRequest, schedule: str, num_ranks: int, num_microbatches: int,
                          num_blocks: int, skipped: list[str] | None = None) -> list[int]:
    """Stages per rank for `schedule`: 1 for GPipe and 1F1B; for interleaved 1F1B 2 to
    MAX_VIRTUAL_STAGES (v = 1 is 1F1B), for zero bubble 1 to MAX_VIRTUAL_STAGES; only with
    at least 2 ranks, R·v ≤ blocks, and m in whole rounds (`schedules.microbatches_per_round`).
    Why a (schedule, R, m) gets none is appended to `skipped`."""
    fixed = request.virtual_stages
    if fixed is not None and fixed < 1:
        raise InputError(f"virtual_stages={fixed} must be ≥ 1 (stages per pipeline rank)")
    if schedule not in VIRTUAL_SCHEDULES:
        return [1] if fixed in (None, 1) else []
    why = None
    if num_ranks < 2:  # consecutive stages on one rank: PyTorch's schedules would send to themselves
        why = f"{schedule} needs at least 2 pipeline ranks (num_stages), not {num_ranks}"
    else:
        try:
            microbatches_per_round(num_ranks, num_microbatches)
        except PlanError as error:
            why = str(error)
    lowest = 2 if schedule == "interleaved_1f1b" else 1
    choices = [fixed] if fixed is not None else range(lowest, MAX_VIRTUAL_STAGES + 1)
    fitting = [v for v in choices if v >= lowest and num_ranks * v <= num_blocks]
    if why is None and not fitting:
        need = num_ranks * (fixed or lowest)
        why = (f"{schedule} with {num_ranks} ranks × {fixed or lowest} virtual stages needs {need} blocks, "
               f"but the model has {num_blocks}; use fewer ranks or virtual stages")
    if why is not None:
        if skipped is not None:
            skipped.append(why)
        return []
    return fitting


def data_parallel_mode_choices(request: PlanRequest, dp: int, cluster: Cluster | None = None,
                               num_ranks: int = 1) -> list[tuple[str, int]]:
    """(mode, dp_shard) pairs to try: 'ddp' alone without replicas or training; else 'ddp', 'zero2',
    'zero3', and 'hsdp' where the replicas span hosts evenly (`step_costs.hsdp_shard_size`),
    unless the user fixed one."""
    try:
        mode = data_parallel_mode_name(request.data_parallel_mode)
    except ValueError as error:
        raise InputError(str(error)) from error
    if dp == 1 or not request.training:
        return [("ddp", 1)]
    hsdp = hsdp_shard_size(cluster, dp, num_ranks) if cluster is not None else None
    modes = [mode] if mode is not None else list(DATA_PARALLEL_MODES)
    if mode == "hsdp" and hsdp is None:
        raise InputError(f"data_parallel_mode='hsdp' shards within a host and replicates across hosts, but the "
                         f"{dp} replicas do not span several hosts evenly; use 'zero3' (shard over all replicas)")
    shard = {"ddp": 1, "zero2": dp, "zero3": dp, "hsdp": hsdp}
    return [(m, shard[m]) for m in modes if shard[m] is not None]


def _stage_choices(request: PlanRequest, cluster: Cluster, num_blocks: int, dp: int = 1) -> list[int]:
    n = cluster.num_devices // dp
    if request.num_stages is not None:
        s = request.num_stages
        if s < 1 or s > n:
            raise InputError(f"num_stages={s} must be between 1 and the {n} devices of each of {dp} "
                             f"replica(s) ({cluster.num_devices} devices)")
        if s > num_blocks:
            raise PlanError(
                f"num_stages={s} but the model splits into only {num_blocks} blocks even one op per "
                f"block; use num_stages <= {num_blocks}"
            )
        return [s]
    return list(range(1, min(n, num_blocks) + 1))


def build_problem(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                  num_stages: int, num_microbatches: int, schedule: str, setting: Setting | None = None, *,
                  virtual_stages: int = 1) -> PipelineProblem:
    """The ILP instance for S stages on the first replica's R = S / v devices, costs per microbatch.

    Stage s runs on device s % R. With v > 1 each stage gets 1/v of its device's
    memory: a linear stand-in for the device's sum that keeps the ILP per stage
    (conservative; balanced stages use about that share anyway). Each stage's
    capacity also leaves room for what a stage holds once, whichever blocks it
    gets (`PipelineProblem.reserved_bytes`): the largest block's activations that
    recomputation rebuilds in its backward, and ZeRO-3's gathered units.
    """
    setting = setting or Setting()
    scale = scale_of(request, num_microbatches, setting.dp)
    num_ranks = num_stages // virtual_stages
    pipelined = num_stages > 1
    devices = [cluster.devices[s % num_ranks] for s in range(num_stages)]
    modes = [setting.recompute_of(b) for b in range(len(graph.blocks))]
    fwd = np.array([[b.time_on(d.name).fwd(scale) for d in devices] for b in graph.blocks])
    if request.training:
        bwd = np.array([[b.time_on(d.name).bwd(scale) + recompute_seconds(b, d.name, mode, scale, schedule)
                         for d in devices] for b, mode in zip(graph.blocks, modes)])
    else:
        bwd = np.zeros_like(fwd)
    state = np.array([block_state_bytes(b, request, setting)
                      + returned_output_bytes(b, request, num_microbatches, scale) for b in graph.blocks])
    grads = np.array([block_gradient_bytes(b, request, setting, num_microbatches, pipelined) for b in graph.blocks])
    activations = np.array([activation_bytes(b, request, setting, mode) * scale
                            for b, mode in zip(graph.blocks, modes)])
    transient = np.array([loss_backward_bytes(b) * scale if request.training else 0.0 for b in graph.blocks])
    reserved = (max((recompute_transient_bytes(b, request, setting, mode) * scale
                     for b, mode in zip(graph.blocks, modes)), default=0.0)
                + fsdp_unit_transient_bytes(graph.blocks, request, setting))
    links = [cluster.link(s % num_ranks, (s + 1) % num_ranks) for s in range(num_stages - 1)]
    return PipelineProblem(
        block_names=tuple(b.name for b in graph.blocks),
        fwd_seconds=fwd,
        bwd_seconds=bwd,
        state_bytes=state,
        activation_bytes=activations,
        gradient_bytes=grads,
        transient_bytes=transient,
        edges=graph.edges,
        values=tuple(ValueFlow(producer=v.producer, consumers=v.consumers,
                               num_bytes=int(math.ceil(v.num_bytes * scale))) for v in graph.values),
        memory_capacity=np.array([d.memory_bytes / virtual_stages - reserved for d in devices], dtype=float),
        link_latency=np.array([link.latency_s for link in links]),
        link_bandwidth=np.array([link.bandwidth for link in links]),
        num_microbatches=num_microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
        reserved_bytes=float(reserved),
    )


def lower_bound(problem: PipelineProblem) -> float:
    """(m + S - 1) · max(largest block, total work / S), each block at its fastest device."""
    per_block = (problem.fwd_seconds + problem.bwd_seconds).min(axis=1)
    slot = max(per_block.max(), per_block.sum() / problem.num_stages)
    return problem.step_factor() * slot


def _binding(problem: PipelineProblem, solution: PipelineSolution) -> str:
    slowest = int(np.argmax(solution.stage_seconds))
    fullest = int(np.argmax(np.array(solution.stage_memory_bytes) / problem.memory_capacity))
    used = solution.stage_memory_bytes[fullest] / problem.memory_capacity[fullest]
    return (f"slowest stage {slowest} ({solution.stage_seconds[slowest] * 1e3:.3f} ms/microbatch); "
            f"fullest stage {fullest} at {used:.1%} of memory")
