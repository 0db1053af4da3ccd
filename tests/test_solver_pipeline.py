"""The pipeline ILP against brute force, plus the cases whose answer is known by hand."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopart.core.errors import InputError, PlanError
from autopart.core.problems import PipelineProblem, PipelineSolution, ValueFlow
from autopart.core.modes import SCHEDULES, VIRTUAL_SCHEDULES
from autopart.solver import brute_force_pipeline, solve_pipeline
from autopart.solver.chain_split import contiguous_split
from autopart.solver.pipeline_costs import evaluate_assignments, pipeline_costs

BACKENDS = ("cpsat", "mip", "auto")  # auto: the exact DP on chains, else CP-SAT
GB = 10**9


def make_problem(
    fwd: np.ndarray,
    *,
    values: list[ValueFlow],
    edges: list[tuple[int, int]] | None = None,
    bwd: np.ndarray | None = None,
    state: np.ndarray | None = None,
    act: np.ndarray | None = None,
    capacity: np.ndarray | float = 1e15,
    latency: float = 0.0,
    bandwidth: float = 1e12,
    num_microbatches: int = 4,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
) -> PipelineProblem:
    """A problem with defaults that make memory and links irrelevant unless given."""
    n, num_stages = fwd.shape
    if edges is None:
        edges = sorted({(v.producer, c) for v in values for c in v.consumers})
    return PipelineProblem(
        block_names=tuple(f"b{i}" for i in range(n)),
        fwd_seconds=fwd,
        bwd_seconds=2 * fwd if bwd is None else bwd,
        state_bytes=np.zeros(n) if state is None else state,
        activation_bytes=np.zeros(n) if act is None else act,
        edges=tuple(edges),
        values=tuple(values),
        memory_capacity=np.full(num_stages, 1.0) * capacity,
        boundary_seconds=np.array([[latency + v.num_bytes / bandwidth] * (num_stages - 1) for v in values],
                                  dtype=float).reshape(len(values), num_stages - 1),
        num_microbatches=num_microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
    )


def chain_values(n: int, num_bytes: int = 1000) -> list[ValueFlow]:
    return [ValueFlow(producer=b, consumers=(b + 1,), num_bytes=num_bytes) for b in range(n - 1)]


@st.composite
def small_problems(draw: st.DrawFn) -> PipelineProblem:
    """≤ 8 blocks, ≤ 4 stages: chains with skips, branches, disconnected parts; heterogeneous
    stage speeds; training or inference; memory from ample to impossible."""
    n = draw(st.integers(1, 8))
    num_stages = min(n, draw(st.sampled_from([1, 2, 2, 3, 3, 4, 4])))
    values = []
    for p in range(n - 1):
        chain = draw(st.sampled_from([True, True, False]))  # mostly (p, p+1) present
        extra = draw(st.lists(st.integers(p + 1, n - 1), max_size=2, unique=True))
        consumers = sorted(set(extra) | ({p + 1} if chain else set()))
        if consumers:
            values.append(ValueFlow(producer=p, consumers=tuple(consumers),
                                    num_bytes=draw(st.integers(0, 4)) * 1000))
    block_ms = np.array(draw(st.lists(st.integers(1, 20), min_size=n, max_size=n)), dtype=float)
    speed = np.array(draw(st.lists(st.sampled_from([1.0, 1.0, 2.0, 0.5, 1.5]),
                                   min_size=num_stages, max_size=num_stages)))
    fwd = 1e-3 * block_ms[:, None] / speed[None, :]
    inference = draw(st.booleans())
    state = np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=float) * 1e6
    act = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=float) * 1e5
    num_microbatches = draw(st.integers(1, 6))
    schedule = draw(st.sampled_from(SCHEDULES))
    virtual_stages = 1
    if schedule in VIRTUAL_SCHEDULES:  # stage s on rank s % R; m in whole rounds of about R
        virtual_stages = draw(st.sampled_from([v for v in (1, 2) if num_stages % v == 0]))
        ranks = num_stages // virtual_stages
        rounds = max(1, num_microbatches // ranks)
        num_microbatches = rounds * (num_microbatches // rounds)
    total = state.sum() + num_microbatches * act.sum()
    capacity = [draw(st.floats(0.6, 3.0)) * total // num_stages + 1e4 for _ in range(num_stages)]
    return make_problem(
        fwd, values=values, bwd=np.zeros_like(fwd) if inference else 2 * fwd,
        state=state, act=act, capacity=np.array(capacity),
        latency=draw(st.sampled_from([0.0, 1e-4, 2e-3])),
        bandwidth=draw(st.sampled_from([1e6, 1e7, 1e9])),
        num_microbatches=num_microbatches, schedule=schedule, virtual_stages=virtual_stages,
    )


def assert_valid(problem: PipelineProblem, sol: PipelineSolution) -> None:
    """The split is monotone, fills every stage, fits, and its numbers are its own."""
    stage = np.array(sol.stage_of_block)
    assert all(stage[u] <= stage[v] for u, v in problem.edges)
    assert set(stage.tolist()) == set(range(problem.num_stages))
    assert all(m <= c for m, c in zip(sol.stage_memory_bytes, problem.memory_capacity))
    seconds, memory = evaluate_assignments(pipeline_costs(problem), stage)
    np.testing.assert_allclose(sol.stage_seconds, seconds[0], rtol=1e-12)
    np.testing.assert_allclose(sol.stage_memory_bytes, memory[0], rtol=1e-12)
    assert sol.step_seconds == pytest.approx(problem.step_factor() * max(sol.stage_seconds))
    assert sol.bound_seconds <= sol.step_seconds


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=small_problems(), backend=st.sampled_from(BACKENDS))
def test_ilp_matches_brute_force(problem: PipelineProblem, backend: str) -> None:
    best = brute_force_pipeline(problem)
    if best is None:
        with pytest.raises(PlanError, match="short"):
            solve_pipeline(problem, backend=backend)
        return
    sol = solve_pipeline(problem, backend=backend)
    assert sol.status == "OPTIMAL"
    assert_valid(problem, sol)
    assert sol.step_seconds == pytest.approx(best.step_seconds, rel=1e-6)
    assert sol.bound_seconds == pytest.approx(best.step_seconds, rel=1e-6)
    if all((b, b + 1) in problem.edges for b in range(problem.num_blocks - 1)):
        dp = contiguous_split(pipeline_costs(problem))  # exact on chains
        seconds = evaluate_assignments(pipeline_costs(problem), dp)[0]
        assert problem.step_factor() * seconds.max() == pytest.approx(best.step_seconds, rel=1e-9)


def test_cost_of_a_split_by_hand() -> None:
    """Blocks 0→1→2 plus a skip 0→2, cut {0} | {1, 2}, training, 1f1b with m = 3."""
    fwd = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    values = [ValueFlow(producer=0, consumers=(1, 2), num_bytes=100),
              ValueFlow(producer=1, consumers=(2,), num_bytes=50)]
    problem = make_problem(fwd, values=values, state=np.array([10.0, 20.0, 30.0]),
                           act=np.array([1.0, 2.0, 3.0]), latency=0.5, bandwidth=100.0,
                           num_microbatches=3, schedule="1f1b")
    seconds, memory = evaluate_assignments(pipeline_costs(problem), np.array([0, 1, 1]))
    link = 2 * (0.5 + 100 / 100.0)  # only value 0 crosses; activation right, gradient left
    assert seconds[0].tolist() == pytest.approx([3 * 1.0 + link, 3 * 5.0 + link])
    # in flight: stage 0 keeps min(3, 2 - 0) = 2, stage 1 keeps 1; buffers: 100 bytes each
    assert memory[0].tolist() == pytest.approx([10 + 2 * 1 + 2 * 100, 50 + 1 * 5 + 1 * 100])
    inference = dataclasses.replace(problem, bwd_seconds=np.zeros_like(fwd))
    seconds = evaluate_assignments(pipeline_costs(inference), np.array([0, 1, 1]))[0]
    assert seconds[0].tolist() == pytest.approx([1.0 + 1.5, 5.0 + 1.5])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_blocks", "num_stages"), [(12, 4), (24, 8), (6, 3), (5, 5)])
def test_identical_blocks_split_evenly(backend: str, num_blocks: int, num_stages: int) -> None:
    fwd = np.full((num_blocks, num_stages), 1e-2)
    problem = make_problem(fwd, values=chain_values(num_blocks), latency=1e-6)
    sol = solve_pipeline(problem, backend=backend)
    assert sol.status == "OPTIMAL"
    assert np.bincount(sol.stage_of_block).tolist() == [num_blocks // num_stages] * num_stages


@pytest.mark.parametrize("backend", BACKENDS)
def test_twice_as_fast_stage_gets_twice_the_work(backend: str) -> None:
    fwd = np.full((16, 3), 1e-2)
    fwd[:, 1] /= 2  # stage 1's device is twice as fast
    sol = solve_pipeline(make_problem(fwd, values=chain_values(16)), backend=backend)
    assert np.bincount(sol.stage_of_block).tolist() == [4, 8, 4]
    assert max(sol.stage_seconds) == pytest.approx(4 * 3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infeasible_names_stage_and_shortfall(backend: str) -> None:
    """4 blocks of 10 GB on stages of 25 and 16 GB: the best split (2 | 2) is 4 GB short
    on stage 1."""
    problem = make_problem(np.ones((4, 2)), values=chain_values(4, 0), state=np.full(4, 10.0 * GB),
                           capacity=np.array([25.0 * GB, 16.0 * GB]), schedule="gpipe")
    with pytest.raises(PlanError) as err:
        solve_pipeline(problem, backend=backend)
    message = str(err.value)
    assert "stage 1" in message and "16,000,000,000 bytes" in message
    assert "4,000,000,000 bytes) short" in message
    assert "more pipeline stages" in message
    assert "microbatches" not in message.split("Try")[1]  # no activations: m does not matter
    smaller = dataclasses.replace(problem, memory_capacity=np.full(2, 12.0 * GB))
    with pytest.raises(PlanError, match=r"at least 4 devices of 11.18 GiB"):  # 40 GB / 12 GB
        solve_pipeline(smaller, backend=backend)


def test_infeasible_activations_suggest_fewer_microbatches() -> None:
    problem = make_problem(np.ones((4, 2)), values=chain_values(4, 0), act=np.full(4, 1.0 * GB),
                           capacity=np.full(2, 10.0 * GB), num_microbatches=16, schedule="gpipe")
    with pytest.raises(PlanError, match="fewer microbatches.*'1f1b'"):
        solve_pipeline(problem)


def test_more_stages_than_blocks() -> None:
    problem = make_problem(np.ones((3, 5)), values=chain_values(3))
    with pytest.raises(PlanError, match="3 blocks into 5 pipeline stages.*at most 3 stages"):
        solve_pipeline(problem)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"edges": ((2, 1),)}, r"edge \(2, 1\)"),
        ({"num_microbatches": 0}, "num_microbatches"),
        ({"schedule": "zb"}, "schedule 'zb'"),
        ({"fwd_seconds": np.ones((3, 3))}, r"fwd_seconds has shape \(3, 3\)"),
        ({"boundary_seconds": -np.ones((2, 1))}, "boundary_seconds"),
        ({"boundary_seconds": np.ones((1, 1))}, r"boundary_seconds has shape \(1, 1\)"),
        ({"values": (ValueFlow(producer=2, consumers=(1,), num_bytes=4),), "boundary_seconds": np.ones((1, 1))},
         "must come after"),
    ],
)
def test_malformed_problem(change: dict, match: str) -> None:
    problem = dataclasses.replace(make_problem(np.ones((3, 2)), values=chain_values(3)), **change)
    with pytest.raises(InputError, match=match):
        solve_pipeline(problem)


def test_unknown_backend() -> None:
    with pytest.raises(InputError, match="unknown backend"):
        solve_pipeline(make_problem(np.ones((3, 2)), values=chain_values(3)), backend="gurobi")


def transformer_26(num_stages: int = 8) -> PipelineProblem:
    """Embedding, 24 layers with 2% noise, head; a skip value into every fourth layer."""
    rng = np.random.default_rng(0)
    block = np.concatenate([[1.0], 4.0 * (1 + 0.02 * rng.standard_normal(24)), [6.0]]) * 1e-3
    values = chain_values(26, 16 * 2**20)
    values.append(ValueFlow(producer=0, consumers=tuple(range(1, 25, 4)), num_bytes=2**20))
    return make_problem(np.repeat(block[:, None], num_stages, axis=1), values=values,
                        state=np.full(26, 0.8 * GB), act=np.full(26, 0.2 * GB), capacity=80.0 * GB,
                        latency=1e-5, bandwidth=50e9, num_microbatches=8)


def test_transformer_chain_is_fast() -> None:
    """The planner calls this many times inside 0.5 s: one solve must stay well under 0.1 s."""
    problem = transformer_26()
    steps = {}
    for backend in ("cpsat", "auto"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            sol = solve_pipeline(problem, backend=backend)
            times.append(time.perf_counter() - start)
        assert sol.status == "OPTIMAL"
        assert_valid(problem, sol)
        assert min(times) < (0.1 if backend == "cpsat" else 0.01), (backend, times)
        steps[sol.backend] = sol.step_seconds
    assert steps["dp"] == pytest.approx(steps["cpsat"], rel=1e-7)


def test_time_limit_returns_a_split() -> None:
    """With no time to search, the contiguous hint comes back as FEASIBLE (or better)."""
    sol = solve_pipeline(transformer_26(), time_limit_s=1e-6)
    assert sol.status in ("OPTIMAL", "FEASIBLE")
    assert_valid(transformer_26(), sol)


def test_log_progress_prints(capfd: pytest.CaptureFixture[str]) -> None:
    solve_pipeline(transformer_26(4), backend="cpsat", log_progress=True)
    assert "CP-SAT" in capfd.readouterr().out
