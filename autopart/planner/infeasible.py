"""Why no plan fits, and what would: the levers the search tried and what each would need.

The search keeps one `Failure` per infeasible candidate. When none fits,
`infeasible_error` names the closest one (the smallest shortfall, over every
mesh shape tried: autopart/mesh_search.py merges them) and, for each lever,
what it would take in memory per device (the closest attempt's need), and the
levers already pulled (stages, replicas and their sharding, recomputation,
microbatches). More devices and a smaller batch are found by running the search
again (autopart/fit_advice.py), so that advice cannot contradict a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autopart.cost_models import Cluster
from autopart.core.errors import PlanError
from autopart.core.blocks import BlockGraph
from autopart.core.problems import PipelineProblem
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
        tp += f" (cp={t['context_parallel']})" if t.get("context_parallel", 1) > 1 else ""
        micro = f"{t['num_microbatches']} microbatch{'es' if t['num_microbatches'] != 1 else ''}"
        return (f"dp={t['data_parallel']}{mode} × pp={t['pipeline_parallel']}{tp}, {micro}, "
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
    needs = []  # the devices and the batch that would fit come from the search itself: autopart/fit_advice.py
    if failures:
        closest = min(failures, key=lambda f: f.shortfall_bytes)
        needs.append(f"memory: {fmt_bytes(closest.capacity_bytes + max(closest.shortfall_bytes, 0.0))} per device "
                     f"for the closest attempt ({fmt_bytes(max(closest.shortfall_bytes, 0.0))} more)")
    if request.sequence_parallel is False and max(tensor_parallel) > 1:
        needs.append("activations: sequence_parallel=None (or True) keeps the norms' and residuals' "
                     "activations at 1/tp on each tensor-parallel rank")
    experts = _expert_lever(graph, failures)
    if experts:
        needs.append(experts)
    context = _context_lever(graph, failures)
    if context:
        needs.append(context)
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


def _context_lever(graph: BlockGraph, failures: list[Failure]) -> str:
    """The sequence the attention reads, and the cp degrees tried: context parallelism's lever."""
    sequence = max((b.attention_sequence for b in graph.blocks), default=0)
    if not sequence:
        return ""
    tried = sorted({f.tried.get("context_parallel", 1) for f in failures})
    return (f"sequence: one sample's activations ({sequence} tokens) are the least a replica holds without "
            f"context parallelism; context_parallel (tried {', '.join(map(str, tried))}) splits each sequence "
            f"over that many replicas (data_parallel a multiple of it, the sequence cut into 2 × cp equal chunks)")


def _levers_tried(failures: list[Failure], tensor_parallel: tuple[int, ...]) -> str:
    if not failures:
        return ""

    def values(key: str) -> str:
        seen = sorted({f.tried.get(key) for f in failures}, key=str)
        return ", ".join(str(v) for v in seen)

    return (f"pipeline ranks {values('pipeline_parallel')}; replicas {values('data_parallel')} "
            f"({values('data_parallel_mode')}); microbatches {values('num_microbatches')}; "
            f"schedules {values('schedule')}; recompute {values('recompute')}; "
            f"expert parallel {values('expert_parallel')}; context parallel {values('context_parallel')}; "
            f"tensor parallel {', '.join(str(t) for t in tensor_parallel)}")
