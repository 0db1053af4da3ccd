"""Pipeline schedules as data: per-rank action lists, a checker, a text grid.

An action is a forward (F) or backward (B) of one microbatch on one stage; its
short form is "F3" / "B3". `timeline` plays a schedule in lock-step (every
rank runs its next action once its inputs exist, one action per time slot)
and fails on a deadlock or a missing action, so a schedule is checked before
anything runs it (in the manner of torch/distributed/pipelining/schedules.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from autopart.errors import PlanError

Schedule = tuple[tuple["Action", ...], ...]
"""One tuple of actions per stage (rank of the pipeline), in execution order."""


@dataclass(frozen=True)
class Action:
    kind: str
    """'F' (forward) or 'B' (backward)."""
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def gpipe(num_stages: int, num_microbatches: int, training: bool = True) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019). Keeps m microbatches in flight."""
    ranks = []
    for s in range(num_stages):
        actions = [Action("F", s, i) for i in range(num_microbatches)]
        if training:
            actions += [Action("B", s, i) for i in range(num_microbatches)]
        ranks.append(tuple(actions))
    return tuple(ranks)


def one_f_one_b(num_stages: int, num_microbatches: int, training: bool = True) -> Schedule:
    """1F1B (Narayanan et al. 2021, PipeDream-Flush): stage s warms up with S - s - 1
    forwards, then alternates one forward and one backward; at most S - s in flight."""
    if not training:
        return gpipe(num_stages, num_microbatches, training=False)
    ranks = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        actions = [Action("F", s, i) for i in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions.append(Action("F", s, warmup + i))
            actions.append(Action("B", s, i))
        actions += [Action("B", s, i) for i in range(num_microbatches - warmup, num_microbatches)]
        ranks.append(tuple(actions))
    return tuple(ranks)


SCHEDULE_BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build_schedule(name: str, num_stages: int, num_microbatches: int, training: bool = True) -> Schedule:
    if name not in SCHEDULE_BUILDERS:
        raise PlanError(f"schedule {name!r} is not known; use one of {sorted(SCHEDULE_BUILDERS)}")
    return SCHEDULE_BUILDERS[name](num_stages, num_microbatches, training)


def timeline(schedule: Schedule, num_microbatches: int, training: bool = True) -> list[list[Action | None]]:
    """Play `schedule` in lock-step; slot t holds what each rank runs at time t.

    F(s, i) needs F(s-1, i) done in an earlier slot; B(s, i) needs F(s, i) and
    B(s+1, i) (the last stage's B needs only its own F). Raises PlanError on
    deadlock, duplicates, or when a rank misses an action.
    """
    num_stages = len(schedule)
    expected = {(k, s, i) for s in range(num_stages) for i in range(num_microbatches)
                for k in (("F", "B") if training else ("F",))}
    listed = [(a.kind, a.stage, a.microbatch) for rank in schedule for a in rank]
    if len(listed) != len(set(listed)) or set(listed) != expected:
        missing = sorted(expected - set(listed))[:3]
        raise PlanError(f"schedule lists the wrong actions (missing {missing}, {len(listed)} listed, "
                        f"{len(expected)} expected)")
    for s, rank in enumerate(schedule):
        if any(a.stage != s for a in rank):
            raise PlanError(f"rank {s} of the schedule holds actions of another stage")
    done: set[tuple[str, int, int]] = set()
    cursor = [0] * num_stages
    slots: list[list[Action | None]] = []
    while any(c < len(rank) for c, rank in zip(cursor, schedule)):
        slot: list[Action | None] = []
        for s, rank in enumerate(schedule):
            action = rank[cursor[s]] if cursor[s] < len(rank) else None
            slot.append(action if action is not None and _ready(action, done, num_stages) else None)
        if all(a is None for a in slot):
            waiting = [str(schedule[s][cursor[s]]) + f"@{s}" for s in range(num_stages) if cursor[s] < len(schedule[s])]
            raise PlanError(f"schedule deadlocks: ranks wait on {waiting}")
        for s, action in enumerate(slot):
            if action is not None:
                done.add((action.kind, action.stage, action.microbatch))
                cursor[s] += 1
        slots.append(slot)
    return slots


def _ready(action: Action, done: set[tuple[str, int, int]], num_stages: int) -> bool:
    s, i = action.stage, action.microbatch
    if action.kind == "F":
        return s == 0 or ("F", s - 1, i) in done
    return ("F", s, i) in done and (s == num_stages - 1 or ("B", s + 1, i) in done)


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Most microbatches whose activations each rank holds at once (forwarded, not yet backwarded)."""
    peaks = []
    for rank in schedule:
        live = peak = 0
        for action in rank:
            live += 1 if action.kind == "F" else -1
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def grid(slots: list[list[Action | None]]) -> str:
    """A text grid: one row per rank, one column per time slot ('.' idle)."""
    if not slots:
        return ""
    num_ranks = len(slots[0])
    width = max(len(str(a)) for slot in slots for a in slot if a is not None)
    lines = []
    for s in range(num_ranks):
        cells = [(str(slot[s]) if slot[s] is not None else ".").rjust(width) for slot in slots]
        lines.append(f"rank {s}: " + " ".join(cells))
    return "\n".join(lines)
