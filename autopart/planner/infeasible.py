"""Why no plan fits, and what would: the levers the search tried and what each would need.

The search keeps one `Failure` per infeasible candidate. When none fits,
`infeasible_error` names the closest one (the smallest shortfall, over every
mesh shape tried: autopart/mesh_search.py merges them) and, for each lever,
what it would take: more devices (`min_devices_that_fit`, chain packing), more
memory per device (the closest attempt's need), a smaller batch (the largest
microbatch any packing of these devices holds), and the levers already pulled
(stages, replicas and their sharding, recomputation, microbatches).
"""

from __future__ import annotations

import math

import dataclasses
from dataclasses import dataclass

from autopart.cost_models import Cluster
from autopart.core.errors import PlanError
from autopart.core.blocks import BlockGraph
from autopart.axes.pipeline import microbatch_choices
from autopart.planner.recompute_choice import least_keeping_recompute, uniform_recompute
from autopart.core.problems import PipelineProblem
from autopart.planner.step_costs import (
    activation_bytes,
    block_gradient_bytes,
    block_state_bytes,
    returned_output_bytes,
)
from autopart.core.setting import Setting
from autopart.core.units import fmt_bytes


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One candidate that did not fit."""

    shortfall_bytes: float
    """How far its best split misses (the fullest stage's excess, or the whole model's over all devices)."""
    capacity_bytes: float
    """Memory of one of its stages' devices."""
    tried: dict
    """Its choices (Candidate fields)."""
    setting: Setting
    message: str
    """The solver's explanation."""

    @classmethod
    def of(cls, problem: PipelineProblem, setting: Setting, request, tried: dict,
           message: str | None = None, shortfall_bytes: float | None = None) -> "Failure":
        if shortfall_bytes is None:
            shortfall_bytes = shortfall(problem)
        if message is None:
            message = (f"the blocks' state and one microbatch of activations per stage are "
                       f"{fmt_bytes(shortfall_bytes, exact=True)} short of fitting the "
                       f"{problem.num_stages} stage(s) together")
        return cls(shortfall_bytes=float(shortfall_bytes),
                   capacity_bytes=float(problem.memory_capacity.max() + problem.reserved_bytes),
                   tried=dict(tried, recompute=setting.recompute_label), setting=setting, message=message)

    @property
    def summary(self) -> str:
        return self.message.splitlines()[0]

    def describe(self) -> str:
        t = self.tried
        mode = f" {t['data_parallel_mode']}" if t["data_parallel"] > 1 else ""
        tp = f" × tp={t['tensor_parallel']}" if t.get("tensor_parallel", 1) > 1 else ""
        return (f"dp={t['data_parallel']}{mode} × pp={t['pipeline_parallel']}{tp}, {t['num_microbatches']} microbatches, "
                f"{t['schedule']}, recompute {t['recompute']}: {self.summary}")


def shortfall(problem: PipelineProblem) -> float:
    """Bytes by which the whole model misses the stages' total memory (≤ 0: fits in sum), with the
    fewest activations any stage keeps (one microbatch in flight each)."""
    need = problem.held_bytes.sum() + problem.activation_bytes.sum()
    return float(need - problem.memory_capacity.sum())


def failure_of_error(problem: PipelineProblem, setting: Setting, request, tried: dict,
                     error: PlanError) -> Failure:
    """A `Failure` from the solver's error (which carries its shortfall)."""
    return Failure.of(problem, setting, request, tried, str(error), getattr(error, "shortfall_bytes", None))


def infeasible_error(graph: BlockGraph, cluster: Cluster, request, failures: list[Failure], traced_batch_size: int,
                     tensor_parallel: tuple[int, ...] = (1,)) -> PlanError:
    """The error when no candidate fits: the closest attempt, the levers tried, what each needs
    (`graph` costed at `traced_batch_size` samples)."""
    error = PlanError(_message(graph, cluster, request, failures, traced_batch_size, tensor_parallel))
    error.failures = list(failures)
    error.shortfall_bytes = min((f.shortfall_bytes for f in failures), default=float("inf"))
    return error


def _message(graph: BlockGraph, cluster: Cluster, request, failures: list[Failure], traced_batch_size: int,
             tensor_parallel: tuple[int, ...]) -> str:
    n = cluster.num_devices
    device = cluster.devices[0]
    lines = [f"no pipeline plan fits {n} device(s) of {fmt_bytes(device.memory_bytes)}."]
    if failures:
        closest = min(failures, key=lambda f: f.shortfall_bytes)
        lines.append(f"  Closest attempt: {closest.describe()}")
    tried = _levers_tried(failures, tensor_parallel)
    if tried:
        lines.append(f"  Tried: {tried}.")
    recompute = least_keeping_recompute(request)
    setting = Setting(recompute=uniform_recompute(graph, recompute))
    fits = min_devices_that_fit(graph, cluster, request, traced_batch_size, setting)
    m = microbatch_choices(request)[-1]
    how = (f" (a 1F1B pipeline of {m} microbatch{'es' if m > 1 else ''}"
           + (", recomputing every block)" if recompute != "none" else ")"))
    needs = [f"devices: the smallest count of {device.name} devices that fits is {fits}{how}"
             if fits else f"devices: even {8 * n} {device.name} devices do not hold it{how}"]
    if failures:
        closest = min(failures, key=lambda f: f.shortfall_bytes)
        needs.append(f"memory: {fmt_bytes(closest.capacity_bytes + max(closest.shortfall_bytes, 0.0))} per device "
                     f"for the closest attempt ({fmt_bytes(max(closest.shortfall_bytes, 0.0))} more)")
    largest = largest_microbatch_that_fits(graph, cluster, request, traced_batch_size, setting)
    size = request.batch_size
    if largest is None:
        needs.append("batch: not even 1 sample per microbatch fits: the state alone is too large; shard it "
                     "(data_parallel_mode='zero3' with more devices), split layers (tensor_parallel) or "
                     "use a lighter optimizer (optimizer='sgd')")
    else:
        needs.append(f"batch: microbatches of at most {largest} sample(s) fit on {n} device(s) as a pipeline "
                     f"(the batch of {size} needs a microbatch count that divides it down to that)")
    experts = _expert_lever(graph, failures)
    if experts:
        needs.append(experts)
    lines.append("  What would fit — " + "; ".join(needs) + ".")
    return "\n".join(lines)


def _expert_lever(graph: BlockGraph, failures: list[Failure]) -> str:
    """The experts' share of the state, and the ep degrees tried: expert parallelism's lever."""
    expert_bytes = sum(b.expert_param_bytes for b in graph.blocks)
    if not expert_bytes:
        return ""
    num_experts = math.gcd(*(b.num_experts for b in graph.blocks))
    tried = sorted({f.tried.get("expert_parallel", 1) for f in failures})
    return (f"experts: {fmt_bytes(expert_bytes)} of the {fmt_bytes(sum(b.param_bytes for b in graph.blocks))} of "
            f"weights are {num_experts} experts per layer; expert_parallel (tried {', '.join(map(str, tried))}) splits "
            f"them over that many replicas, up to {num_experts} (with data_parallel a multiple of it)")


def _levers_tried(failures: list[Failure], tensor_parallel: tuple[int, ...]) -> str:
    if not failures:
        return ""

    def values(key: str) -> str:
        seen = sorted({f.tried.get(key) for f in failures}, key=str)
        return ", ".join(str(v) for v in seen)

    return (f"pipeline ranks {values('pipeline_parallel')}; replicas {values('data_parallel')} "
            f"({values('data_parallel_mode')}); microbatches {values('num_microbatches')}; "
            f"schedules {values('schedule')}; recompute {values('recompute')}; "
            f"expert parallel {values('expert_parallel')}; "
            f"tensor parallel {', '.join(str(t) for t in tensor_parallel)}")


def _packing(graph: BlockGraph, request, setting: Setting, m: int, scale: float) -> tuple[list[float], list[float]]:
    state = [block_state_bytes(b, request, setting) + block_gradient_bytes(b, request, setting, m)
             + returned_output_bytes(b, request, m, scale) for b in graph.blocks]
    acts = [activation_bytes(b, request, setting, setting.recompute_of(i)) * scale
            for i, b in enumerate(graph.blocks)]
    return state, acts


def _fits(state: list[float], acts: list[float], capacity: float, count: int, m: int) -> bool:
    """Whether blocks packed greedily in order into `count` consecutive stages fit (1F1B in flight)."""
    stage, used_state, used_acts = 0, 0.0, 0.0
    for s_bytes, a_bytes in zip(state, acts):
        in_flight = min(m, count - stage)
        if used_state + s_bytes + (used_acts + a_bytes) * in_flight > capacity:
            stage += 1
            used_state, used_acts = 0.0, 0.0
            in_flight = min(m, count - stage) if stage < count else 0
            if stage >= count or s_bytes + a_bytes * in_flight > capacity:
                return False
        used_state += s_bytes
        used_acts += a_bytes
    return True


def min_devices_that_fit(graph: BlockGraph, cluster: Cluster, request, traced_batch_size: int,
                         setting: Setting | None = None) -> int | None:
    """Smallest number of devices like the cluster's first that hold the model, greedily packed.

    Blocks are packed in order into consecutive stages, each filled as far as
    its memory allows, with the most microbatches (m = batch, 1F1B in flight),
    which is optimal for a chain (an exchange argument).
    """
    setting = setting or Setting()
    capacity = cluster.devices[0].memory_bytes
    m = microbatch_choices(request)[-1]
    state, acts = _packing(graph, request, setting, m, request.batch_size / m / traced_batch_size)
    for count in range(1, 8 * cluster.num_devices + 1):
        if _fits(state, acts, capacity, count, m):
            return count
    return None


def largest_microbatch_that_fits(graph: BlockGraph, cluster: Cluster, request, traced_batch_size: int,
                                 setting: Setting | None = None) -> int | None:
    """The most samples per microbatch a pipeline over all the cluster's devices holds (greedy packing,
    as many microbatches in flight as stages); None when not even one sample fits."""
    setting = setting or Setting()
    capacity = min(d.memory_bytes for d in cluster.devices)
    count = cluster.num_devices
    m = max(count, 1)

    def fits(size: int) -> bool:
        probe = dataclasses.replace(request, batch_size=size * m)
        state, acts = _packing(graph, probe, setting, m, size / traced_batch_size)
        return _fits(state, acts, capacity, count, m)

    if not fits(1):
        return None
    low, high = 1, 2
    while fits(high) and high < 1 << 20:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
