"""The chosen candidate as a `Plan`: stages, their times and their memory by kind."""

from __future__ import annotations

import math
from typing import Sequence

from autopart.cost_models import Cluster, optimizer_state_bytes
from autopart.core.blocks import Block, BlockGraph
from autopart.core.plan import Candidate, ExpertsPlan, Mesh, Plan, SolverInfo, StageMemory, StagePlan
from autopart.core.modes import reshards_parameters
from autopart.core.problems import PipelineProblem, PipelineSolution
from autopart.core.schedules import bubble_fraction
from autopart.axes.data import data_parallel_sync_seconds
from autopart.planner.step_costs import (
    fsdp_unit_bytes,
    fsdp_unit_transient_bytes,
    keeps_model_outputs,
    optimizer_seconds,
    recompute_seconds,
    recompute_transient_bytes,
    returned_output_bytes,
    unique_parameters,
)
from autopart.axes.data import unsharded_fraction
from autopart.core.setting import Setting


def experts_plan(graph: BlockGraph, ep: int) -> ExpertsPlan | None:
    """The plan's record of the mixture-of-experts layers (None for a model without)."""
    layers = [b for b in graph.blocks if b.expert_param_bytes]
    if not layers:
        return None
    return ExpertsPlan(layers=tuple(b.name for b in layers), num_experts=math.gcd(*(b.num_experts for b in layers)),
                       weight_bytes=sum(b.expert_param_bytes for b in layers), ep=ep)


def scale_of(request, traced_batch_size: int, num_microbatches: int, dp: int = 1) -> float:
    """Costs of one microbatch relative to the traced batch (of `traced_batch_size` samples)."""
    return request.batch_size / dp / num_microbatches / traced_batch_size


def stage_reserved_bytes(blocks: Sequence[Block], modes: Sequence[str], request, setting: Setting,
                         scale: float) -> tuple[float, float]:
    """(recomputed activations, ZeRO-3 units) a stage of `blocks` holds once, bytes: the largest
    block's rebuilt activations, and the gathered parameters and unreduced gradients of its units."""
    rebuilt = max((recompute_transient_bytes(b, request, setting, mode) * scale for b, mode in zip(blocks, modes)),
                  default=0.0)
    return rebuilt, fsdp_unit_transient_bytes(blocks, request, setting)


def stage_memory(problem: PipelineProblem, s: int, members: list[int], blocks: list[Block], modes: list[str],
                 request, setting: Setting, boundary_bytes: float, capacity: float, scale: float) -> StageMemory:
    """What stage `s` holds at its peak, by kind (`PipelineProblem.stage_memory_terms`): at the peak
    of activations the gradients exist only if an earlier microbatch's backward ran. A parameter
    read by several blocks of the stage (tied weights) is counted once. Recomputation's rebuilt
    activations count as activations, ZeRO-3's gathered parameters as parameters and its unreduced
    gradients as gradients."""
    k = problem.in_flight(s)
    first, second = problem.stage_memory_terms(s)
    at_activation_peak = first[members].sum() >= second[members].sum()
    unique = unique_parameters(blocks)
    params = sum(size for _, size, _, _ in unique)
    trainable = sum(size for _, size, train, _ in unique if train) if request.training else 0
    shards = setting.shards if request.training else 1
    fraction = unsharded_fraction(request, setting)
    rebuilt, _ = stage_reserved_bytes(blocks, modes, request, setting, scale)
    gathered, unreduced = fsdp_unit_bytes(blocks, request, setting)
    held_grads = float(problem.gradient_bytes[members].sum()) if problem.gradient_bytes is not None else 0.0
    if shards > 1 and reshards_parameters(setting.mode) and problem.num_stages > 1:
        held_grads -= params * fraction  # kept gathered after the first backward: parameters, below
        gathered += params * fraction if not (at_activation_peak and problem.num_microbatches <= k) else 0.0
    grads = held_grads + unreduced
    if at_activation_peak and problem.num_microbatches <= k:
        grads = unreduced  # the first backward has not run yet
    if shards > 1 and not reshards_parameters(setting.mode):
        param_held = params * (fraction + 1 / shards)
    elif shards > 1:
        param_held = params / shards + gathered
    else:
        param_held = params
    held = k if at_activation_peak else max(k - 1, 0)
    activations = (float(problem.activation_bytes[members].sum()) * held
                   + (float(problem.transient_bytes[members].sum())
                      if at_activation_peak and problem.transient_bytes is not None else 0.0)
                   + sum(returned_output_bytes(b, request, problem.num_microbatches, scale,
                                         keeps_model_outputs(problem.num_stages, setting.dp)) for b in blocks)
                   + rebuilt)
    return StageMemory(
        params=int(param_held),
        grads=int(max(grads, 0.0)),
        optimizer=int(optimizer_state_bytes(trainable, request.optimizer) / shards) if request.training else 0,
        buffers=int(sum(b.buffer_bytes for b in blocks)),
        activations=int(activations),
        boundary=int(boundary_bytes * k),
        capacity=int(capacity),
    )


def assemble_plan(graph: BlockGraph, cluster: Cluster, request, traced_batch_size: int, model_class: str,
                  problem: PipelineProblem, solution: PipelineSolution, candidates: list[Candidate],
                  plan_seconds: float, num_problems: int, setting: Setting, step_seconds: float) -> Plan:
    """The `Plan` of the chosen candidate (`graph` costed at `traced_batch_size` samples)."""
    num_stages, num_ranks = problem.num_stages, problem.num_ranks
    m = problem.num_microbatches
    scale = scale_of(request, traced_batch_size, m, setting.dp)
    stages = []
    for s in range(num_stages):
        members = [i for i, stage in enumerate(solution.stage_of_block) if stage == s]
        blocks = [graph.blocks[i] for i in members]
        modes = [setting.recompute_of(i) for i in members]
        device = cluster.devices[s % num_ranks]
        send = sum(v.num_bytes for v in problem.values
                   if solution.stage_of_block[v.producer] <= s < max(solution.stage_of_block[c] for c in v.consumers))
        recv = sum(v.num_bytes for v in problem.values
                   if solution.stage_of_block[v.producer] < s <= max(solution.stage_of_block[c] for c in v.consumers))
        fwd = float(problem.fwd_seconds[members, s].sum())
        bwd = float(problem.bwd_seconds[members, s].sum())
        replay = (sum(recompute_seconds(b, device.name, mode, scale, problem.schedule)
                      for b, mode in zip(blocks, modes)) if request.training else 0.0)
        stages.append(StagePlan(
            index=s, device=s % num_ranks, device_name=device.name,
            blocks=tuple(b.name for b in blocks),
            node_names=tuple(n for b in blocks for n in b.node_names),
            fwd_seconds=fwd, bwd_seconds=bwd,
            comm_seconds=max(0.0, solution.stage_seconds[s] - fwd - bwd),
            fwd_flops=int(sum(b.fwd_flops for b in blocks) * scale),
            bwd_flops=int(sum(b.bwd_flops for b in blocks) * scale) if request.training else 0,
            num_params=sum(elements for _, _, _, elements in unique_parameters(blocks)),
            send_bytes=int(send),
            memory=stage_memory(problem, s, members, blocks, modes, request, setting, send + recv,
                                device.memory_bytes / problem.virtual_stages, scale),
            recompute=tuple(modes) if any(mode != "none" for mode in modes) else (),
            recompute_seconds=replay,
        ))
    return Plan(
        model_class=model_class,
        batch_size=request.batch_size,
        num_microbatches=m,
        schedule=problem.schedule,
        optimizer=request.optimizer,
        mesh=Mesh(pp=num_ranks, dp=setting.dp, dp_shard=setting.shards, ep=setting.ep, cp=setting.cp),
        virtual_stages=problem.virtual_stages,
        data_parallel_mode=setting.mode,
        mixed_precision=request.mixed_precision,
        compile_kernels=request.compile_kernels,
        experts=experts_plan(graph, setting.ep),
        cluster=cluster.to_dict(),
        stages=tuple(stages),
        predicted_step_seconds=step_seconds,
        data_parallel_sync_seconds=data_parallel_sync_seconds(graph, cluster, request, problem, solution, setting),
        optimizer_seconds=optimizer_seconds(graph, cluster, request, problem, solution, setting),
        bubble_fraction=bubble_fraction(problem.schedule, num_ranks, m, problem.virtual_stages, request.training),
        idle_devices=tuple(range(num_ranks * setting.dp, cluster.num_devices)),
        solver=SolverInfo(backend=solution.backend, status=solution.status,
                          objective_seconds=solution.step_seconds, bound_seconds=solution.bound_seconds,
                          solve_seconds=solution.solve_seconds, plan_seconds=plan_seconds,
                          num_problems=num_problems),
        candidates=tuple(candidates),
    )
