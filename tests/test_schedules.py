"""Pipeline schedules: the orders PyTorch runs, no deadlocks, and the bubbles and in-flight
counts the planner charges."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autopart.core.errors import PlanError
from autopart.core.schedules import (
    Action,
    build_schedule,
    bubble_fraction,
    dependencies,
    interleaved_in_flight,
    peak_in_flight,
    play,
    step_factor,
    timeline,
)
from autopart.core.modes import SCHEDULES


def _valid(num_ranks: int, m: int, v: int) -> bool:
    rounds = max(1, m // num_ranks)
    return m % rounds == 0


CASES = [(r, v, m) for r in range(1, 6) for v in range(1, 4) for m in range(1, 13) if _valid(r, m, v)]


@pytest.mark.parametrize("name", ["interleaved_1f1b", "zero_bubble"])
def test_orders_are_pytorchs(name: str) -> None:
    """Our action lists equal what ScheduleInterleaved1F1B / ScheduleInterleavedZeroBubble compute."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = {"interleaved_1f1b": schedules.ScheduleInterleaved1F1B,
           "zero_bubble": schedules.ScheduleInterleavedZeroBubble}[name]
    kinds = {schedules.FORWARD: "F", schedules.FULL_BACKWARD: "B", schedules.BACKWARD_INPUT: "I",
             schedules.BACKWARD_WEIGHT: "W"}
    checked = 0
    for num_ranks, v, m in CASES:
        rounds = max(1, m // num_ranks)
        state = SimpleNamespace(n_local_stages=v, pp_group_size=num_ranks, microbatches_per_round=m // rounds,
                                _n_microbatches=m)
        ours = build_schedule(name, num_ranks, m, True, v)
        for r in range(num_ranks):
            theirs = tuple(Action(kinds[a.computation_type], a.stage_index, a.microbatch_index)
                           for a in cls._calculate_single_rank_operations(state, r) if a is not None)
            assert ours[r] == theirs, (name, num_ranks, v, m, r)
            checked += 1
    assert checked > 300


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_plays_without_deadlock_and_respects_dependencies(name: str) -> None:
    for num_ranks, v, m in CASES:
        if v > 1 and name in ("gpipe", "1f1b"):
            continue
        schedule = build_schedule(name, num_ranks, m, True, v)
        slots = timeline(schedule, m)  # checks every action is listed once, on its stage's rank
        assert sum(a is not None for slot in slots for a in slot) == sum(len(r) for r in schedule)
        times = play(schedule, lambda a: {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}[a.kind])
        ends = {}
        for action, (start, end) in times.items():
            ends[("G" if action.kind in "BI" else action.kind, action.stage, action.microbatch)] = end
        for action, (start, _) in times.items():
            assert all(ends[key] <= start for key in dependencies(action, num_ranks * v))


def test_step_factors_match_the_literature() -> None:
    """GPipe and 1F1B: m + R - 1 (Huang et al. 2019); interleaved: m·v + R - 1 when m ≥ R
    (bubble (R-1)/(m·v), Narayanan et al. 2021); zero bubble below 1F1B where the bubble is big,
    above it where its dearer split backward (I = 1.25 F, measured) outweighs a small bubble."""
    for num_ranks, v, m in CASES:
        if v == 1:
            assert step_factor("gpipe", num_ranks, m) == m + num_ranks - 1
            assert step_factor("1f1b", num_ranks, m) == m + num_ranks - 1
            assert bubble_fraction("1f1b", num_ranks, m) == pytest.approx((num_ranks - 1) / (m + num_ranks - 1))
        elif m >= num_ranks:
            assert step_factor("interleaved_1f1b", num_ranks, m, v) == m * v + num_ranks - 1
        if m >= num_ranks:  # the split costs 0.25 F more per action: at most that much longer
            baseline = m * v + num_ranks - 1
            assert step_factor("zero_bubble", num_ranks, m, v) <= baseline + m * v * 0.25 / 3
    # ZB1P on 4 ranks, 8 microbatches: 9.92 slots against 1F1B's 11 (bubble 12.6% against 27.3%)
    assert step_factor("zero_bubble", 4, 8) == pytest.approx(9.9167, abs=1e-4)
    assert bubble_fraction("zero_bubble", 4, 8) == pytest.approx(0.1261, abs=1e-4)
    # on 2 ranks with 12 microbatches the bubble is small and 1F1B is the faster
    assert step_factor("zero_bubble", 2, 12) > step_factor("1f1b", 2, 12)


def _played_factor(name: str, num_ranks: int, m: int, v: int, training: bool) -> float:
    from autopart.core.schedules import _UNIT_COSTS

    ends = play(build_schedule(name, num_ranks, m, training, v), lambda a: _UNIT_COSTS[a.kind]).values()
    return max(end for _, end in ends) / (_UNIT_COSTS["F"] + (_UNIT_COSTS["B"] if training else 0.0))


@pytest.mark.parametrize("training", [True, False])
def test_closed_forms_equal_the_played_schedules(training: bool) -> None:
    """step_factor and the in-flight counts answer GPipe, 1F1B and interleaved 1F1B in closed form;
    playing the action lists gives exactly the same numbers."""
    from autopart.core.problems import _in_flight

    for num_ranks in range(1, 9):
        for m in range(1, 33):
            for name in ("gpipe", "1f1b"):
                assert step_factor(name, num_ranks, m, 1, training) == _played_factor(name, num_ranks, m, 1, training)
                if training:
                    assert _in_flight(name, num_ranks, m, 1, True) == peak_in_flight(build_schedule(name, num_ranks, m))
            for v in (2, 3, 4):
                if training and num_ranks >= 2 and _valid(num_ranks, m, v):
                    assert step_factor("interleaved_1f1b", num_ranks, m, v) == _played_factor(
                        "interleaved_1f1b", num_ranks, m, v, True)
                if training and num_ranks >= 2 and _valid(num_ranks, m, v):
                    assert interleaved_in_flight(num_ranks, m, v) == peak_in_flight(
                        build_schedule("interleaved_1f1b", num_ranks, m, True, v))


def test_in_flight_counts() -> None:
    """1F1B keeps min(m, R - s) on stage s; GPipe all m; interleaved follows its warm-up."""
    assert peak_in_flight(build_schedule("1f1b", 4, 8)) == {0: 4, 1: 3, 2: 2, 3: 1}
    assert peak_in_flight(build_schedule("gpipe", 3, 5)) == {0: 5, 1: 5, 2: 5}
    # rank 0 warms up with (v-1)·4 + 2·3 = 10 forwards: microbatches 0-3 on stage 0, 0-3 on
    # stage 4, then 4-5 on stage 0 again; rank 3's last stage holds only one.
    counts = peak_in_flight(build_schedule("interleaved_1f1b", 4, 8, True, 2))
    assert counts[0] == 8 and counts[4] == 4 and counts[7] == 1
    # zero bubble keeps activations until W: more in flight than 1F1B on later stages
    assert peak_in_flight(build_schedule("zero_bubble", 4, 4)) == {0: 4, 1: 4, 2: 4, 3: 4}


def test_bad_requests_name_the_fix() -> None:
    with pytest.raises(PlanError, match="multiple of 2"):
        build_schedule("interleaved_1f1b", 2, 5, True, 2)
    with pytest.raises(PlanError, match="one stage per rank"):
        build_schedule("1f1b", 2, 4, True, 2)
    with pytest.raises(PlanError, match="not known"):
        build_schedule("dualpipe", 2, 4)
