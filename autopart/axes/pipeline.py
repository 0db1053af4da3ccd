"""Pipeline parallelism: stages on pipeline ranks, microbatches and the schedule that plays them.

The axis's degree is `Mesh.pp` (pipeline ranks) and the layout's `num_ranks`,
`virtual_stages`, `num_microbatches` and `schedule`. Its price is the pipeline
problem itself (the solver's cut: stage times, boundary traffic, the schedule's
bubble, core/schedules.py), so it adds nothing to a step beyond the stages.
"""

from __future__ import annotations

from autopart.axes.base import Axis, GroupRanks, SearchShape, register
from autopart.core.errors import InputError, PlanError
from autopart.core.modes import SCHEDULES, VIRTUAL_SCHEDULES
from autopart.core.plan import Mesh, Plan
from autopart.core.request import PlanRequest
from autopart.core.schedules import microbatches_per_round
from autopart.cost_models import Cluster

MAX_VIRTUAL_STAGES = 4
"""Most stages per rank the search tries: each one more adds a boundary per microbatch."""

DEFAULT_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
"""What the planner searches when the user names no schedule; 1F1B first, as on a tie (one
stage) it keeps fewer microbatches in flight than GPipe. Zero bubble only when asked for:
PyTorch's split weight pass (stage_backward_weight) fails on some graphs, e.g. T5's
("Trying to backward through the graph a second time"), which no plan-time check catches."""


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


def schedule_choices(request: PlanRequest) -> list[str]:
    """The schedules to try: the one fixed, else all (forward-only plans: GPipe and 1F1B)."""
    v = request.virtual_stages
    if v is not None and v > 1 and request.pipeline_parallel == 1:
        raise InputError(
            f"virtual_stages={v} needs at least 2 pipeline ranks, but pipeline_parallel=1: PyTorch's interleaved "
            "schedules send between consecutive stages, which cannot share a rank; use pipeline_parallel >= 2 or "
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
        why = f"{schedule} needs at least 2 pipeline ranks (pipeline_parallel), not {num_ranks}"
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


def pipeline_choices(request: PlanRequest, cluster: Cluster, num_blocks: int, dp: int = 1) -> list[int]:
    """Pipeline ranks to try for `dp` replicas: the fixed count, else 1 to as many as devices and blocks allow."""
    n = cluster.num_devices // dp
    if request.pipeline_parallel is not None:
        s = request.pipeline_parallel
        if s < 1 or s > n:
            raise InputError(f"pipeline_parallel={s} must be between 1 and the {n} devices of each of {dp} "
                             f"replica(s) ({cluster.num_devices} devices)")
        if s > num_blocks:
            raise PlanError(
                f"pipeline_parallel={s} but the model splits into only {num_blocks} blocks even one op per "
                f"block; use pipeline_parallel <= {num_blocks}"
            )
        return [s]
    return list(range(1, min(n, num_blocks) + 1))


def _degrees(request: PlanRequest, cluster: Cluster, shape: SearchShape) -> list[int]:
    return pipeline_choices(request, cluster, shape.num_blocks, shape.degrees.get("dp", 1))


def _groups(mesh: Mesh) -> GroupRanks:
    """'pp': the stages of each (replica, tp index), even of one stage (PipelineStage would
    otherwise take the whole world as its group)."""
    return {"pp": [[mesh.rank_of(d, s, t) for s in range(mesh.pp)] for d in range(mesh.dp) for t in range(mesh.tp)]}


def _describe(plan: Plan) -> str:
    return f"pp={plan.mesh.pp}" + (f" ({plan.virtual_stages} stages each)" if plan.virtual_stages > 1 else "")


PIPELINE = register(Axis(name="pp", title="pipeline parallel", degrees=_degrees, groups=_groups, describe=_describe))
