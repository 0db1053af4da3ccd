"""Play the plan's pipeline schedule with its predicted durations.

`schedules.timeline` plays a schedule in unit slots; the picture of a step needs
real times. Here every rank runs its actions in schedule order and starts one
as soon as the rank is free and its inputs exist: F(s, i) after F(s-1, i),
B(s, i) after F(s, i) and B(s+1, i) (the dependencies `schedules.timeline`
checks). An action lasts its stage's compute time plus its share of the
stage's boundary communication (`comm_seconds` covers the sends and receives
of both passes, so forward and backward each carry half in training). With
equal stages the step this yields is (m + S - 1) times the stage time, the
planner's formula, which charges every slot at the slowest stage; with unequal
stages the played step is usually shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopart.errors import PlanError
from autopart.plan import Plan
from autopart.report.summary import is_training
from autopart.schedules import build_schedule


@dataclass(frozen=True, kw_only=True)
class TimedAction:
    """One forward or backward of one microbatch on one rank, placed in time (seconds)."""

    rank: int
    """Pipeline stage index (the rank that runs it)."""
    kind: str
    """'F' or 'B'."""
    microbatch: int
    start: float
    """When the rank starts computing it."""
    compute_end: float
    """When the compute ends and the boundary transfer begins."""
    end: float
    """When the transfer ends: the next action that needs it may start."""


def simulate(plan: Plan) -> list[TimedAction]:
    """Every action of one step of `plan`, with start and end times from the stage costs."""
    training = is_training(plan)
    m = plan.num_microbatches
    schedule = build_schedule(plan.schedule, plan.num_stages, m, training)
    durations = [_durations(plan, s, training) for s in range(plan.num_stages)]
    finished: dict[tuple[str, int, int], float] = {}
    free = [0.0] * plan.num_stages
    cursor = [0] * plan.num_stages
    placed: list[TimedAction] = []
    remaining = sum(len(rank) for rank in schedule)
    while remaining:
        progressed = False
        for s, rank in enumerate(schedule):
            while cursor[s] < len(rank):
                action = rank[cursor[s]]
                needs = _inputs(action.kind, s, action.microbatch, plan.num_stages)
                if any(key not in finished for key in needs):
                    break
                start = max([free[s], *(finished[key] for key in needs)])
                compute, comm = durations[s][action.kind]
                timed = TimedAction(rank=s, kind=action.kind, microbatch=action.microbatch, start=start,
                                    compute_end=start + compute, end=start + compute + comm)
                placed.append(timed)
                finished[(action.kind, s, action.microbatch)] = timed.end
                free[s] = timed.end
                cursor[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise PlanError(f"schedule {plan.schedule!r} deadlocks for {plan.num_stages} stages and "
                            f"{m} microbatches; the plan is inconsistent")
    return sorted(placed, key=lambda a: (a.rank, a.start))


def makespan(actions: list[TimedAction]) -> float:
    """End of the last action: the simulated step time."""
    return max((a.end for a in actions), default=0.0)


def busy_fraction(actions: list[TimedAction], rank: int) -> float:
    """Share of the step `rank` spends computing or transferring."""
    total = makespan(actions)
    busy = sum(a.end - a.start for a in actions if a.rank == rank)
    return busy / total if total > 0 else 0.0


def _durations(plan: Plan, s: int, training: bool) -> dict[str, tuple[float, float]]:
    stage = plan.stages[s]
    comm = stage.comm_seconds if plan.num_stages > 1 else 0.0
    share = comm / 2 if training else comm
    return {"F": (stage.fwd_seconds, share), "B": (stage.bwd_seconds, comm - share if training else 0.0)}


def _inputs(kind: str, s: int, i: int, num_stages: int) -> list[tuple[str, int, int]]:
    if kind == "F":
        return [("F", s - 1, i)] if s > 0 else []
    return [("F", s, i)] + ([("B", s + 1, i)] if s < num_stages - 1 else [])
