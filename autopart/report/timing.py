"""Play the plan's pipeline schedule with its predicted durations.

`schedules.timeline` plays a schedule in unit slots; the picture of a step needs
real times. `schedules.play` runs every rank's actions in schedule order, each
as soon as the rank is free and its inputs exist. An action lasts its stage's
compute time plus its share of the stage's boundary communication
(`comm_seconds` covers the sends and receives of both passes, so forward and
backward each carry half in training); zero-bubble schedules split a backward
into equal input-gradient (I, carrying the transfer) and weight-gradient (W)
halves. With equal stages the step this yields is the planner's step factor
times the stage time; with unequal stages the played step is usually shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopart.core.plan import Plan
from autopart.report.summary import is_training
from autopart.core.schedules import build_schedule, play


@dataclass(frozen=True, kw_only=True)
class TimedAction:
    """One forward or backward of one microbatch on one rank, placed in time (seconds)."""

    rank: int
    """Pipeline rank that runs it."""
    stage: int
    """Stage (rank + k·pp with virtual stages)."""
    kind: str
    """'F', 'B', 'I' or 'W'."""
    microbatch: int
    start: float
    """When the rank starts computing it."""
    compute_end: float
    """When the compute ends and the boundary transfer begins."""
    end: float
    """When the transfer ends: the next action that needs it may start."""


def predicted_timeline(plan: Plan) -> list[TimedAction]:
    """Every action of one step of `plan`, with start and end times from the stage costs."""
    training = is_training(plan)
    schedule = build_schedule(plan.schedule, plan.mesh.pp, plan.num_microbatches, training, plan.virtual_stages)
    durations = [_durations(plan, s, training) for s in range(plan.num_stages)]
    times = play(schedule, lambda a: sum(durations[a.stage][a.kind]))
    placed = [TimedAction(rank=a.stage % plan.mesh.pp, stage=a.stage, kind=a.kind, microbatch=a.microbatch,
                          start=start, compute_end=start + durations[a.stage][a.kind][0], end=end)
              for a, (start, end) in times.items()]
    return sorted(placed, key=lambda a: (a.rank, a.start))


def makespan(actions: list[TimedAction]) -> float:
    """End of the last action: the played step time."""
    return max((a.end for a in actions), default=0.0)


def busy_fraction(actions: list[TimedAction], rank: int) -> float:
    """Share of the step `rank` spends computing or transferring."""
    total = makespan(actions)
    busy = sum(a.end - a.start for a in actions if a.rank == rank)
    return busy / total if total > 0 else 0.0


def _durations(plan: Plan, s: int, training: bool) -> dict[str, tuple[float, float]]:
    """(compute, transfer) seconds of each kind of action on stage s."""
    stage = plan.stages[s]
    comm = stage.comm_seconds if plan.num_stages > 1 else 0.0
    share = comm / 2 if training else comm
    backward = comm - share if training else 0.0
    return {"F": (stage.fwd_seconds, share), "B": (stage.bwd_seconds, backward),
            "I": (stage.bwd_seconds / 2, backward), "W": (stage.bwd_seconds / 2, 0.0)}
