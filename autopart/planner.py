"""Search over pipeline configurations: replicas, pipeline ranks, virtual stages,
microbatch counts, schedules, and how the replicas synchronise (DDP or FSDP).

The values tried for each (or the one the user fixed) come from
autopart/plan_choices.py. For each candidate (dp replicas, R ranks × v stages each, m microbatches,
schedule, dp mode) the block graph becomes a `PipelineProblem` (costs scaled to
one microbatch) and the ILP places the blocks. Candidates whose lower bound cannot beat the best found are pruned
without a solve. The best candidate becomes the `Plan`.

Scaling to a microbatch: the graph is traced at one microbatch size
(`traced_batch_size`); FLOPs, roofline time, saved activations and
boundary bytes are linear in the batch, so a candidate with microbatches of b
samples scales them by b / traced size; per-op launch floors do not scale
(`BlockTimes`).
"""

from __future__ import annotations

import math
import sys
import time
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
from autopart.errors import InputError, PlanError
from autopart.passes.blocks import BlockGraph
from autopart.plan import Candidate, Mesh, Plan, SolverInfo, StageMemory, StagePlan
from autopart.plan_choices import (
    PlanRequest,
    data_parallel_choices,
    data_parallel_mode_choices,
    microbatch_choices,
    pipeline_choices,
    schedule_choices,
    virtual_stage_choices,
)
from autopart.problems import PipelineProblem, PipelineSolution, ValueFlow
from autopart.schedules import bubble_fraction
from autopart.solver import solve_pipeline


# The integer program, always: on chains of blocks the solver's exact dynamic
# program ("auto") is ~10x faster, but the ILP also takes DAGs and is what the
# joint tensor-parallel model builds on; 24 solves of a 26-block chain take
# about 0.16 s (benchmarks/solver_backends.py).
SOLVER_BACKEND = "cpsat"

def plan_pipeline(graph: BlockGraph, cluster: Cluster, request: PlanRequest, model_class: str, *,
                  traced_batch_size: int) -> Plan:
    """The fastest feasible dp × pp plan for `graph` (costed at `traced_batch_size` samples) on `cluster`."""
    started = time.perf_counter()
    schedules = schedule_choices(request)
    best: tuple[float, PipelineSolution, PipelineProblem, int, str] | None = None
    candidates: list[Candidate] = []
    failures: list[tuple[float, str]] = []
    skipped: list[str] = []  # why fixed choices left a (schedule, ranks, microbatches) without any plan
    num_problems = 0
    # Most replicas first: the plans that data parallelism alone makes fast are found early,
    # so the lower bound prunes the deeper pipelines without solving them.
    for dp in sorted(data_parallel_choices(request, cluster), reverse=True):
        for num_ranks in pipeline_choices(request, cluster, len(graph.blocks), dp):
            for m in microbatch_choices(request, dp):
                for schedule in schedules:
                    if schedule == "gpipe" and num_ranks == 1 and "1f1b" in schedules:
                        continue  # one stage: GPipe is 1F1B with more in flight
                    for v in virtual_stage_choices(request, schedule, num_ranks, m, len(graph.blocks), skipped):
                        for mode in data_parallel_mode_choices(request, dp):
                            tried = dict(data_parallel=dp, pipeline_parallel=num_ranks, num_microbatches=m,
                                         schedule=schedule, virtual_stages=v, data_parallel_mode=mode)
                            problem = build_problem(graph, cluster, request, num_ranks * v, m, schedule, dp,
                                                    virtual_stages=v, data_parallel_mode=mode,
                                                    traced_batch_size=traced_batch_size)
                            bound = lower_bound(problem) + sync_lower_bound(graph, cluster, request, problem, dp,
                                                                            mode)
                            if best is not None and bound >= best[0]:
                                candidates.append(Candidate(
                                    **tried, step_seconds=None, status="pruned",
                                    detail=f"lower bound {bound:.3g} s >= best {best[0]:.3g} s"))
                                continue
                            num_problems += 1
                            try:
                                solution = solve_pipeline(problem, backend=SOLVER_BACKEND)
                            except PlanError as error:
                                failures.append((_shortfall(problem), str(error)))
                                candidates.append(Candidate(**tried, step_seconds=None, status="infeasible",
                                                            detail=str(error).splitlines()[0]))
                                continue
                            step = solution.step_seconds + optimizer_seconds(
                                graph, cluster, request, problem, solution, dp, mode) + data_parallel_sync_seconds(
                                graph, cluster, request, problem, solution, dp, mode)
                            detail = _binding(problem, solution)
                            candidates.append(Candidate(**tried, step_seconds=step, status="feasible",
                                                        detail=detail))
                            if request.verbose:
                                print(f"  dp={dp} ({mode}) pp={num_ranks}×v{v} m={m} {schedule}: "
                                      f"{step * 1e3:.3f} ms ({detail})", file=sys.stderr)
                            if best is None or step < best[0] * (1 - 1e-9):
                                best = (step, solution, problem, dp, mode)
    if not candidates and skipped:
        raise InputError(f"no plan satisfies the choices fixed: {skipped[0]}")
    if best is None:
        raise _infeasible_error(graph, cluster, request, failures, traced_batch_size)
    step, solution, problem, dp, mode = best
    chosen = (dp, problem.num_ranks, problem.num_microbatches, problem.schedule, problem.virtual_stages, mode)
    candidates = [
        Candidate(**{**c.__dict__, "status": "chosen"})
        if (c.data_parallel, c.pipeline_parallel, c.num_microbatches, c.schedule, c.virtual_stages,
            c.data_parallel_mode) == chosen and c.status == "feasible"
        else c
        for c in candidates
    ]
    return _plan(graph, cluster, request, traced_batch_size, model_class, problem, solution, candidates,
                 time.perf_counter() - started, num_problems, dp, step, mode)


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


def build_problem(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                  num_stages: int, num_microbatches: int, schedule: str, dp: int = 1, *,
                  virtual_stages: int = 1, data_parallel_mode: str = "ddp", traced_batch_size: int) -> PipelineProblem:
    """The ILP instance for S stages on the first replica's R = S / v devices, costs per microbatch.

    Stage s runs on device s % R. With v > 1 each stage gets 1/v of its device's
    memory: a linear stand-in for the device's sum that keeps the ILP per stage
    (conservative; balanced stages use about that share anyway).
    """
    scale = _scale(request, traced_batch_size, num_microbatches, dp)
    num_ranks = num_stages // virtual_stages
    devices = [cluster.devices[s % num_ranks] for s in range(num_stages)]
    fwd = np.array([[b.time_on(d.name).fwd(scale) + loss_seconds(b, d, scale, request)[0] for d in devices]
                    for b in graph.blocks])
    if request.training:
        bwd = np.array([[b.time_on(d.name).bwd(scale) + loss_seconds(b, d, scale, request)[1] for d in devices]
                        for b in graph.blocks])
    else:
        bwd = np.zeros_like(fwd)
    state = np.array([block_state_bytes(b, request, dp, data_parallel_mode)
                      + returned_output_bytes(b, request, num_microbatches, scale) for b in graph.blocks])
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


def _scale(request: PlanRequest, traced_batch_size: int, num_microbatches: int, dp: int = 1) -> float:
    """Costs of one microbatch relative to the traced batch."""
    return request.batch_size / dp / num_microbatches / traced_batch_size


def activation_bytes(block) -> int:
    """Bytes a block keeps per microbatch in flight (traced batch): what autograd saves, plus,
    for the block computing the model's outputs, the float32 log-softmax of them that a
    cross-entropy loss saves (the loss function is not traced; cross-entropy is assumed)."""
    return block.saved_bytes + block.model_output_float32_bytes


def loss_seconds(block, device, scale: float, request: PlanRequest) -> tuple[float, float]:
    """(forward, backward) seconds of the loss on the block's model outputs: cross-entropy, as
    assumed for memory. With F the float32 size of the logits, it streams about 3F forward
    (the float32 conversion, log-softmax's read and write) and 5F backward (nll_loss's
    gradient written, log-softmax's backward reading 2F and writing F, the conversion back),
    memory bound at the device's achieved bandwidth. 0 for blocks without outputs and for
    inference."""
    if not block.model_output_float32_bytes or not request.training:
        return 0.0, 0.0
    per_byte = block.model_output_float32_bytes * scale / device.achieved_bandwidth
    return 3 * per_byte, 5 * per_byte


def loss_backward_bytes(block) -> int:
    """Bytes the loss's backward holds at once, beyond what is saved (traced batch): cross-entropy's
    two float32 gradients of its logits' size (nll_loss's, then log_softmax's). With them the
    one-H200 step of a bf16 GPT 24×2048 at batch 16 comes out within 4% of
    `torch.cuda.max_memory_allocated` (benchmarks/single_gpu_step.py)."""
    return 2 * block.model_output_float32_bytes


def returned_output_bytes(block, request: PlanRequest, num_microbatches: int, scale: float) -> float:
    """Model outputs of every microbatch, which the last stage keeps until the training step
    returns them all (torch.distributed.pipelining merges them at the end); 0 for inference."""
    return block.model_output_bytes * scale * num_microbatches if request.training else 0.0


@dataclass(frozen=True, kw_only=True)
class StateBytes:
    """What a device of one replica holds of some parameters' state, by kind (bytes)."""

    params: float
    grads: float
    optimizer: float
    buffers: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers


def state_bytes(param_bytes: float, trainable_param_bytes: float, buffer_bytes: float, request: PlanRequest,
                dp: int = 1, mode: str = "ddp") -> StateBytes:
    """Parameters, gradients, optimizer state and buffers of parameters of these sizes, per device.

    'ddp' (or inference, or one replica): everything whole; gradients and
    optimizer state only for trainable parameters when training. 'fsdp': the
    optimizer state lives in 1/dp shards, next to 1/dp shards of the parameters
    and gradients (the master copies); the full parameters and the accumulated
    full gradients exist during the step too (FSDP2 without resharding between
    microbatches): params and grads × (u + 1/dp), optimizer / dp, where the
    gathered copies' size u is 1, or 1/2 under bf16 mixed precision
    (MixedPrecisionPolicy(param_dtype=bfloat16) gathers and reduces in bf16).
    """
    shards = dp if mode == "fsdp" and dp > 1 and request.training else 1
    trainable = trainable_param_bytes if request.training else 0
    gathered = 0.5 if request.mixed_precision == "bf16" else 1.0
    copies = gathered + 1 / shards if shards > 1 else 1
    return StateBytes(params=param_bytes * copies, grads=gradient_bytes(trainable) * copies,
                      optimizer=optimizer_state_bytes(trainable, request.optimizer) / shards,
                      buffers=float(buffer_bytes))


def block_state_bytes(block, request: PlanRequest, dp: int = 1, mode: str = "ddp") -> float:
    """Parameters + optimizer state + buffers of a block (bytes; `state_bytes`), held the whole step."""
    state = state_bytes(block.param_bytes, block.trainable_param_bytes, block.buffer_bytes, request, dp, mode)
    return state.total - state.grads


def block_gradient_bytes(block, request: PlanRequest, dp: int = 1, mode: str = "ddp") -> float:
    """Gradients of a block (bytes; `state_bytes`): allocated by its first backward, kept to the step's end."""
    return state_bytes(block.param_bytes, block.trainable_param_bytes, block.buffer_bytes, request, dp, mode).grads


def lower_bound(problem: PipelineProblem) -> float:
    """(m + S - 1) · max(largest block, total work / S), each block at its fastest device."""
    per_block = (problem.fwd_seconds + problem.bwd_seconds).min(axis=1)
    slot = max(per_block.max(), per_block.sum() / problem.num_stages)
    return problem.step_factor() * slot


def _shortfall(problem: PipelineProblem) -> float:
    """Bytes by which the whole model misses the cluster's total memory (≤ 0: fits in sum)."""
    need = problem.state_bytes.sum() + problem.activation_bytes.sum() * problem.in_flight(0)
    return float(need - problem.memory_capacity.sum())


def _binding(problem: PipelineProblem, solution: PipelineSolution) -> str:
    slowest = int(np.argmax(solution.stage_seconds))
    fullest = int(np.argmax(np.array(solution.stage_memory_bytes) / problem.memory_capacity))
    used = solution.stage_memory_bytes[fullest] / problem.memory_capacity[fullest]
    return (f"slowest stage {slowest} ({solution.stage_seconds[slowest] * 1e3:.3f} ms/microbatch); "
            f"fullest stage {fullest} at {used:.1%} of memory")


def _infeasible_error(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                      failures: list[tuple[float, str]], traced_batch_size: int) -> PlanError:
    closest = min(failures, key=lambda f: f[0])[1] if failures else "no candidate was tried"
    fits = min_devices_that_fit(graph, cluster, request, traced_batch_size)
    hint = (f"the smallest count of {cluster.devices[0].name} devices that fits is {fits}"
            if fits else f"even {8 * cluster.num_devices} devices do not fit")
    return PlanError(
        f"no pipeline plan fits {cluster.num_devices} device(s). Closest attempt: {closest}\n"
        f"  {hint}; or keep fewer microbatches in flight (schedule='1f1b'), a smaller batch, "
        "or a lighter optimizer (optimizer='sgd')."
    )


def min_devices_that_fit(graph: BlockGraph, cluster: Cluster, request: PlanRequest,
                         traced_batch_size: int) -> int | None:
    """Smallest number of devices like the cluster's first that hold the model, greedily packed.

    Blocks are packed in order into consecutive stages, each filled as far as
    its memory allows, with the most microbatches (m = batch, 1F1B in flight),
    which is optimal for a chain (an exchange argument).
    """
    capacity = cluster.devices[0].memory_bytes
    m = microbatch_choices(request)[-1]
    scale = _scale(request, traced_batch_size, m)
    state = [block_state_bytes(b, request) + block_gradient_bytes(b, request) + returned_output_bytes(b, request, m, scale)
             for b in graph.blocks]
    acts = [activation_bytes(b) * scale if request.training else 0.0 for b in graph.blocks]
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


def _plan(graph: BlockGraph, cluster: Cluster, request: PlanRequest, traced_batch_size: int, model_class: str,
          problem: PipelineProblem, solution: PipelineSolution, candidates: list[Candidate],
          plan_seconds: float, num_problems: int, dp: int, step_seconds: float, mode: str = "ddp") -> Plan:
    num_stages, num_ranks = problem.num_stages, problem.num_ranks
    m = problem.num_microbatches
    scale = _scale(request, traced_batch_size, m, dp)
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
            memory=_stage_memory(problem, s, members, blocks, request, dp, mode, send + recv, scale),
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


def _stage_memory(problem: PipelineProblem, s: int, members: list[int], blocks, request: PlanRequest, dp: int,
                  mode: str, boundary_bytes: float, scale: float) -> StageMemory:
    """What stage `s` holds at its peak, by kind (`PipelineProblem.stage_memory_terms`): at the peak
    of activations the gradients exist only if an earlier microbatch's backward ran. A parameter
    read by several blocks of the stage (tied weights) is counted once."""
    k = problem.in_flight(s)
    first, second = problem.stage_memory_terms(s)
    at_activation_peak = first[members].sum() >= second[members].sum()
    unique = _unique_parameters(blocks)
    state = state_bytes(sum(size for _, size, _, _ in unique), sum(size for _, size, train, _ in unique if train),
                        sum(b.buffer_bytes for b in blocks), request, dp, mode)
    grads = state.grads
    if at_activation_peak and problem.num_microbatches <= k:
        grads = 0.0  # the first backward has not run yet
    held = k if at_activation_peak else max(k - 1, 0)
    transient = problem.transient_bytes[members].sum() if problem.transient_bytes is not None else 0.0
    activations = (float(problem.activation_bytes[members].sum()) * held
                   + (float(transient) if at_activation_peak else 0.0)
                   + sum(returned_output_bytes(b, request, problem.num_microbatches, scale) for b in blocks))
    return StageMemory(
        params=int(state.params), grads=int(grads), optimizer=int(state.optimizer), buffers=int(state.buffers),
        activations=int(activations), boundary=int(boundary_bytes * k), capacity=int(problem.memory_capacity[s]),
    )
