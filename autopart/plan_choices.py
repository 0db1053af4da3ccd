"""What the user fixed (`PlanRequest`) and the values the planner tries for each choice.

Replicas, pipeline ranks, microbatch counts, schedules, virtual stages and
the data-parallel mode and its sharding: each `*_choices` function returns the one value the
user fixed, checked against the devices, the batch and the model with an
error that names the argument and the values that would work, or every value
the search (autopart/planner.py) should try.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopart.cost_models import Cluster
from autopart.errors import InputError, PlanError
from autopart.plan import DATA_PARALLEL_MODES, data_parallel_mode_name
from autopart.schedules import SCHEDULES, VIRTUAL_SCHEDULES, microbatches_per_round

MAX_VIRTUAL_STAGES = 4
"""Most stages per rank the search tries: each one more adds a boundary per microbatch."""

DEFAULT_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
"""What the planner searches when the user names no schedule; 1F1B first, as on a tie (one
stage) it keeps fewer microbatches in flight than GPipe. Zero bubble only when asked for:
PyTorch's split weight pass (stage_backward_weight) fails on some graphs, e.g. T5's
("Trying to backward through the graph a second time"), which no plan-time check catches."""

@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What the user fixed (None: the planner chooses)."""

    batch_size: int
    """Samples in the example batch: one step."""
    pipeline_parallel: int | None = None
    """Pipeline ranks (each runs `virtual_stages` stages); None lets the planner choose."""
    num_microbatches: int | None = None
    """Microbatches per pipeline (per data-parallel replica)."""
    data_parallel: int | None = None
    """Replicas of the pipeline; None lets the planner choose."""
    schedule: str | None = None
    virtual_stages: int | None = None
    """Stages per pipeline rank (interleaved schedules); None lets the planner choose."""
    data_parallel_mode: str | None = None
    """One of plan.DATA_PARALLEL_MODES ('fsdp' reads as 'zero2'); None lets the planner choose."""
    recompute: str | None = None
    """'none', 'selective' or 'full' for every block; None lets the planner choose per block."""
    optimizer: str = "adam"
    mixed_precision: str | None = None
    """'bf16' or None (passes/precision.py): the graph's costs are already priced for it."""
    compile_kernels: bool = False
    """Price and run each rank's stage as TorchInductor's fused kernels (Plan.compile_kernels)."""
    training: bool = True
    """False plans inference: no backward, gradients or optimizer state."""
    max_microbatches: int = 512
    """Largest microbatch count tried when the planner chooses (Megatron-LM's published runs use
    up to 512 per pipeline: GPT-1T, batch 3072 over 6 replicas, microbatches of one)."""
    verbose: bool = False
    """Print the search's progress (best so far) on stderr."""


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


def data_parallel_choices(request: PlanRequest, cluster: Cluster) -> list[int]:
    """Replica counts that divide both the device count and the batch."""
    n, batch = cluster.num_devices, request.batch_size
    if request.pipeline_parallel is not None and not 1 <= request.pipeline_parallel <= n:
        raise InputError(f"pipeline_parallel={request.pipeline_parallel} must be between 1 and the {n} devices "
                         "of the cluster")
    if request.data_parallel is not None:
        dp = request.data_parallel
        if dp < 1 or n % dp or batch % dp:
            raise InputError(
                f"data_parallel={dp} must divide both the {n} devices and the batch of {batch} samples; "
                f"choose one of {[d for d in range(1, n + 1) if n % d == 0 and batch % d == 0]}"
            )
        return [dp]
    fixed_ranks = request.pipeline_parallel or 1
    choices = [d for d in range(1, n + 1) if n % d == 0 and batch % d == 0 and d * fixed_ranks <= n]
    if request.num_microbatches is not None:
        choices = [d for d in choices if (batch // d) % max(request.num_microbatches, 1) == 0]
        if not choices:
            microbatch_choices(request, 1)  # raises the error that names the batch and the divisors
    return choices


def smallest_microbatch(request: PlanRequest, cluster: Cluster) -> int:
    """Samples in the smallest microbatch any candidate uses: the size to trace at."""
    return min(request.batch_size // dp // microbatch_choices(request, dp)[-1]
               for dp in data_parallel_choices(request, cluster))


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


def data_parallel_mode_choices(request: PlanRequest, dp: int, cluster: Cluster | None = None,
                               num_ranks: int = 1) -> list[tuple[str, int]]:
    """(mode, dp_shard) pairs to try: 'ddp' alone without replicas or training; else 'ddp', 'zero2',
    'zero3', and 'hsdp' where the replicas span hosts evenly (`hsdp_shard_size`), unless the user
    fixed one."""
    try:
        mode = data_parallel_mode_name(request.data_parallel_mode)
    except ValueError as error:
        raise InputError(str(error)) from error
    if dp == 1 or not request.training:
        return [("ddp", 1)]
    hsdp = hsdp_shard_size(cluster, dp, num_ranks) if cluster is not None else None
    modes = [mode] if mode is not None else list(DATA_PARALLEL_MODES)
    if mode == "hsdp" and hsdp is None:
        raise InputError(f"data_parallel_mode='hsdp' shards within a host and replicates across hosts, but the "
                         f"{dp} replicas do not span several hosts evenly; use 'zero3' (shard over all replicas)")
    shard = {"ddp": 1, "zero2": dp, "zero3": dp, "hsdp": hsdp}
    return [(m, shard[m]) for m in modes if shard[m] is not None]


def hsdp_shard_size(cluster: Cluster, dp: int, num_ranks: int) -> int | None:
    """Replicas per host when every host holds the same number of consecutive replicas of every
    pipeline rank, and there are several hosts; None otherwise (HSDP does not apply)."""
    if dp < 2:
        return None
    for rank in range(num_ranks):
        hosts = [cluster.node_of_device[d * num_ranks + rank] for d in range(dp)]
        shard = hosts.count(hosts[0])
        if shard < 2 or shard == dp or dp % shard:
            return None
        groups = [hosts[i:i + shard] for i in range(0, dp, shard)]
        if any(len(set(g)) != 1 for g in groups) or len({g[0] for g in groups}) != len(groups):
            return None
        if rank == 0:
            first = shard
        elif shard != first:
            return None
    return first


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
