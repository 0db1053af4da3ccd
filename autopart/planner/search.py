"""Best-first branch and bound over parallel layouts.

A layout is one point of the search space (`Layout`): the tensor-parallel size,
data-parallel replicas and their mode (DDP, ZeRO-2, ZeRO-3, HSDP), pipeline
ranks, virtual stages per rank, microbatches and schedule. Each
tensor-parallel size comes with its own block costs (`TPOption`, from
planner/mesh_search.py). A layout's step is the pipeline step of its best
split (the chain DP or the ILP, `autopart.solver.solve_pipeline`), with
activation recomputation chosen per block where memory demands it, plus the
exposed data-parallel synchronisation and the optimizer step
(`pricing.price_candidate`).

The space is a tree: mesh shapes (tp, dp, pp) at the top, the layouts of a
shape below. Every node has a lower bound on the step of any layout under it
(`autopart.planner.bounds`); the search keeps a heap of nodes ordered by bound,
expands or solves the lowest, and stops once the lowest bound cannot beat the
best step found. Layouts and shapes left in the heap are pruned: no layout
among them can be faster. Ties go to the layout the nested loops of the old
planner would have reached first (most replicas, fewest ranks, fewest
microbatches, 1F1B before GPipe before interleaved, DDP before ZeRO-2 before
ZeRO-3 before HSDP), so the plan does not depend on the order the heap visits
them in.

Adding an axis: its module in autopart/axes/ offers its degrees (`_mesh_shapes`
asks every registered axis in turn) and its price (`Axis.step_seconds`, added by
`pricing.price_candidate`); a field on `Layout` (core/setting.py) carries its
choice, and, for a tight bound, `planner/bounds.py` learns its terms. Recomputation
is priced inside each layout (`pricing.price_candidate`), and the bounds take the
least memory and the least time any recompute policy allowed could give.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from dataclasses import dataclass
from typing import Callable

from autopart.axes import AXES, SearchShape
from autopart.cost_models import Cluster
from autopart.core.errors import InputError, PlanError
from autopart.core.blocks import BlockGraph
from autopart.core.plan import Candidate, Plan
from autopart.planner.assembly import assemble_plan
from autopart.axes.data import data_parallel_mode_choices
from autopart.axes.pipeline import microbatch_choices, schedule_choices, virtual_stage_choices
from autopart.core.request import PlanRequest
from autopart.planner.infeasible import Failure, infeasible_error
from autopart.planner.pricing import PricingBasis, price_candidate
from autopart.core.problems import PipelineProblem, PipelineSolution
from autopart.planner.bounds import BoundModel
from autopart.core.setting import Layout, Setting

MAX_LISTED_PRUNED = 200
"""Pruned layouts `Plan.candidates` lists (those whose bound came closest); all are counted."""

EAGER_SHAPES = 64
"""Up to this many mesh shapes every layout is bounded and listed (small searches read like the
full table); beyond it a shape whose bound cannot win is pruned whole, its layouts never listed."""

_TOLERANCE = 1e-9
"""Relative: steps this close count as equal, and the earlier layout in loop order wins."""


@dataclass(frozen=True, kw_only=True)
class TPOption:
    """One tensor-parallel size and the blocks as a tp group runs them."""

    tp: int
    graph: BlockGraph
    """Block costs per device of the tp group (passes/tensor_parallel/block_costs.py), or the plain blocks at tp = 1."""
    cluster: Cluster
    """One device per tp group (`mesh_search.group_cluster`)."""


@dataclass(frozen=True)
class _Shape:
    """A mesh shape (tp, dp, pp ranks): the layouts under it are expanded when it is popped."""

    option: int
    data_parallel: int
    num_ranks: int
    expert_parallel: int = 1
    context_parallel: int = 1


@dataclass
class _Best:
    step: float
    order: tuple
    layout: Layout
    problem: PipelineProblem
    solution: PipelineSolution
    setting: Setting
    label: dict


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """The fastest layout's plan (over tp groups, `option`'s cluster) and the search's record."""

    plan: Plan
    option: TPOption


def search(options: list[TPOption], request: PlanRequest, model_class: str, *, traced_batch_size: int,
           progress: Callable[[str], None] | None = None, beat: float = math.inf) -> SearchResult | None:
    """The fastest feasible layout over `options` (one per tp size, blocks costed at
    `traced_batch_size` samples); PlanError if none fits (with `.failures`, the layouts tried).

    `progress` receives a line at most about once a second while the search runs, and one
    when it ends if it ran a second or more, or `request.verbose` (None: silent). `beat`: only a
    step faster than this counts (another search's best): None when no layout is.
    """
    started = time.perf_counter()
    run = _Run(options, request, traced_batch_size, progress, started)
    run.beat = beat
    run.seed()
    run.loop()
    if run.best is None and math.isfinite(beat):
        return None
    return run.result(model_class, time.perf_counter() - started)


class _Run:
    """State of one search: the heap, the best layout so far, what was tried."""

    def __init__(self, options: list[TPOption], request: PlanRequest, traced_batch_size: int, progress,
                 started: float) -> None:
        self.options, self.request, self.progress, self.started = options, request, progress, started
        self.traced_batch_size = traced_batch_size
        self.bounds = [BoundModel(o.graph, o.cluster, request, traced_batch_size) for o in options]
        self.largest_memory = [max(d.memory_bytes for d in o.cluster.devices) for o in options]
        self.schedules = schedule_choices(request)
        self.heap: list[tuple[float, tuple, int, object]] = []
        self.counter = 0
        self.best: _Best | None = None
        self.solved: list[Candidate] = []
        self.unsolved: list[tuple[float, tuple, Candidate]] = []  # ruled out by a bound, listed up to a cap
        self.num_pruned = 0
        self.shapes_pruned = 0
        self.num_problems = 0
        self.closest: tuple[float, tuple, Layout] | None = None  # (shortfall, order, layout) nearest to fitting
        self.failures: list[Failure] = []  # every layout that did not fit, for the error's levers
        self.skipped: list[str] = []
        self.num_layouts = 0  # layouts met so far (expanded, or standing for an infeasible shape)
        self.errors: list[PlanError] = []
        self.last_report = started
        self.beat = math.inf
        """Only a step below this wins (`search`'s `beat`)."""

    # ------------------------------------------------------------------ the heap

    def push(self, bound: float, order: tuple, item: object) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (bound, order, self.counter, item))

    def seed(self) -> None:
        """Every mesh shape with its bound; small searches go straight to their layouts."""
        shapes: list[tuple[float, tuple, _Shape]] = []
        for index, option in enumerate(self.options):
            try:
                for order, degrees in _mesh_shapes(self.request, option):
                    shape = _Shape(index, degrees["dp"], degrees["pp"], degrees.get("ep", 1), degrees.get("cp", 1))
                    shapes.append((self.bounds[index].shape_bound(shape.data_parallel, shape.num_ranks,
                                                                  self.schedules, shape.expert_parallel,
                                                                  shape.context_parallel),
                                   (index, *order), shape))
            except PlanError as error:
                self.errors.append(error)
        eager = len(shapes) <= EAGER_SHAPES
        for bound, order, shape in shapes:
            if eager:
                self.expand(shape, order)
            elif bound == float("inf"):  # no layout of it holds the model: remember how close it came
                self.shapes_pruned += 1
                first = next(_layouts_of_shape(self.options[shape.option], shape, self.request, self.schedules,
                                               []), None)
                if first is not None:
                    self.num_layouts += 1
                    short = max(self.bounds[shape.option].layout_bound(first[1])[1], 1.0)
                    self.note_failure(short, order, first[1], self._bound_failure(
                        short, first[1], shape.option, "no layout of this mesh shape holds the model"))
            else:
                self.push(bound, order, shape)

    def expand(self, shape: _Shape, order: tuple) -> None:
        """Push every layout of `shape` with its own bound; record those the memory bound rules out."""
        model = self.bounds[shape.option]
        for position, layout in _layouts_of_shape(self.options[shape.option], shape, self.request,
                                                  self.schedules, self.skipped):
            key = order + position
            self.num_layouts += 1
            bound, short = model.layout_bound(layout)
            if short > 0:
                stages = layout.num_ranks * layout.virtual_stages
                detail = (f"memory: the repeated layers, state and gradients alone are {short / 2**30:.3g} GiB short "
                          f"of fitting the {stages} stage{'s' * (stages > 1)}")
                self.note_failure(short, key, layout, self._bound_failure(short, layout, shape.option, detail))
                self.rule_out(short, key, layout.candidate(step_seconds=None, status="infeasible", detail=detail,
                                                           recompute=model.least_memory_policy))
                continue
            self.push(bound, key, layout)

    def note_failure(self, shortfall: float, order: tuple, layout: Layout, failure: Failure) -> None:
        """Keep every layout that did not fit, and the one nearest to fitting."""
        self.failures.append(failure)
        key = (shortfall, order)
        if self.closest is None or key < (self.closest[0], self.closest[1]):
            self.closest = (shortfall, order, layout)

    def _bound_failure(self, short: float, layout: Layout, option: int, detail: str) -> Failure:
        """A layout the memory bound ruled out, as the error reports it."""
        capacity = self.largest_memory[option] / layout.virtual_stages
        policy = self.bounds[option].least_memory_policy
        return Failure(shortfall_bytes=float(short), capacity_bytes=float(capacity),
                       tried=dict(layout.tried(), recompute=policy), setting=layout.setting, message=detail)

    def rule_out(self, sort_key: float, order: tuple, candidate: Candidate) -> None:
        """A layout decided without a solve: counted, and listed while the list is short."""
        self.num_pruned += 1
        if len(self.unsolved) < MAX_LISTED_PRUNED:
            self.unsolved.append((sort_key, order, candidate))

    def loop(self) -> None:
        while self.heap:
            bound, order, _, item = heapq.heappop(self.heap)
            if not self.may_win(bound, order):
                self.prune(bound, order, item)
                continue
            if isinstance(item, _Shape):
                self.expand(item, order)
            else:
                self.evaluate(item, order, bound)
            self.report()
        if self.progress is not None and (self.request.verbose or time.perf_counter() - self.started >= 1.0):
            self.progress(self.summary())  # quick searches end silently unless asked (verbose)

    def may_win(self, bound: float, order: tuple) -> bool:
        if self.best is None:
            return bound < self.beat * (1 - _TOLERANCE)
        limit = self.best.step
        return bound < limit * (1 - _TOLERANCE) or (bound <= limit * (1 + _TOLERANCE) and order < self.best.order)

    def prune(self, bound: float, order: tuple, item: object) -> None:
        best = self.best.step if self.best is not None else float("nan")
        if isinstance(item, _Shape):
            self.shapes_pruned += 1
            return
        self.rule_out(bound, order, item.candidate(step_seconds=None, status="pruned",
                                                   detail=f"lower bound {bound:.3g} s >= best {best:.3g} s"))

    # ------------------------------------------------------------------ one layout

    def evaluate(self, layout: Layout, order: tuple, popped: float) -> None:
        index = self._option_of(layout)
        option = self.options[index]

        def may_win(bound: float) -> bool:  # the problem's own bound may be tighter than the estimate
            return self.may_win(max(popped, bound), order)

        basis = PricingBasis(graph=option.graph, cluster=option.cluster, request=self.request,
                             traced_batch_size=self.traced_batch_size)
        priced = price_candidate(basis, layout, may_win)
        self.num_problems += priced.num_problems
        for failure in priced.failures:
            self.note_failure(failure.shortfall_bytes, order, layout, failure)
        for candidate in priced.candidates:
            if candidate.status == "pruned":
                self.rule_out(popped, order, candidate)
            else:
                self.solved.append(candidate)
        step = priced.step
        if step is None:
            return
        if self.may_win(step, order):  # faster, or as fast and earlier in loop order
            self.best = _Best(step, order, layout, priced.problem, priced.solution, priced.setting, priced.label)
            if self.progress is not None and self.request.verbose:
                self.progress(f"best so far {step:.4g} s: {layout.describe()}, recompute {priced.setting.recompute_label}")

    def _option_of(self, layout: Layout) -> int:
        return next(i for i, o in enumerate(self.options) if o.tp == layout.tensor_parallel)

    # ------------------------------------------------------------------ reporting

    def report(self) -> None:
        now = time.perf_counter()
        if self.progress is None or now - self.last_report < 1.0:
            return
        self.last_report = now
        self.progress(self.summary())

    def summary(self) -> str:
        best = (f"best {self.best.step:.4g} s ({self.best.layout.describe()})" if self.best is not None
                else "no feasible layout yet")
        return (f"search {time.perf_counter() - self.started:.1f} s: {self.num_problems} layouts solved, "
                f"{self.num_pruned} ruled out by a bound, {self.shapes_pruned} mesh shapes ruled out whole, "
                f"{len(self.heap)} left; {best}")

    def result(self, model_class: str, seconds: float) -> SearchResult:
        if self.best is None:
            if not self.num_layouts and self.skipped:
                raise InputError(f"no plan satisfies the choices fixed: {self.skipped[0]}")
            if self.closest is None and self.errors:
                raise self.errors[0]
            raise self._infeasible()
        best = self.best
        chosen = Candidate(**best.label, step_seconds=best.step, status="chosen",
                           detail=next(c.detail for c in self.solved if c.status == "feasible"
                                       and _same_layout(c, best.label)))
        listed = [chosen if c.status == "feasible" and _same_layout(c, best.label) else c for c in self.solved]
        listed += [c for _, _, c in sorted(self.unsolved, key=lambda p: (p[0], p[1]))]
        option = self.options[self._option_of(best.layout)]
        plan = assemble_plan(option.graph, option.cluster, self.request, self.traced_batch_size, model_class,
                             best.problem, best.solution, list(_in_loop_order(listed)), seconds, self.num_problems,
                             best.setting, best.step)
        plan = dataclasses.replace(plan, solver=dataclasses.replace(
            plan.solver, num_pruned=self.num_pruned, num_shapes_pruned=self.shapes_pruned))
        return SearchResult(plan=plan, option=option)

    def _infeasible(self) -> PlanError:
        """No layout fits: the closest attempt, the levers tried and what each would need."""
        if self.closest is None:
            return PlanError("no layout of the search space could be tried; fix fewer of the choices")
        _, _, layout = self.closest
        option = self.options[self._option_of(layout)]
        return infeasible_error(option.graph, option.cluster, self.request, self.failures, self.traced_batch_size,
                                tensor_parallel=tuple(o.tp for o in self.options))


def _mesh_shapes(request: PlanRequest, option: TPOption):
    """(position in loop order, degree by axis name) of every mesh shape of a tp size: each axis
    after tp offers its degrees given those chosen before it (autopart/axes/), in its tie order."""
    experts = math.gcd(*(b.num_experts for b in option.graph.blocks))
    sequence = max((b.attention_sequence for b in option.graph.blocks), default=0)
    shapes = [((), SearchShape(degrees={"tp": option.tp}, num_blocks=len(option.graph.blocks), num_experts=experts,
                               sequence_length=sequence))]
    for axis in AXES.values():
        if axis.name == "tp":  # chosen per option: its op splits are solved before the search
            continue
        shapes = [((*order, i), shape.with_degree(axis.name, degree)) for order, shape in shapes
                  for i, degree in enumerate(axis.degrees(request, option.cluster, shape))]
    return [(order, shape.degrees) for order, shape in shapes]


def _layouts_of_shape(option: TPOption, shape: _Shape, request: PlanRequest, schedules: list[str],
                      skipped: list[str]):
    """(position in loop order, layout) of every layout of a mesh shape: microbatches, schedule,
    virtual stages, dp mode — the old planner's nested loops, innermost last."""
    dp, ranks = shape.data_parallel, shape.num_ranks
    num_blocks = len(option.graph.blocks)
    modes = data_parallel_mode_choices(request, dp, option.cluster, ranks)
    for i, m in enumerate(microbatch_choices(request, dp // shape.context_parallel)):
        for j, schedule in enumerate(schedules):
            if schedule == "gpipe" and ranks == 1 and "1f1b" in schedules:
                continue  # one stage: GPipe is 1F1B with more in flight
            for v in virtual_stage_choices(request, schedule, ranks, m, num_blocks, skipped):
                for k, (mode, shard) in enumerate(modes):
                    yield (i, j, v, k), Layout(tensor_parallel=option.tp, data_parallel=dp, num_ranks=ranks,
                                               num_microbatches=m, schedule=schedule, virtual_stages=v,
                                               data_parallel_mode=mode, dp_shard=shard,
                                               expert_parallel=shape.expert_parallel,
                                               context_parallel=shape.context_parallel)


def _same_layout(a: Candidate, label: dict) -> bool:
    return all(getattr(a, k) == v for k, v in label.items())


def _in_loop_order(candidates: list[Candidate]) -> tuple[Candidate, ...]:
    """Candidates as the nested loops meet them: tp, most replicas first, ranks, microbatches."""
    return tuple(sorted(candidates, key=lambda c: (c.tensor_parallel, -c.data_parallel, c.pipeline_parallel,
                                                   c.num_microbatches)))
