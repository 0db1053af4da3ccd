"""Search over pipeline configurations: replicas, pipeline ranks, virtual stages,
microbatch counts, schedules, how the replicas hold the state (DDP, ZeRO-2,
ZeRO-3, HSDP) and how blocks keep their activations (recomputation).

The values tried for each choice (or the one the user fixed) come from
autopart/plan_choices.py. For each candidate (dp replicas and their mode, R
ranks × v stages each, m microbatches, schedule) the block graph becomes a `PipelineProblem` (costs
scaled to one microbatch, priced by autopart/step_costs.py) and the ILP places
the blocks. A candidate that does not fit without recomputation is solved
again with every block recomputed, and then each stage keeps as much as its
memory allows, block by block (autopart/recompute_choice.py). Candidates whose
lower bound cannot beat the best found are pruned without a solve. The best
candidate becomes the `Plan` (autopart/plan_assembly.py).

Scaling to a microbatch: the graph is traced at one microbatch size
(`traced_batch_size`); FLOPs, roofline time, saved activations and
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
from autopart.plan import Candidate, Plan
from autopart.plan_assembly import assemble_plan, scale_of
from autopart.plan_choices import (
    PlanRequest,
    data_parallel_choices,
    data_parallel_mode_choices,
    microbatch_choices,
    pipeline_choices,
    schedule_choices,
    virtual_stage_choices,
)
from autopart.plan_errors import Failure, failure_of_error, infeasible_error, shortfall
from autopart.problems import PipelineProblem, PipelineSolution, ValueFlow
from autopart.recompute_choice import choose_recompute_per_block, recompute_choices, uniform_recompute
from autopart.solver import solve_pipeline
from autopart.step_costs import (
    Setting,
    activation_bytes,
    block_gradient_bytes,
    block_state_bytes,
    data_parallel_sync_seconds,
    fsdp_unit_transient_bytes,
    loss_backward_bytes,
    loss_seconds,
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

def plan_pipeline(graph: BlockGraph, cluster: Cluster, request: PlanRequest, model_class: str, *,
                  traced_batch_size: int) -> Plan:
    """The fastest feasible dp × pp plan for `graph` (costed at `traced_batch_size` samples) on `cluster`."""
    started = time.perf_counter()
    schedules = schedule_choices(request)
    search = _Search(graph, cluster, request, traced_batch_size)
    # Most replicas first: the plans that data parallelism alone makes fast are found early,
    # so the lower bound prunes the deeper pipelines without solving them.
    for dp in sorted(data_parallel_choices(request, cluster), reverse=True):
        for num_ranks in pipeline_choices(request, cluster, len(graph.blocks), dp):
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
        raise infeasible_error(graph, cluster, request, search.failures, traced_batch_size)
    best = search.best
    chosen = best.tried
    candidates = [
        Candidate(**{**c.__dict__, "status": "chosen"})
        if c.status == "feasible" and all(getattr(c, k) == v for k, v in chosen.items())
        else c
        for c in search.candidates
    ]
    return assemble_plan(graph, cluster, request, traced_batch_size, model_class, best.problem, best.solution,
                         candidates, time.perf_counter() - started, search.num_problems, best.setting, best.step)


@dataclass
class _Best:
    step: float
    solution: PipelineSolution
    problem: PipelineProblem
    setting: Setting
    tried: dict


class _Search:
    """The candidates tried so far, the best one, and why the others failed."""

    def __init__(self, graph: BlockGraph, cluster: Cluster, request: PlanRequest, traced_batch_size: int) -> None:
        self.graph, self.cluster, self.request = graph, cluster, request
        self.traced_batch_size = traced_batch_size
        self.best: _Best | None = None
        self.candidates: list[Candidate] = []
        self.failures: list[Failure] = []
        self.skipped: list[str] = []  # why fixed choices left a (schedule, ranks, microbatches) without any plan
        self.num_problems = 0

    def candidate(self, setting: Setting, num_ranks: int, m: int, schedule: str, v: int) -> None:
        """Price one (dp, mode, R, m, schedule, v): without recomputation first, then, when that does not
        fit and the user left it open, with recomputation chosen per block (autopart/recompute_choice.py)."""
        graph, cluster, request = self.graph, self.cluster, self.request
        tried = dict(data_parallel=setting.dp, pipeline_parallel=num_ranks, num_microbatches=m, schedule=schedule,
                     virtual_stages=v, data_parallel_mode=setting.mode)

        def build(with_setting: Setting) -> PipelineProblem:
            return build_problem(graph, cluster, request, num_ranks * v, m, schedule, with_setting, virtual_stages=v,
                                 traced_batch_size=self.traced_batch_size)

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
                                                                        solution, self.traced_batch_size)
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
    fwd = np.array([[b.time_on(d.name).fwd(scale) + loss_seconds(b, d, scale, request)[0] for d in devices]
                    for b in graph.blocks])
    if request.training:
        bwd = np.array([[b.time_on(d.name).bwd(scale) + loss_seconds(b, d, scale, request)[1]
                         + recompute_seconds(b, d.name, mode, scale, schedule)
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
