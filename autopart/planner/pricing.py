"""The price of one candidate: replicas and how they hold the state (DDP,
ZeRO-2, ZeRO-3, HSDP), pipeline ranks, virtual stages, microbatches, schedule,
and how blocks keep their activations (recomputation).

The values tried for each choice (or the one the user fixed) come from each
axis's module (autopart/axes/); the best-first search over them, with its
bounds, is planner/search.py. A candidate's block graph becomes a
`PipelineProblem` (costs scaled to one microbatch, priced by
planner/step_costs.py) whose split the solver finds (`price_candidate`); one
that does not fit without recomputation is solved again with every block
recomputed, and then each stage keeps as much as its memory allows, block by
block (planner/recompute_choice.py). The best candidate becomes the `Plan`
(planner/assembly.py).

Scaling to a microbatch: the graph is traced at one microbatch size
(`traced_batch_size`); FLOPs, roofline time, saved activations and
boundary bytes are linear in the batch, so a candidate with microbatches of b
samples scales them by b / traced size; what a call costs whatever its batch
does not scale (`BlockTimes`: kernel launches, autocast's weight conversions and
weight reads, passes/node_costs.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from autopart.axes import AXES
from autopart.axes.context import context_exchange_seconds
from autopart.axes.expert import expert_cast_correction, expert_dispatch_seconds
from autopart.planner.block_arrays import stage_seconds
from autopart.cost_models import Cluster, p2p_seconds
from autopart.core.errors import PlanError
from autopart.core.blocks import BlockGraph
from autopart.core.plan import Candidate
from autopart.planner.assembly import scale_of
from autopart.core.request import PlanRequest
from autopart.planner.infeasible import Failure, failure_of_error, shortfall
from autopart.core.problems import PipelineProblem, PipelineSolution, ValueFlow
from autopart.planner.recompute_choice import choose_recompute_per_block, recompute_choices, uniform_recompute
from autopart.solver import solve_pipeline
from autopart.planner.step_costs import (
    activation_bytes,
    block_gradient_bytes,
    block_state_bytes,
    expert_copy_bytes,
    expert_weights_in_compute_dtype,
    fsdp_unit_transient_bytes,
    loss_backward_bytes,
    loss_seconds,
    keeps_model_outputs,
    optimizer_seconds,
    recompute_seconds,
    recompute_transient_bytes,
    returned_output_bytes,
)
from autopart.core.setting import Layout, Setting


# "auto": chains of blocks (every layer reads the one before, as in every transformer) get the
# solver's exact dynamic program, whose optimum is the ILP's (every split of a chain is
# contiguous; tests/test_solver_pipeline.py checks both against brute force); DAGs get the
# CP-SAT model. The DP takes 2–12 ms on 83–130 blocks and 16–128 stages, where model building
# alone costs CP-SAT more; a search over thousands of layouts needs that.
SOLVER_BACKEND = "auto"

@dataclass(frozen=True, kw_only=True)
class PricingBasis:
    """What every layout of one tensor-parallel size is priced against."""

    graph: BlockGraph
    """Block costs per device of the tp group, at `traced_batch_size` samples."""
    cluster: Cluster
    """One device per tp group (axes.tensor.group_cluster)."""
    request: PlanRequest
    traced_batch_size: int


@dataclass
class Priced:
    """What pricing one candidate found: a line per recompute policy tried, the fitting one if any."""

    candidates: list[Candidate] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    num_problems: int = 0
    step: float | None = None
    """Predicted step (s) of the candidate as it fits, None when it does not (or was pruned)."""
    solution: PipelineSolution | None = None
    problem: PipelineProblem | None = None
    setting: Setting | None = None
    label: dict = field(default_factory=dict)
    """The chosen Candidate's fields."""


def price_candidate(basis: PricingBasis, layout: Layout,
                    may_win: Callable[[float], bool] = lambda bound: True) -> Priced:
    """Price one layout (dp and its mode, R, m, schedule, v): without recomputation first, then, when
    that does not fit and the user left it open, with recomputation chosen per block
    (planner/recompute_choice.py). `may_win(bound)` says whether a lower bound can still beat the
    best step found (False: pruned without a solve). Each axis adds its own price to the stages'
    step (`Axis.step_seconds`, bounded by `Axis.step_bound`)."""
    graph, cluster, request, traced_batch_size = basis.graph, basis.cluster, basis.request, basis.traced_batch_size
    setting, tried = layout.setting, layout.tried()
    priced = Priced()

    def build(with_setting: Setting) -> PipelineProblem:
        return build_problem(graph, cluster, request, layout.num_ranks * layout.virtual_stages,
                             layout.num_microbatches, layout.schedule, with_setting,
                             virtual_stages=layout.virtual_stages, traced_batch_size=traced_batch_size)

    for policy in recompute_choices(request):
        current = dataclasses.replace(setting, recompute=uniform_recompute(graph, policy))
        problem = build(current)
        bound = lower_bound(problem) + sum(axis.step_bound(graph, cluster, request, problem, current)
                                           for axis in AXES.values() if axis.step_bound is not None)
        label = dict(tried, recompute=current.recompute_label)
        if not may_win(bound):
            priced.candidates.append(Candidate(**label, step_seconds=None, status="pruned",
                                               detail=f"lower bound {bound:.3g} s cannot beat the best"))
            return priced  # recomputing costs more time still
        if shortfall(problem) > 0:  # more than all devices together hold: no split can fit
            failure = Failure.of(problem, current, request, tried)
            priced.failures.append(failure)
            priced.candidates.append(Candidate(**label, step_seconds=None, status="infeasible",
                                               detail=failure.summary))
            continue
        priced.num_problems += 1
        try:
            solution = solve_pipeline(problem, backend=SOLVER_BACKEND)
        except PlanError as error:
            failure = failure_of_error(problem, current, request, tried, error)
            priced.failures.append(failure)
            priced.candidates.append(Candidate(**label, step_seconds=None, status="infeasible",
                                               detail=str(error).splitlines()[0]))
            continue
        if request.recompute is None and policy != "none":
            current, problem, solution = choose_recompute_per_block(graph, request, build, current, problem,
                                                                    solution, traced_batch_size)
        step = (solution.step_seconds
                + sum(axis.step_seconds(graph, cluster, request, problem, solution, current)
                      for axis in AXES.values() if axis.step_seconds is not None)
                + optimizer_seconds(graph, cluster, request, problem, solution, current))
        label = dict(tried, recompute=current.recompute_label)
        priced.candidates.append(Candidate(**label, step_seconds=step, status="feasible",
                                           detail=binding(problem, solution)))
        priced.step, priced.solution, priced.problem, priced.setting, priced.label = (
            step, solution, problem, current, label)
        return priced  # fits: recomputing more only costs time
    return priced


def build_problem(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                  num_stages: int, num_microbatches: int, schedule: str, setting: Setting | None = None, *,
                  virtual_stages: int = 1, traced_batch_size: int) -> PipelineProblem:
    """The ILP instance for S stages on the first replica's R = S / v devices, costs per microbatch.

    Stage s runs on device s % R. With v > 1 each stage gets 1/v of its device's
    memory: a linear stand-in for the device's sum that keeps the ILP per stage
    (conservative; balanced stages use about that share anyway). Each stage's
    capacity also leaves room for what a stage holds once, whichever blocks it
    gets (`PipelineProblem.reserved_bytes`): the largest block's activations that
    recomputation rebuilds in its backward, and ZeRO-3's gathered units.
    """
    setting = setting or Setting()
    scale = scale_of(request, traced_batch_size, num_microbatches, setting.dp)
    num_ranks = num_stages // virtual_stages
    pipelined = num_stages > 1
    devices = [cluster.devices[s % num_ranks] for s in range(num_stages)]
    modes = [setting.recompute_of(b) for b in range(len(graph.blocks))]
    fwd, bwd = stage_seconds(graph, [d.name for d in devices], scale, request.training)
    if setting.ep > 1:  # the experts' all-to-alls, on each microbatch's critical path
        dispatch = expert_dispatch_seconds(graph, cluster, setting, num_ranks, num_stages, scale, request.training)
        fwd, bwd = fwd + dispatch[0], bwd + dispatch[1]
    if setting.cp > 1:  # attention's key/value exchange over the cp group, likewise
        exchange = context_exchange_seconds(graph, cluster, setting, num_ranks, num_stages, scale, request.training)
        fwd, bwd = fwd + exchange[0], bwd + exchange[1]
        for b, mode in enumerate(modes):  # a block recomputed in full gathers again in its backward
            if mode == "full" and request.training and graph.blocks[b].recomputable:
                bwd[b] += exchange[0][b]
    if any(b.expert_cast_times for b in graph.blocks):  # bf16 expert weight copies: E / ep, batch-independent
        casts = expert_cast_correction(graph, [d.name for d in devices], setting, scale, request.training,
                                       expert_weights_in_compute_dtype(request, setting))
        fwd, bwd = fwd + casts[0], bwd + casts[1]
    for b, block in enumerate(graph.blocks):  # the loss on the model's outputs, and replayed forwards
        if modes[b] == "selective" and block.eager_times:  # a selective region of a compiled plan runs eagerly
            ran = [(block.run_time_on(d.name, "selective"), block.time_on(d.name)) for d in devices]
            fwd[b] += [eager.fwd(scale) - compiled.fwd(scale) for eager, compiled in ran]
            if request.training:
                bwd[b] += [eager.bwd(scale) - compiled.bwd(scale) for eager, compiled in ran]
        if block.model_output_float32_bytes and request.training:
            loss = [loss_seconds(block, d, scale, request) for d in devices]
            fwd[b] += [f for f, _ in loss]
            bwd[b] += [w for _, w in loss]
        if modes[b] != "none" and request.training:
            bwd[b] += [recompute_seconds(block, d.name, modes[b], scale, schedule) for d in devices]
    keeps = keeps_model_outputs(num_stages, setting.dp)
    state = np.array([block_state_bytes(b, request, setting)
                      + returned_output_bytes(b, request, num_microbatches, scale, keeps) for b in graph.blocks])
    grads = np.array([block_gradient_bytes(b, request, setting, num_microbatches, pipelined) for b in graph.blocks])
    activations = np.array([activation_bytes(b, request, setting, mode) * scale
                            + expert_copy_bytes(b, request, setting, mode) for b, mode in zip(graph.blocks, modes)])
    transient = np.array([loss_backward_bytes(b) * scale if request.training else 0.0 for b in graph.blocks])
    reserved = (max((recompute_transient_bytes(b, request, setting, mode) * scale
                     for b, mode in zip(graph.blocks, modes)), default=0.0)
                + fsdp_unit_transient_bytes(graph.blocks, request, setting))
    links = [cluster.link(s % num_ranks, (s + 1) % num_ranks) for s in range(num_stages - 1)]
    values = tuple(ValueFlow(producer=v.producer, consumers=v.consumers, num_bytes=int(math.ceil(v.num_bytes * scale)))
                   for v in graph.values)
    return PipelineProblem(
        block_names=tuple(b.name for b in graph.blocks),
        fwd_seconds=fwd,
        bwd_seconds=bwd,
        state_bytes=state,
        activation_bytes=activations,
        gradient_bytes=grads,
        transient_bytes=transient,
        edges=graph.edges,
        values=values,
        memory_capacity=np.array([d.memory_bytes / virtual_stages - reserved for d in devices], dtype=float),
        boundary_seconds=_boundary_seconds(values, links),
        num_microbatches=num_microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
        reserved_bytes=float(reserved),
    )


def _boundary_seconds(values: tuple[ValueFlow, ...], links: list) -> np.ndarray:
    """[num_values, num_stages - 1] p2p seconds of each value over each stage boundary's link, each
    distinct (bytes, link) priced once (a deep pipeline has a few distinct links and value sizes)."""
    columns: dict = {}
    for link in links:
        columns.setdefault(link, len(columns))
    sizes: dict[int, int] = {}
    for value in values:
        sizes.setdefault(value.num_bytes, len(sizes))
    table = np.array([[p2p_seconds(n, link) for link in columns] for n in sizes], dtype=float).reshape(
        len(sizes), len(columns))
    rows = [sizes[v.num_bytes] for v in values]
    return table[np.ix_(rows, [columns[link] for link in links])].reshape(len(values), len(links))


def lower_bound(problem: PipelineProblem) -> float:
    """(m + S - 1) · max(largest block, total work / S), each block at its fastest device."""
    per_block = (problem.fwd_seconds + problem.bwd_seconds).min(axis=1)
    slot = max(per_block.max(), per_block.sum() / problem.num_stages)
    return problem.step_factor() * slot


def binding(problem: PipelineProblem, solution: PipelineSolution) -> str:
    """What limits a solved candidate: its slowest stage and its fullest."""
    slowest = int(np.argmax(solution.stage_seconds))
    fullest = int(np.argmax(np.array(solution.stage_memory_bytes) / problem.memory_capacity))
    used = solution.stage_memory_bytes[fullest] / problem.memory_capacity[fullest]
    return (f"slowest stage {slowest} ({solution.stage_seconds[slowest] * 1e3:.3f} ms/microbatch); "
            f"fullest stage {fullest} at {used:.1%} of memory")
