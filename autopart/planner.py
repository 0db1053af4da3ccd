"""Pipeline configurations: replicas, pipeline ranks, virtual stages, microbatch
counts, schedules, and how the replicas synchronise (DDP or FSDP).

The choices each dimension offers (`*_choices`), the price of a candidate (dp
replicas, R ranks × v stages each, m microbatches, schedule, dp mode): its block
graph as a `PipelineProblem` (costs scaled to one microbatch) whose split the
solver finds, plus the exposed synchronisation and the optimizer step; and the
`Plan` of the best. The search over candidates, with its bounds, is
autopart/search.py.

Scaling to a microbatch: the graph is traced at one microbatch size
(`PlanRequest.traced_batch_size`); FLOPs, roofline time, saved activations and
boundary bytes are linear in the batch, so a candidate with microbatches of b
samples scales them by b / traced size; per-op launch floors do not scale
(`BlockTimes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autopart.cost_models import (
    Cluster,
    optimizer_step_bytes,
    all_gather_seconds,
    all_reduce_seconds,
    gradient_bytes,
    optimizer_state_bytes,
    reduce_scatter_seconds,
)
from autopart.block_arrays import stage_seconds
from autopart.errors import InputError, PlanError
from autopart.passes.blocks import BlockGraph
from autopart.plan import Candidate, Mesh, Plan, SolverInfo, StageMemory, StagePlan
from autopart.schedules import VIRTUAL_SCHEDULES, bubble_fraction, microbatches_per_round
from autopart.problems import PipelineProblem, PipelineSolution, ValueFlow
from autopart.schedules import SCHEDULES


# "auto": chains of blocks (every layer reads the one before, as in every transformer) get the
# solver's exact dynamic program, whose optimum is the ILP's (every split of a chain is
# contiguous; tests/test_solver_pipeline.py checks both against brute force); DAGs get the
# CP-SAT model. The DP takes 2–12 ms on 83–130 blocks and 16–128 stages, where model building
# alone costs CP-SAT more; a search over thousands of layouts needs that.
SOLVER_BACKEND = "auto"

MAX_VIRTUAL_STAGES = 4
"""Most stages per rank the search tries: each one more adds a boundary per microbatch."""

DEFAULT_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
"""What the planner searches when the user names no schedule; 1F1B first, as on a tie (one
stage) it keeps fewer microbatches in flight than GPipe. Zero bubble only when asked for:
PyTorch's split weight pass (stage_backward_weight) fails on some graphs, e.g. T5's
("Trying to backward through the graph a second time"), which no plan-time check catches."""

DATA_PARALLEL_MODES = ("ddp", "fsdp")
"""'ddp': every replica holds the whole state, gradients are all-reduced (DDP). 'fsdp':
optimizer state and master weights sharded over the replicas (FSDP2 `fully_shard`,
parameters gathered once per step and kept until the last backward: ZeRO-2)."""


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What the user fixed (None: the planner chooses)."""

    batch_size: int
    """Samples in the example batch: one step."""
    traced_batch_size: int
    """Samples in the batch the costed graph was traced with (one microbatch)."""
    num_stages: int | None = None
    num_microbatches: int | None = None
    """Microbatches per pipeline (per data-parallel replica)."""
    data_parallel: int | None = None
    """Replicas of the pipeline; None lets the planner choose."""
    schedule: str | None = None
    virtual_stages: int | None = None
    """Stages per pipeline rank (interleaved schedules); None lets the planner choose."""
    data_parallel_mode: str | None = None
    """'ddp' or 'fsdp' (`DATA_PARALLEL_MODES`); None lets the planner choose."""
    optimizer: str = "adam"
    mixed_precision: str | None = None
    """'bf16' or None (passes/precision.py); the graph's costs are already priced for it."""
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
    if request.num_stages is not None and not 1 <= request.num_stages <= n:
        raise InputError(f"num_stages={request.num_stages} must be between 1 and the {n} devices of the cluster")
    if request.data_parallel is not None:
        dp = request.data_parallel
        if dp < 1 or n % dp or batch % dp:
            raise InputError(
                f"data_parallel={dp} must divide both the {n} devices and the batch of {batch} samples; "
                f"choose one of {[d for d in range(1, n + 1) if n % d == 0 and batch % d == 0]}"
            )
        return [dp]
    fixed_stages = request.num_stages or 1
    choices = [d for d in range(1, n + 1) if n % d == 0 and batch % d == 0 and d * fixed_stages <= n]
    if request.num_microbatches is not None:
        choices = [d for d in choices if (batch // d) % max(request.num_microbatches, 1) == 0]
        if not choices:
            microbatch_choices(request, 1)  # raises the error that names the batch and the divisors
    return choices


def smallest_microbatch(request: PlanRequest, cluster: Cluster) -> int:
    """Samples in the smallest microbatch any candidate uses: the size to trace at."""
    return min(request.batch_size // dp // microbatch_choices(request, dp)[-1]
               for dp in data_parallel_choices(request, cluster))


def plan_pipeline(graph: BlockGraph, cluster: Cluster, request: PlanRequest, model_class: str) -> Plan:
    """The fastest feasible dp × pp plan for `graph` on `cluster`: the layout search of
    autopart/search.py over this one block graph (tp = 1)."""
    from autopart.search import TPOption, search  # search builds on this module's pieces

    return search([TPOption(tp=1, graph=graph, cluster=cluster)], request, model_class).plan


def _stage_memory(problem: PipelineProblem, s: int, members: list[int], blocks, request: PlanRequest, dp: int,
                  mode: str, boundary_bytes: float) -> StageMemory:
    """What stage `s` holds at its peak, by kind (`PipelineProblem.stage_memory_terms`): at the peak
    of activations the gradients exist only if an earlier microbatch's backward ran. A parameter
    read by several blocks of the stage (tied weights) is counted once."""
    k = problem.in_flight(s)
    first, second = problem.stage_memory_terms(s)
    at_activation_peak = first[members].sum() >= second[members].sum()
    unique = _unique_parameters(blocks)
    params = sum(size for _, size, _, _ in unique)
    trainable = sum(size for _, size, train, _ in unique if train) if request.training else 0
    shards = dp if mode == "fsdp" and dp > 1 and request.training else 1
    unsharded = _unsharded_fraction(request, mode, dp)
    grads = gradient_bytes(trainable) * (unsharded + (shards > 1) / shards)
    if at_activation_peak and problem.num_microbatches <= k:
        grads = 0.0  # the first backward has not run yet
    held = k if at_activation_peak else max(k - 1, 0)
    activations = (float(problem.activation_bytes[members].sum()) * held
                   + (float(problem.transient_bytes[members].sum())
                      if at_activation_peak and problem.transient_bytes is not None else 0.0)
                   + sum(returned_output_bytes(b, request, problem.num_microbatches,
                                               _scale(request, problem.num_microbatches, dp),
                                               keeps_model_outputs(problem.num_stages, dp, mode)) for b in blocks))
    return StageMemory(
        params=int(params * (unsharded + (shards > 1) / shards) if shards > 1 else params),
        grads=int(grads),
        optimizer=int(optimizer_state_bytes(trainable, request.optimizer) / shards) if request.training else 0,
        buffers=int(sum(b.buffer_bytes for b in blocks)),
        activations=int(activations),
        boundary=int(boundary_bytes * k),
        capacity=int(problem.memory_capacity[s]),
    )


def schedule_choices(request: PlanRequest) -> list[str]:
    """The schedules to try: the one fixed, else all (forward-only plans: GPipe and 1F1B)."""
    v = request.virtual_stages
    if v is not None and v > 1 and request.num_stages == 1:
        raise InputError(
            f"virtual_stages={v} needs at least 2 pipeline ranks, but num_stages=1: PyTorch's interleaved "
            "schedules send between consecutive stages, which cannot share a rank; use num_stages >= 2 or "
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
        why = f"{schedule} needs at least 2 pipeline ranks (num_stages), not {num_ranks}"
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


def data_parallel_mode_choices(request: PlanRequest, dp: int) -> list[str]:
    """'ddp' alone without replicas or training; both otherwise, unless the user fixed one."""
    mode = request.data_parallel_mode
    if mode is not None and mode not in DATA_PARALLEL_MODES:
        raise InputError(f"data_parallel_mode={mode!r} is not known; use one of {DATA_PARALLEL_MODES} or None")
    if dp == 1 or not request.training:
        return ["ddp"]
    return [mode] if mode is not None else list(DATA_PARALLEL_MODES)


def data_parallel_sync_seconds(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                               problem: PipelineProblem, solution: PipelineSolution, dp: int,
                               mode: str = "ddp") -> float:
    """Exposed time of the data-parallel synchronisation, the slowest rank's.

    'ddp' without a pipeline (one stage): DistributedDataParallel all-reduces
    in buckets during the last microbatch's backward, so only the part longer
    than that backward shows: max(0, all-reduce − one microbatch's backward).
    'ddp' with a pipeline: FSDP2's replicate, which torch.distributed.pipelining
    reduces once after the last backward: the all-reduce is exposed. 'fsdp':
    each stage is one FSDP unit, so the all-gather of its parameters before the
    first forward and the reduce-scatter of its gradients after the last
    backward are exposed. Ring collective times from cost_models.comm
    (Thakur et al. 2005).
    """
    if dp == 1 or not request.training:
        return 0.0
    exposed = 0.0
    for rank in range(problem.num_ranks):
        stages = range(rank, problem.num_stages, problem.num_ranks)
        members = [b for b, stage in enumerate(solution.stage_of_block) if stage in stages]
        grad_bytes = sum(graph.blocks[b].trainable_param_bytes for b in members)
        param_bytes = sum(graph.blocks[b].param_bytes for b in members)
        link = cluster.link_for_group([d * problem.num_ranks + rank for d in range(dp)])
        if mode == "fsdp":
            sync = all_gather_seconds(param_bytes, dp, link) + reduce_scatter_seconds(grad_bytes, dp, link)
        elif problem.num_stages > 1:
            sync = all_reduce_seconds(grad_bytes, dp, link)
        else:
            backward = sum(float(problem.bwd_seconds[b, 0]) for b in members)
            sync = all_reduce_seconds(grad_bytes, dp, link) - backward
        exposed = max(exposed, sync)
    return max(0.0, exposed)


def optimizer_seconds(graph: BlockGraph, cluster: Cluster, request: PlanRequest, problem: PipelineProblem,
                      solution: PipelineSolution, dp: int, mode: str = "ddp") -> float:
    """The optimizer step after the last backward, the slowest rank's: the bytes it streams
    (`cost_models.optimizer_step_bytes`; a 1/dp shard under FSDP) at the device's achieved
    bandwidth. The step is not overlapped with anything."""
    if not request.training:
        return 0.0
    shards = dp if mode == "fsdp" else 1
    slowest = 0.0
    for rank in range(problem.num_ranks):
        stages = set(range(rank, problem.num_stages, problem.num_ranks))
        members = [graph.blocks[b] for b, stage in enumerate(solution.stage_of_block) if stage in stages]
        trainable = sum(b for _, b, train, _ in _unique_parameters(members) if train)
        moved = optimizer_step_bytes(trainable, request.optimizer) / shards
        slowest = max(slowest, moved / cluster.devices[rank].achieved_bandwidth)
    return slowest


def _unique_parameters(blocks) -> list[tuple[str, int, bool, int]]:
    """(name, bytes, trainable, elements) of the parameters some block of `blocks` reads, each once."""
    return list({entry[0]: entry for block in blocks for entry in block.parameters}.values())


def sync_lower_bound(graph: BlockGraph, cluster: Cluster, request: PlanRequest, problem: PipelineProblem,
                     dp: int, mode: str) -> float:
    """A bound on `data_parallel_sync_seconds` before solving: the slowest rank moves at least
    the average rank's bytes (1/R of the model); latency left out."""
    if dp == 1 or not request.training or (mode == "ddp" and problem.num_stages == 1):
        return 0.0
    grad_bytes = sum(b.trainable_param_bytes for b in graph.blocks) / problem.num_ranks
    param_bytes = sum(b.param_bytes for b in graph.blocks) / problem.num_ranks
    fastest = max((cluster.link_for_group([d * problem.num_ranks + r for d in range(dp)]).bandwidth
                   for r in range(problem.num_ranks)))
    moved = (param_bytes + grad_bytes) if mode == "fsdp" else 2 * grad_bytes  # AG + RS, or AR = RS + AG
    return (dp - 1) / dp * moved / fastest


def _stage_choices(request: PlanRequest, cluster: Cluster, num_blocks: int, dp: int = 1) -> list[int]:
    n = cluster.num_devices // dp
    if request.num_stages is not None:
        s = request.num_stages
        if s < 1 or s > n:
            raise InputError(f"num_stages={s} must be between 1 and the {n} devices of each of {dp} "
                             f"replica(s) ({cluster.num_devices} devices)")
        if s > num_blocks:
            raise PlanError(
                f"num_stages={s} but the model splits into only {num_blocks} blocks even one op per "
                f"block; use num_stages <= {num_blocks}"
            )
        return [s]
    return list(range(1, min(n, num_blocks) + 1))


def build_problem(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                  num_stages: int, num_microbatches: int, schedule: str, dp: int = 1, *,
                  virtual_stages: int = 1, data_parallel_mode: str = "ddp") -> PipelineProblem:
    """The ILP instance for S stages on the first replica's R = S / v devices, costs per microbatch.

    Stage s runs on device s % R. With v > 1 each stage gets 1/v of its device's
    memory: a linear stand-in for the device's sum that keeps the ILP per stage
    (conservative; balanced stages use about that share anyway).
    """
    scale = _scale(request, num_microbatches, dp)
    num_ranks = num_stages // virtual_stages
    devices = [cluster.devices[s % num_ranks] for s in range(num_stages)]
    fwd, bwd = stage_seconds(graph, [d.name for d in devices], scale, request.training)
    keeps = keeps_model_outputs(num_stages, dp, data_parallel_mode)
    state = np.array([block_state_bytes(b, request, dp, data_parallel_mode)
                      + returned_output_bytes(b, request, num_microbatches, scale, keeps) for b in graph.blocks])
    grads = np.array([block_gradient_bytes(b, request, dp, data_parallel_mode) for b in graph.blocks])
    activations = np.array([activation_bytes(b) * scale if request.training else 0.0 for b in graph.blocks])
    transient = np.array([loss_backward_bytes(b) * scale if request.training else 0.0 for b in graph.blocks])
    links = [cluster.link(s % num_ranks, (s + 1) % num_ranks) for s in range(num_stages - 1)]
    return PipelineProblem(
        block_names=tuple(b.name for b in graph.blocks),
        fwd_seconds=fwd,
        bwd_seconds=bwd,
        state_bytes=state,
        activation_bytes=activations,
        gradient_bytes=grads,
        transient_bytes=transient,
        edges=graph.edges,
        values=tuple(ValueFlow(producer=v.producer, consumers=v.consumers,
                               num_bytes=int(math.ceil(v.num_bytes * scale))) for v in graph.values),
        memory_capacity=np.array([d.memory_bytes / virtual_stages for d in devices], dtype=float),
        link_latency=np.array([link.latency_s for link in links]),
        link_bandwidth=np.array([link.bandwidth for link in links]),
        num_microbatches=num_microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
    )


def _scale(request: PlanRequest, num_microbatches: int, dp: int = 1) -> float:
    """Costs of one microbatch relative to the traced batch."""
    return request.batch_size / dp / num_microbatches / request.traced_batch_size


def activation_bytes(block) -> int:
    """Bytes a block keeps per microbatch in flight (traced batch): what autograd saves, plus,
    for the block computing the model's outputs, the float32 log-softmax of them that a
    cross-entropy loss saves (the loss function is not traced; cross-entropy is assumed)."""
    return block.saved_bytes + block.model_output_float32_bytes


def loss_backward_bytes(block) -> int:
    """Bytes the loss's backward holds at once, beyond what is saved (traced batch): cross-entropy's
    two float32 gradients of its logits' size (nll_loss's, then log_softmax's). With them the
    one-H200 step of a bf16 GPT 24×2048 at batch 16 comes out within 4% of
    `torch.cuda.max_memory_allocated` (benchmarks/single_gpu_step.py)."""
    return 2 * block.model_output_float32_bytes


def returned_output_bytes(block, request: PlanRequest, num_microbatches: int, scale: float,
                          keeps: bool = True) -> float:
    """Model outputs of every microbatch, which the last stage keeps until the training step
    returns them all (torch.distributed.pipelining merges them at the end); 0 for inference,
    and 0 when the runtime does not keep them (`keeps_model_outputs`)."""
    return block.model_output_bytes * scale * num_microbatches if request.training and keeps else 0.0


def keeps_model_outputs(num_stages: int, dp: int, mode: str) -> bool:
    """Whether the runtime keeps every microbatch's model output to the step's end: a pipelining
    schedule does, one stage under DDP does not (runtime/distributed.py accumulates its
    microbatches itself, each output freed by its backward)."""
    return not (num_stages == 1 and dp > 1 and mode == "ddp")


def _unsharded_fraction(request: PlanRequest, mode: str, dp: int) -> float:
    """Size of FSDP's gathered parameters and unreduced gradients relative to the float32 master
    copy: half under bf16 mixed precision (MixedPrecisionPolicy(param_dtype=bfloat16))."""
    return 0.5 if mode == "fsdp" and dp > 1 and request.mixed_precision == "bf16" else 1.0


def block_state_bytes(block, request: PlanRequest, dp: int = 1, mode: str = "ddp") -> float:
    """Parameters + optimizer state + buffers of a block (bytes), held the whole step.

    Under 'fsdp' the optimizer state and the master parameters live in 1/dp shards; the
    gathered full parameters exist during the step too (FSDP2 without resharding between
    microbatches), in bf16 under mixed precision.
    """
    state = float(block.param_bytes + block.buffer_bytes)
    if request.training:
        optimizer = optimizer_state_bytes(block.trainable_param_bytes, request.optimizer)
        if mode == "fsdp" and dp > 1:
            state = (block.param_bytes * _unsharded_fraction(request, mode, dp) + block.buffer_bytes
                     + (optimizer + block.param_bytes) / dp)
        else:
            state += optimizer
    return state


def block_gradient_bytes(block, request: PlanRequest, dp: int = 1, mode: str = "ddp") -> float:
    """Gradients of a block (bytes): allocated by its first backward, kept to the step's end; under
    'fsdp' the unreduced full gradients and the reduced 1/dp shard."""
    if not request.training:
        return 0.0
    grads = float(gradient_bytes(block.trainable_param_bytes))
    if mode == "fsdp" and dp > 1:
        return grads * _unsharded_fraction(request, mode, dp) + grads / dp
    return grads


def lower_bound(problem: PipelineProblem) -> float:
    """(m + S - 1) · max(largest block, total work / S), each block at its fastest device."""
    per_block = (problem.fwd_seconds + problem.bwd_seconds).min(axis=1)
    slot = max(per_block.max(), per_block.sum() / problem.num_stages)
    return problem.step_factor() * slot


def _shortfall(problem: PipelineProblem) -> float:
    """Bytes by which the whole model misses the cluster's total memory (≤ 0: fits in sum)."""
    need = problem.held_bytes.sum() + problem.activation_bytes.sum() * problem.in_flight(0)
    return float(need - problem.memory_capacity.sum())


def _binding(problem: PipelineProblem, solution: PipelineSolution) -> str:
    slowest = int(np.argmax(solution.stage_seconds))
    fullest = int(np.argmax(np.array(solution.stage_memory_bytes) / problem.memory_capacity))
    used = solution.stage_memory_bytes[fullest] / problem.memory_capacity[fullest]
    return (f"slowest stage {slowest} ({solution.stage_seconds[slowest] * 1e3:.3f} ms/microbatch); "
            f"fullest stage {fullest} at {used:.1%} of memory")


def _infeasible_error(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                      failures: list[tuple[float, str]]) -> PlanError:
    closest = min(failures, key=lambda f: f[0])[1] if failures else "no candidate was tried"
    fits = min_devices_that_fit(graph, cluster, request)
    hint = (f"the smallest count of {cluster.devices[0].name} devices that fits is {fits}"
            if fits else f"even {8 * cluster.num_devices} devices do not fit")
    return PlanError(
        f"no pipeline plan fits {cluster.num_devices} device(s). Closest attempt: {closest}\n"
        f"  {hint}; or keep fewer microbatches in flight (schedule='1f1b'), a smaller batch, "
        "or a lighter optimizer (optimizer='sgd')."
    )


def min_devices_that_fit(graph: BlockGraph, cluster: Cluster, request: PlanRequest) -> int | None:
    """Smallest number of devices like the cluster's first that hold the model, greedily packed.

    Blocks are packed in order into consecutive stages, each filled as far as
    its memory allows, with the most microbatches (m = batch, 1F1B in flight),
    which is optimal for a chain (an exchange argument).
    """
    capacity = cluster.devices[0].memory_bytes
    m = microbatch_choices(request)[-1]
    state = [block_state_bytes(b, request) + block_gradient_bytes(b, request)
             + returned_output_bytes(b, request, m, _scale(request, m)) for b in graph.blocks]
    acts = [activation_bytes(b) * _scale(request, m) if request.training else 0.0 for b in graph.blocks]
    for count in range(1, 8 * cluster.num_devices + 1):
        stage, used_state, used_acts = 0, 0.0, 0.0
        fits = True
        for s_bytes, a_bytes in zip(state, acts):
            in_flight = min(m, count - stage)
            if used_state + s_bytes + (used_acts + a_bytes) * in_flight > capacity:
                stage += 1
                used_state, used_acts = 0.0, 0.0
                in_flight = min(m, count - stage) if stage < count else 0
                if stage >= count or s_bytes + a_bytes * in_flight > capacity:
                    fits = False
                    break
            used_state += s_bytes
            used_acts += a_bytes
        if fits:
            return count
    return None


def _plan(graph: BlockGraph, cluster: Cluster, request: PlanRequest, model_class: str,
          problem: PipelineProblem, solution: PipelineSolution, candidates: list[Candidate],
          plan_seconds: float, num_problems: int, dp: int, step_seconds: float, mode: str = "ddp") -> Plan:
    num_stages, num_ranks = problem.num_stages, problem.num_ranks
    m = problem.num_microbatches
    scale = _scale(request, m, dp)
    stages = []
    for s in range(num_stages):
        members = [i for i, stage in enumerate(solution.stage_of_block) if stage == s]
        blocks = [graph.blocks[i] for i in members]
        device = cluster.devices[s % num_ranks]
        send = sum(v.num_bytes for v in problem.values
                   if solution.stage_of_block[v.producer] <= s < max(solution.stage_of_block[c] for c in v.consumers))
        recv = sum(v.num_bytes for v in problem.values
                   if solution.stage_of_block[v.producer] < s <= max(solution.stage_of_block[c] for c in v.consumers))
        fwd = float(problem.fwd_seconds[members, s].sum())
        bwd = float(problem.bwd_seconds[members, s].sum())
        stages.append(StagePlan(
            index=s, device=s % num_ranks, device_name=device.name,
            blocks=tuple(b.name for b in blocks),
            node_names=tuple(n for b in blocks for n in b.node_names),
            fwd_seconds=fwd, bwd_seconds=bwd,
            comm_seconds=max(0.0, solution.stage_seconds[s] - fwd - bwd),
            fwd_flops=int(sum(b.fwd_flops for b in blocks) * scale),
            bwd_flops=int(sum(b.bwd_flops for b in blocks) * scale) if request.training else 0,
            num_params=sum(elements for _, _, _, elements in _unique_parameters(blocks)),
            send_bytes=int(send),
            memory=_stage_memory(problem, s, members, blocks, request, dp, mode, send + recv),
        ))
    return Plan(
        model_class=model_class,
        batch_size=request.batch_size,
        num_microbatches=m,
        schedule=problem.schedule,
        optimizer=request.optimizer,
        mesh=Mesh(pp=num_ranks, dp=dp),
        virtual_stages=problem.virtual_stages,
        data_parallel_mode=mode,
        mixed_precision=request.mixed_precision,
        cluster=cluster.to_dict(),
        stages=tuple(stages),
        predicted_step_seconds=step_seconds,
        bubble_fraction=bubble_fraction(problem.schedule, num_ranks, m, problem.virtual_stages, request.training),
        idle_devices=tuple(range(num_ranks * dp, cluster.num_devices)),
        solver=SolverInfo(backend=solution.backend, status=solution.status,
                          objective_seconds=solution.step_seconds, bound_seconds=solution.bound_seconds,
                          solve_seconds=solution.solve_seconds, plan_seconds=plan_seconds,
                          num_problems=num_problems),
        candidates=tuple(candidates),
    )
