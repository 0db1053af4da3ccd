"""Search over mesh shapes dp × pp × tp for the fastest plan, and the graph it runs on.

For every tensor-parallel size tp that divides the devices and the devices of a
host (tp groups never span hosts; pipeline and data parallelism cross them over
the cluster's inter-host link), the strategy problem of passes/tensor_parallel
is built with the stage boundaries kept Replicate, the solver answers it
(identical layers share variables), and the blocks are restated per device of
the tp group (`tensor_parallel_blocks`). The layout search (autopart/search.py)
then cuts the restated blocks over the N / tp groups and chooses dp, pp,
microbatches, schedule, sharding and recomputation for all tp sizes at once,
best first under a lower bound. The strategy ILP budgets parameter bytes only,
so its budget is the whole training state's share of memory
(`tp_memory_budgets`), tightened until the search finds a plan. The plan with
the lowest predicted step time wins; the report lists the layouts tried.

A graph priced as compiled kernels (passes/fusion.py) is searched twice per
budget: with the splits its own prices choose, then, where they differ, with
the splits op-by-op prices choose (`eager_splits`), which a plan takes only when
faster. Its ILP weighs time alone, and a fused chain gains little from being
split, so compiled prices may leave ops replicated that keep whole activations;
the eager splits keep what an eager plan keeps, at compiled prices, so no
compiled plan is priced slower than the eager plan of its layout.

Shapes are static: the graph is costed at one microbatch size. When the
winner uses another, `search_mesh` has the model traced again at that size
(its `retrace` argument), restates the plan's stages on the new graph block
by block, and chooses the tensor-parallel splits again on it through the same
`tensor_parallel_blocks` with the same budget. Given a layer stack analysed
once (`restate`), the plan stays on the blocks: the whole model is traced
later (autopart/api.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping

import torch.fx

from autopart import passes
from autopart.cost_models import Cluster, optimizer_state_bytes
from autopart.core.errors import PlanError
from autopart.core.interfaces import io_spec
from autopart.core.blocks import BlockGraph
from autopart.passes.node_costs import node_cost
from autopart.passes.tensor_parallel import TPAssignment, TPProblemIndex
from autopart.passes.tensor_parallel.placements import Placement
from autopart.passes.tensor_parallel.sequence import boundary_placements
from autopart.core.plan import Plan, TensorParallelPlan
from autopart.core.request import PlanRequest
from autopart.core.problems import TPSolution
from autopart.axes.tensor import group_cluster
from autopart.frontend.source import ModelSource
from autopart.planner.search import TPOption, search
from autopart.passes.tensor_parallel.expert_rules import experts_under_tp
from autopart.solver import solve_tp


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchResult:
    """The chosen plan and the graph it was made for."""

    graph: torch.fx.GraphModule
    """The model traced (and costed) at the plan's microbatch size."""
    blocks: BlockGraph
    """`graph`'s blocks (their node names: what codegen nests into recompute regions)."""
    plan: Plan
    assignment: TPAssignment | None
    """Per-node placements on the tp axis of `graph`; None when tp = 1."""
    tp_budget: float | None = None
    """The strategy ILP's parameter budget per device the assignment was chosen under (None: tp = 1)."""
    eager_splits: bool = False
    """The splits were chosen by op-by-op prices (`tensor_parallel_blocks`' `eager_splits`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Strategies:
    """A solved strategy problem: its arrays, the answer, and the answer as placements."""

    index: TPProblemIndex
    solution: TPSolution
    assignment: TPAssignment


def _solve_strategies(gm: torch.fx.GraphModule, cluster: Cluster, tp: int, memory_budget_bytes: float, *,
                      fixed: Mapping[str, Placement | str | frozenset] | None, training: bool,
                      sequence_parallel: bool | None = False, time_limit_s: float = 10.0,
                      eager_splits: bool = False) -> _Strategies:
    index = passes.tensor_parallel.build_tp_problem(gm, cluster, tp, memory_budget_bytes, fixed=fixed,
                                                    training=training, sequence_parallel=sequence_parallel is not False,
                                                    force_sequence=sequence_parallel is True,
                                                    eager_splits=eager_splits)  # the pass: arrays
    solution = solve_tp(index.problem, time_limit_s=time_limit_s)                   # the solver
    return _Strategies(index=index, solution=solution,
                       assignment=passes.tensor_parallel.assignment_from_solution(gm, index, solution))


def tensor_parallel_blocks(gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster, tp: int, *,
                           training: bool, fixed: Mapping[str, Placement | str] | None,
                           memory_budget_bytes: float | None = None,
                           sequence_parallel: bool | None = False,
                           eager_splits: bool = False) -> tuple[BlockGraph, TPAssignment]:
    """Op splits for a tp group of `tp` devices with stage boundaries replicated (or, with
    `sequence_parallel` not False, the residual stream sequence-sharded: passes/tensor_parallel/sequence.py):
    the blocks restated per device of the group, and the assignment. Parameters must fit
    `memory_budget_bytes` per device (`tp_memory_budgets`; None: the smallest device's memory).
    `eager_splits`: on a graph priced as compiled kernels, the splits are chosen by op-by-op prices
    (the eager plan's splits), the blocks still restated as compiled kernels run."""
    budget = min(d.memory_bytes for d in cluster.devices) if memory_budget_bytes is None else memory_budget_bytes
    if sequence_parallel is False:
        pinned = passes.tensor_parallel.boundaries_replicated(blocks, fixed)
    else:
        pinned = boundary_placements(gm, blocks, tp, force=bool(sequence_parallel), fixed=fixed)
    chosen = _solve_strategies(gm, cluster, tp, budget, fixed=pinned, training=training,
                               sequence_parallel=sequence_parallel, eager_splits=eager_splits)
    restated = passes.tensor_parallel.restate_blocks(gm, blocks, cluster, chosen.index, chosen.solution.choice,
                                                     chosen.assignment)
    return restated, chosen.assignment


def search_mesh(gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster, request: PlanRequest, *,
                traced_batch_size: int, tp_choices: list[int], retrace: ModelSource | None,
                restate: Callable[[BlockGraph], BlockGraph] | None = None,
                progress: Callable[[str], None] | None = None,
                phase: Callable[[str, str], None] | None = None) -> SearchResult:
    """The best plan over the tp sizes given, on the model traced at its microbatch size.

    `gm` is the costed graph of `traced_batch_size` samples and `blocks` its
    blocks; `request.tp_plan` fixes layers' splits (passes/tensor_parallel/user_plan.py);
    `retrace` traces the model again at the plan's microbatch size (None: the plan
    stays at the traced size's graph). `restate` turns `gm`'s blocks into the
    blocks the plan places (the repeated layers of the whole model when `gm`
    holds a few of them: passes/layer_stack.py); `progress` receives the
    search's progress (autopart/planner/search.py) and, with `request.verbose`, a line per tp size;
    `phase(name, message)` is told when the retrace starts.
    """
    model_class = io_spec(gm).model_class
    fixed = user_placements(gm, request.tp_plan_dict)
    whole = restate(blocks) if restate is not None else blocks
    levels = {tp: [None] if tp == 1 else tp_memory_budgets(whole, cluster, request, tp) for tp in tp_choices}
    # A graph priced as compiled kernels also offers each tp size the splits op-by-op prices choose
    # (`eager_splits`). The strategy ILP weighs time alone; the cheaper a fused chain, the less it
    # gains from splitting it, and a replicated op keeps its activations whole. With both offered,
    # no compiled plan is priced slower than the eager plan of the same layout.
    kinds = (False, True) if compiled_prices(gm) else (False,)
    solved: dict[tuple[int, float | None, bool], tuple[TPOption, TPAssignment | None] | PlanError] = {}
    errors: list[PlanError] = []
    searched: list[list[tuple]] = []  # the op splits of every search that found no plan
    for level in range(max(len(budgets) for budgets in levels.values())):
        offered: dict[bool, tuple[list[TPOption], dict[int, TPAssignment | None]]] = {}
        budgets = {}
        for eager in kinds:
            options, assignments = [], {}
            for tp in tp_choices:
                if eager and tp == 1:
                    continue
                budget = budgets[tp] = levels[tp][min(level, len(levels[tp]) - 1)]
                if (tp, budget, eager) not in solved:
                    solved[(tp, budget, eager)] = _tp_option(gm, blocks, cluster, request, tp, fixed, budget, restate,
                                                             progress, eager)
                found = solved[(tp, budget, eager)]
                if isinstance(found, PlanError):
                    if not eager:  # the planned splits say why none fits, not these
                        errors.append(found)
                    continue
                planned = offered[False][1].get(tp) if eager else None
                if eager and planned is not None and planned.nodes == found[1].nodes:
                    continue  # the same splits: searched already
                options.append(found[0])
                assignments[tp] = found[1]
            if options:
                offered[eager] = (options, assignments)
            elif not eager:
                offered[eager] = ([], {})
        splits = [(eager, o.tp, assignments[o.tp].nodes if assignments[o.tp] is not None else None)
                  for eager, (options, assignments) in offered.items() for o in options]
        if not splits or splits in searched:  # a tighter budget chose the same splits: the search would fail again
            continue
        searched.append(splits)
        try:
            result, eager = _fastest(offered, request, model_class, traced_batch_size, progress)
        except PlanError as error:
            errors.append(error)
            if not getattr(error, "failures", None):
                raise  # not a memory failure (a choice that cannot be met): a tighter budget will not help
            continue
        tp = result.option.tp
        assignment = offered[eager][1][tp]
        best = _in_real_devices(result.plan, cluster, tp, assignment)
        best = dataclasses.replace(best, experts=experts_under_tp(gm, best.experts, assignment))
        if retrace is None or best.microbatch_size == traced_batch_size:
            return SearchResult(graph=gm, blocks=blocks, plan=best, assignment=assignment, tp_budget=budgets[tp],
                                eager_splits=eager)
        if phase is not None:
            phase("retrace", f"retracing at microbatch size {best.microbatch_size}")
        return _at_microbatch_size(best, blocks, cluster, request, retrace, budgets[tp], eager)
    raise _closest(errors, tp_choices)


def compiled_prices(gm: torch.fx.GraphModule) -> bool:
    """Whether `gm` is priced as compiled kernels (passes/fusion.py kept op-by-op prices beside)."""
    return any(node_cost(n).op_by_op is not None for n in gm.graph.nodes if n.op == "call_function")


def _fastest(offered: dict, request: PlanRequest, model_class: str, traced_batch_size: int,
             progress: Callable[[str], None] | None) -> tuple:
    """(the search result, whether its splits are the eager ones): the layouts of the splits compiled
    prices choose, then those of the op-by-op splits where they differ, which win only when faster.
    PlanError when neither fits (the first search's, when it ran)."""
    result, failed = None, None
    options = offered[False][0]
    if options:
        try:
            result = search(options, request, model_class, traced_batch_size=traced_batch_size, progress=progress)
        except PlanError as error:
            failed = error
            if not getattr(error, "failures", None) or True not in offered:
                raise
    if True not in offered:
        return result, False
    beat = result.plan.predicted_step_seconds if result is not None else float("inf")
    try:
        other = search(offered[True][0], request, model_class, traced_batch_size=traced_batch_size,
                       progress=progress, beat=beat)
    except PlanError as error:
        if result is None:
            raise (failed or error) from None
        other = None
    return (other, True) if other is not None else (result, False)


def _tp_option(gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster, request: PlanRequest, tp: int,
               fixed: Mapping[str, Placement] | None, budget: float | None,
               restate: Callable[[BlockGraph], BlockGraph] | None,
               progress: Callable[[str], None] | None,
               eager_splits: bool = False) -> tuple[TPOption, TPAssignment | None] | PlanError:
    """The blocks as a tp group of `tp` runs them (the op splits chosen under `budget`; `eager_splits`:
    by op-by-op prices), or why none fits."""
    started = time.perf_counter()
    try:
        tp_blocks, assignment = (blocks, None) if tp == 1 else tensor_parallel_blocks(
            gm, blocks, cluster, tp, training=request.training, fixed=fixed, memory_budget_bytes=budget,
            sequence_parallel=request.sequence_parallel, eager_splits=eager_splits)
    except PlanError as error:
        if progress is not None and request.verbose:
            progress(f"tp={tp}: no op split fits ({str(error).splitlines()[0]})")
        return error
    if progress is not None and request.verbose and tp > 1:
        progress(f"tp={tp}: op splits chosen in {time.perf_counter() - started:.2f} s")
    option = TPOption(tp=tp, graph=restate(tp_blocks) if restate is not None else tp_blocks,
                      cluster=group_cluster(cluster, tp))
    return option, assignment


def user_placements(gm: torch.fx.GraphModule, tp_plan: Mapping[str, str] | None) -> dict[str, Placement] | None:
    """The splits a user's `tp_plan` fixes, as placements of `gm`'s nodes (None without a plan)."""
    return passes.tensor_parallel.plan_placements(gm, tp_plan) if tp_plan else None


def stages_on_blocks(plan: Plan, blocks: BlockGraph) -> tuple:
    """The plan's stages with the node names of `blocks`, a graph cut into the blocks planned (by name)."""
    nodes_of = {b.name: b.node_names for b in blocks.blocks}
    return tuple(dataclasses.replace(stage, node_names=tuple(n for name in stage.blocks for n in nodes_of[name]))
                 for stage in plan.stages)


def _at_microbatch_size(plan: Plan, blocks: BlockGraph, cluster: Cluster, request: PlanRequest,
                        source: ModelSource, tp_budget: float | None, eager_splits: bool = False) -> SearchResult:
    """The plan restated on the graph traced at its own microbatch size.

    Stages carry over by block (`ModelSource.planned_graph`): the same module runs, in the same
    order, on the same stage. Node names may differ, so the tensor-parallel splits are chosen again
    on the new graph.
    """
    gm, micro_blocks = source.planned_graph(plan.microbatch_size, blocks.depth, [b.name for b in blocks.blocks],
                                            plan.model_class)
    assignment = choose_splits(gm, micro_blocks, cluster, request, plan.mesh.tp, tp_budget, eager_splits)
    plan = dataclasses.replace(plan, stages=stages_on_blocks(plan, micro_blocks),
                               tensor_parallel=TensorParallelPlan.of(assignment))
    return SearchResult(graph=gm, blocks=micro_blocks, plan=plan, assignment=assignment, tp_budget=tp_budget,
                        eager_splits=eager_splits)


def choose_splits(gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster, request: PlanRequest, tp: int,
                  tp_budget: float | None, eager_splits: bool = False) -> TPAssignment | None:
    """The op splits of a tp group of `tp` on `gm` (a graph traced again: other node names), under the
    parameter budget and the prices (`eager_splits`) the plan was made with and the user's `tp_plan`;
    None at tp = 1."""
    if tp == 1:
        return None
    _, assignment = tensor_parallel_blocks(gm, blocks, cluster, tp, training=request.training,
                                           fixed=user_placements(gm, request.tp_plan_dict),
                                           memory_budget_bytes=tp_budget, sequence_parallel=request.sequence_parallel,
                                           eager_splits=eager_splits)
    return assignment


def tp_memory_budgets(blocks: BlockGraph, cluster: Cluster, request: PlanRequest, tp: int) -> list[float]:
    """Parameter bytes per device the strategy ILP may keep, loosest first.

    The ILP chooses splits for the whole model on one tp group and budgets parameter bytes only;
    a device must also hold their gradients and optimizer state (`optimizer_state_bytes`: Adam 2×)
    and activations. So the budget is the group's share of the cluster's memory less one
    microbatch's activations (split over the group), divided by the bytes of training state per
    parameter byte (1 + 1 + optimizer's; frozen parameters are charged alike, conservatively).
    A pipeline spreads the model over the N / tp groups, so the loosest budget counts all of
    them; when the pipeline planner then finds no plan, a tighter budget (half, down to one
    group's memory) makes the ILP split more, as memory demands.
    """
    capacity = float(min(d.memory_bytes for d in cluster.devices))
    groups = max(cluster.num_devices // tp, 1)
    factor = 2 + optimizer_state_bytes(1, request.optimizer) if request.training else 1
    activations = sum(b.saved_bytes for b in blocks.blocks) / tp if request.training else 0.0
    budgets, share = [], float(groups)
    while True:
        budgets.append(max(capacity * share - activations, 0.0) / factor)
        if share <= 1:
            return budgets
        share = max(share / 2, 1.0)


def _closest(errors: list[PlanError], tp_choices: list[int]) -> PlanError:
    """The error to raise when no budget gave a plan: the last search's (its budgets the tightest, its
    closest attempt over every tp size searched), with the tp sizes whose op splits fit no budget."""
    searched = [e for e in errors if getattr(e, "failures", None)]
    if not searched:
        return errors[0]
    last = searched[-1]
    in_search = {f.tried.get("tensor_parallel", 1) for f in last.failures}
    unsplit = [tp for tp in tp_choices if tp not in in_search]
    if not unsplit:
        return last
    error = PlanError(f"{last}\n  Tensor parallel {', '.join(map(str, unsplit))}: no split of the ops fits a "
                      "device's parameter budget (the strategy ILP's).")
    error.failures, error.shortfall_bytes = last.failures, getattr(last, "shortfall_bytes", None)
    return error


def _in_real_devices(plan: Plan, cluster: Cluster, tp: int, assignment: TPAssignment | None) -> Plan:
    """Restate a plan made over tp groups in the cluster's own devices."""
    stages = tuple(dataclasses.replace(s, device=s.device * tp) for s in plan.stages)
    used = plan.mesh.dp * plan.mesh.pp * tp
    return dataclasses.replace(
        plan, stages=stages, mesh=dataclasses.replace(plan.mesh, tp=tp), cluster=cluster.to_dict(),
        idle_devices=tuple(range(used, cluster.num_devices)),
        tensor_parallel=TensorParallelPlan.of(assignment),
    )
