"""Pipeline schedules as data: per-rank action lists, a player, a text grid.

A model is cut into S stages placed on R pipeline ranks, stage s on rank
s % R ("loop" placement, Narayanan et al. 2021); S = R·v with v virtual
stages per rank, v = 1 for GPipe and 1F1B. An action is one microbatch through
one stage: F (forward), B (full backward), or, for zero-bubble schedules, the
backward split into I (gradient of the stage's inputs, which the previous
stage waits for) and W (gradient of its weights, which nobody waits for;
Qi et al. 2024). Its short form is "F3" / "B3".

`play` runs a schedule with given durations: every rank runs its actions in
order, each as soon as the rank is free and its inputs exist. It fails on a
deadlock or a missing action, so a schedule is checked before anything runs
it. The orders of the interleaved and zero-bubble schedules are those of
torch.distributed.pipelining's ScheduleInterleaved1F1B and
ScheduleInterleavedZeroBubble (tests/test_schedules.py compares them), so the
in-flight counts and bubbles the planner charges are those the runtime sees.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from autopart.core.errors import PlanError
from autopart.core.modes import SCHEDULES, VIRTUAL_SCHEDULES

Schedule = tuple[tuple["Action", ...], ...]
"""One tuple of actions per pipeline rank, in execution order."""



@dataclass(frozen=True)
class Action:
    kind: str
    """'F' (forward), 'B' (full backward), 'I' (input gradient), 'W' (weight gradient)."""
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


# ----------------------------------------------------------------------------- builders

def gpipe(num_ranks: int, num_microbatches: int, training: bool = True) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019). Keeps m microbatches in flight."""
    ranks = []
    for s in range(num_ranks):
        actions = [Action("F", s, i) for i in range(num_microbatches)]
        if training:
            actions += [Action("B", s, i) for i in range(num_microbatches)]
        ranks.append(tuple(actions))
    return tuple(ranks)


def one_f_one_b(num_ranks: int, num_microbatches: int, training: bool = True) -> Schedule:
    """1F1B (Narayanan et al. 2021, PipeDream-Flush): stage s warms up with S - s - 1
    forwards, then alternates one forward and one backward; at most S - s in flight."""
    if not training:
        return gpipe(num_ranks, num_microbatches, training=False)
    ranks = []
    for s in range(num_ranks):
        warmup = min(num_ranks - s - 1, num_microbatches)
        actions = [Action("F", s, i) for i in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions.append(Action("F", s, warmup + i))
            actions.append(Action("B", s, i))
        actions += [Action("B", s, i) for i in range(num_microbatches - warmup, num_microbatches)]
        ranks.append(tuple(actions))
    return tuple(ranks)


def microbatches_per_round(num_ranks: int, num_microbatches: int) -> int:
    """Interleaved schedules walk the microbatches in rounds of about R (PyTorch's "flexible"
    interleaving); m must split into max(1, m // R) equal rounds."""
    rounds = max(1, num_microbatches // num_ranks)
    if num_microbatches % rounds:
        raise PlanError(
            f"interleaved schedules on {num_ranks} pipeline ranks need the microbatch count to be a "
            f"multiple of {rounds} (rounds of about {num_ranks}), got {num_microbatches}; use "
            f"{rounds * (num_microbatches // rounds)} or a multiple of {num_ranks}"
        )
    return num_microbatches // rounds


def interleaved(num_ranks: int, num_microbatches: int, virtual_stages: int, training: bool = True,
                zero_bubble: bool = False) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021) or, with zero_bubble, ZB1P (Qi et al. 2024).

    Rank r holds stages r, r + R, ..., r + (v-1)·R. It visits its stages in
    rounds of `microbatches_per_round` microbatches each: forwards go through
    its stages in increasing order, backwards in decreasing order. Warm-up:
    (v - 1)·rounds forwards plus 2 per hop to the last rank (1 for zero
    bubble), then one forward and one backward alternate, then the remaining
    backwards drain. Zero bubble replaces B by I and schedules each W
    once rank r has done r input gradients in the steady phase (the last
    ones at the end), filling the bubble 1F1B leaves with weight work.
    """
    m, v = num_microbatches, virtual_stages
    if not training:  # forward only: every stage's microbatches in turn
        return tuple(tuple(Action("F", j * num_ranks + r, i) for j in range(v) for i in range(m))
                     for r in range(num_ranks))
    per_round = microbatches_per_round(num_ranks, m)
    total = v * m  # forwards (and backwards) per rank
    grad_kind = "I" if zero_bubble else "B"
    ranks = []
    for r in range(num_ranks):
        warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (num_ranks - 1 - r), total)
        next_forward = [0] * v
        next_backward = [0] * v
        backward_stages: list[int] = []
        weights_done = 0
        actions: list[Action] = []

        def emit(kind: str, local: int, counters: list[int]) -> None:
            actions.append(Action(kind, local * num_ranks + r, counters[local]))
            counters[local] += 1

        next_weight = [0] * v
        for op in range(total + warmup):
            if op < total:
                emit("F", (op // per_round) % v, next_forward)
            if op >= warmup:
                local = v - 1 - ((op - warmup) // per_round) % v
                emit(grad_kind, local, next_backward)
                backward_stages.append(local)
                if zero_bubble and op - warmup >= r:
                    emit("W", backward_stages[weights_done], next_weight)
                    weights_done += 1
        while zero_bubble and weights_done < len(backward_stages):
            emit("W", backward_stages[weights_done], next_weight)
            weights_done += 1
        ranks.append(tuple(actions))
    return tuple(ranks)


def build_schedule(name: str, num_ranks: int, num_microbatches: int, training: bool = True,
                   virtual_stages: int = 1) -> Schedule:
    """The action lists of schedule `name` for `num_ranks` pipeline ranks of `virtual_stages` stages each."""
    if name not in SCHEDULES:
        raise PlanError(f"schedule {name!r} is not known; use one of {list(SCHEDULES)}")
    if virtual_stages != 1 and name not in VIRTUAL_SCHEDULES:
        raise PlanError(f"schedule {name!r} runs one stage per rank but virtual_stages={virtual_stages}; "
                        f"use one of {list(VIRTUAL_SCHEDULES)} or virtual_stages=1")
    if name == "gpipe":
        return gpipe(num_ranks, num_microbatches, training)
    if name == "1f1b":
        return one_f_one_b(num_ranks, num_microbatches, training)
    return interleaved(num_ranks, num_microbatches, virtual_stages, training, zero_bubble=name == "zero_bubble")


# ----------------------------------------------------------------------------- playing

def _done_key(action: Action) -> tuple[str, int, int]:
    """What finishing `action` makes available: B and I both deliver the input gradient ("G")."""
    return ("G" if action.kind in "BI" else action.kind, action.stage, action.microbatch)


def dependencies(action: Action, num_stages: int) -> list[tuple[str, int, int]]:
    """Keys (as `_done_key` makes them) that must exist before `action` starts.

    F(s, i) needs F(s-1, i); B or I (s, i) need F(s, i) and the input gradient
    of stage s+1 (the last stage's backward needs only its own F); W(s, i)
    needs I(s, i).
    """
    s, i = action.stage, action.microbatch
    if action.kind == "F":
        return [("F", s - 1, i)] if s > 0 else []
    if action.kind == "W":
        return [("G", s, i)]
    return [("F", s, i)] + ([("G", s + 1, i)] if s < num_stages - 1 else [])


def check(schedule: Schedule, num_microbatches: int, training: bool = True) -> int:
    """Raise PlanError unless `schedule` lists each action once on the rank that holds its stage.

    Returns the number of stages.
    """
    num_ranks = len(schedule)
    listed = [(a.kind, a.stage, a.microbatch) for rank in schedule for a in rank]
    num_stages = max((a.stage for rank in schedule for a in rank), default=num_ranks - 1) + 1
    split = any(a.kind == "I" for rank in schedule for a in rank)
    kinds = ("F", "I", "W") if split else ("F", "B") if training else ("F",)
    expected = {(k, s, i) for s in range(num_stages) for i in range(num_microbatches) for k in kinds}
    if len(listed) != len(set(listed)) or set(listed) != expected or num_stages % num_ranks:
        missing = sorted(expected - set(listed))[:3]
        raise PlanError(f"schedule lists the wrong actions (missing {missing}, {len(listed)} listed, "
                        f"{len(expected)} expected)")
    for r, rank in enumerate(schedule):
        if any(a.stage % num_ranks != r for a in rank):
            raise PlanError(f"rank {r} of the schedule holds actions of a stage placed on another rank")
    return num_stages


def play(schedule: Schedule, duration: Callable[[Action], float]) -> dict[Action, tuple[float, float]]:
    """(start, end) of every action when each rank runs its list in order, starting an action
    once the rank is free and its `dependencies` have ended. Raises PlanError on deadlock."""
    num_stages = max((a.stage for rank in schedule for a in rank), default=0) + 1
    finished: dict[tuple[str, int, int], float] = {}
    free = [0.0] * len(schedule)
    cursor = [0] * len(schedule)
    placed: dict[Action, tuple[float, float]] = {}
    remaining = sum(len(rank) for rank in schedule)
    while remaining:
        progressed = False
        for r, rank in enumerate(schedule):
            while cursor[r] < len(rank):
                action = rank[cursor[r]]
                needs = dependencies(action, num_stages)
                if any(key not in finished for key in needs):
                    break
                start = max([free[r], *(finished[key] for key in needs)])
                end = start + duration(action)
                placed[action] = (start, end)
                finished[_done_key(action)] = end
                free[r] = end
                cursor[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            waiting = [f"{schedule[r][cursor[r]]}@stage{schedule[r][cursor[r]].stage}"
                       for r in range(len(schedule)) if cursor[r] < len(schedule[r])]
            raise PlanError(f"schedule deadlocks: ranks wait on {waiting}")
    return placed


def timeline(schedule: Schedule, num_microbatches: int, training: bool = True) -> list[list[Action | None]]:
    """Play `schedule` in lock-step (every action one time slot); slot t holds what each rank runs."""
    check(schedule, num_microbatches, training)
    times = play(schedule, lambda action: 1.0)
    length = int(max((end for _, end in times.values()), default=0))
    slots: list[list[Action | None]] = [[None] * len(schedule) for _ in range(length)]
    for r, rank in enumerate(schedule):
        for action in rank:
            slots[int(times[action][0])][r] = action
    return slots


# Relative costs of the passes of one stage for the factors below: backward = 2 × forward (two
# matmuls per forward one). Split, the weight gradient costs a forward, as Qi et al. 2024 take it,
# but the input gradient more than one: it walks the whole graph and keeps what W needs.
# Measured with benchmarks/zero_bubble_split.py on an H100 (float32, 4 GPT blocks, batch 4 × 1024,
# the split as torch.distributed.pipelining runs it): F : B : I : W = 1 : 2.08 : 1.31 : 1.04 at
# d_model 1024 and 1 : 2.06 : 1.17 : 1.00 at 2048; I = 1.25 sits between.
_UNIT_COSTS = {"F": 1.0, "B": 2.0, "I": 1.25, "W": 1.0}


@lru_cache(maxsize=4096)
def step_factor(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1,
                training: bool = True) -> float:
    """A step's length in slots of the slowest stage (one microbatch's F + B through it).

    The schedule is played with every stage equal (`_UNIT_COSTS`); GPipe and
    1F1B give m + R - 1 (Huang et al. 2019), interleaved 1F1B m·v + R - 1
    (bubble (R-1)/(m·v), Narayanan et al. 2021), and zero bubble less when
    m ≥ R, as its weight gradients fill the 1F1B bubble (Qi et al. 2024),
    though its split backward costs more than B.

    Closed forms where playing gives exactly them (tests/test_schedules.py checks them against
    the played schedules): GPipe and 1F1B always; interleaved 1F1B m·v + R − 1 once m ≥ R and
    v·R − 1 + m below (fewer microbatches than ranks: each rank waits for a whole round of
    v·R stage slots before its first backward). The planner asks for thousands of these at R
    and m in the hundreds, which would each play 10^5 actions.
    """
    if name in ("gpipe", "1f1b") and virtual_stages == 1:
        return float(num_microbatches + num_ranks - 1)
    if name == "interleaved_1f1b" and training:
        microbatches_per_round(num_ranks, num_microbatches)  # the same error as building it
        m, v, r = num_microbatches, virtual_stages, num_ranks
        return float(m * v + r - 1 if m >= r else v * r - 1 + m)
    schedule = build_schedule(name, num_ranks, num_microbatches, training, virtual_stages)
    slot = _UNIT_COSTS["F"] + (_UNIT_COSTS["B"] if training else 0.0)
    ends = play(schedule, lambda action: _UNIT_COSTS[action.kind]).values()
    return max(end for _, end in ends) / slot


def bubble_fraction(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1,
                    training: bool = True) -> float:
    """Share of a step a rank idles with equal stages: 1 - (its m·v actions' work) / the step."""
    factor = step_factor(name, num_ranks, num_microbatches, virtual_stages, training)
    slot = _UNIT_COSTS["F"] + (_UNIT_COSTS["B"] if training else 0.0)
    work = _UNIT_COSTS["F"] + (_UNIT_COSTS["I"] + _UNIT_COSTS["W"] if name == "zero_bubble" and training
                               else _UNIT_COSTS["B"] if training else 0.0)
    return 1.0 - num_microbatches * virtual_stages * work / (factor * slot)


def interleaved_in_flight(num_ranks: int, num_microbatches: int, virtual_stages: int) -> dict[int, int]:
    """`peak_in_flight` of training's interleaved 1F1B in closed form (the planner asks for R and m in
    the hundreds): local stage j of rank r holds the most microbatches just before its first
    backward, which `interleaved` runs at op b = warm-up + (v − 1 − j)·per_round; by then it has
    run the forwards of ops ≤ b that fall in its chunks of per_round ops out of every v·per_round
    (tests/test_schedules.py compares it with the action lists)."""
    m, v, ranks = num_microbatches, virtual_stages, num_ranks
    per_round = microbatches_per_round(ranks, m)
    total = v * m
    r = np.arange(ranks)[None, :]
    j = np.arange(v)[:, None]
    warmup = np.minimum((v - 1) * per_round + 2 * (ranks - 1 - r), total)
    ops = np.minimum(warmup + (v - 1 - j) * per_round, total - 1) + 1  # ops 0 .. b
    full, rest = np.divmod(ops, v * per_round)
    counts = full * per_round + np.clip(rest - j * per_round, 0, per_round)  # [v, R]: stage j·R + r
    return {int(stage): int(count) for stage, count in enumerate(counts.reshape(-1))}


def peak_in_flight(schedule: Schedule) -> dict[int, int]:
    """Per stage, the most microbatches whose activations it holds at once: counted from
    its F until its B (or W, which still needs them)."""
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    for rank in schedule:
        for action in rank:
            if action.kind == "I":
                continue
            live[action.stage] = live.get(action.stage, 0) + (1 if action.kind == "F" else -1)
            peak[action.stage] = max(peak.get(action.stage, 0), live[action.stage])
    return dict(sorted(peak.items()))


def grid(slots: list[list[Action | None]], show_stage: bool = False) -> str:
    """A text grid: one row per rank, one column per time slot ('.' idle); with show_stage,
    cells read "F3s5" (microbatch 3 on stage 5)."""
    if not slots:
        return ""
    num_ranks = len(slots[0])
    label = (lambda a: f"{a}s{a.stage}") if show_stage else str
    width = max(len(label(a)) for slot in slots for a in slot if a is not None)
    lines = []
    for r in range(num_ranks):
        cells = [(label(slot[r]) if slot[r] is not None else ".").rjust(width) for slot in slots]
        lines.append(f"rank {r}: " + " ".join(cells))
    return "\n".join(lines)


@functools.cache
def schedule_keeps_outputs() -> bool:
    """Whether a training step's schedule keeps every microbatch's model output on the last stage
    until the step ends: only where this torch's schedules lack `step(return_outputs=False)`. With
    it, the loss is computed per microbatch on the last stage and each output is freed by that
    microbatch's backward (the runner returns the loss, never the outputs)."""
    from torch.distributed.pipelining import Schedule1F1B

    return "return_outputs" not in inspect.signature(Schedule1F1B.step).parameters
