"""Expert parallelism: each mixture-of-experts layer's experts split over consecutive replicas.

The axis's degree is `Mesh.ep` (the layout's `expert_parallel`, `Setting.ep`). It adds no
ranks: ep divides the data-parallel replicas, and each group of ep consecutive replicas (of
one pipeline rank and tp index) splits every expert weight [E, K, N] on its expert dim, E / ep
experts each (torchtitan's and Megatron's layout, REFERENCES.md). Tokens reach their experts
and come back by all-to-all (passes/expert_parallel.py). The replicas holding the same
experts (dp / ep of them, the expert-data-parallel group) synchronise those gradients.

Its price lives in the blocks (`expert_dispatch_seconds`, added to each block's forward and
backward by planner/pricing.py): the all-to-alls are on the critical path of every microbatch;
its memory (1/ep of the expert weights, gradients and
optimizer state per rank) is priced per block in planner/step_costs.py (`expert_split`).
Routing is taken as uniform: each rank sends (ep - 1)/ep of its rows away and receives as many.
"""

from __future__ import annotations

import numpy as np

from autopart.axes.base import Axis, GroupRanks, SearchShape, register
from autopart.axes.data import experts_sharded_over_edp
from autopart.core.blocks import BlockGraph
from autopart.core.errors import InputError
from autopart.core.plan import Mesh, Plan
from autopart.core.request import PlanRequest
from autopart.core.setting import Setting
from autopart.cost_models import Cluster, all_reduce_seconds, all_to_all_seconds


def expert_parallel_choices(request: PlanRequest, dp: int, num_experts: int) -> list[int]:
    """Degrees that divide both the replicas and the experts: the one the user fixed (checked), else
    every such degree, 1 first (no model without experts gets another)."""
    fixed = request.expert_parallel
    if fixed is not None:
        if fixed < 1 or (fixed > 1 and (not num_experts or num_experts % fixed or dp % fixed)):
            what = ("the model has no mixture-of-experts layer (no grouped expert matmul)" if not num_experts
                    else f"it must divide the {num_experts} experts per layer and the {dp} data-parallel replicas")
            raise InputError(f"expert_parallel={fixed}: {what}; choose one of "
                             f"{[e for e in range(1, dp + 1) if dp % e == 0 and num_experts and num_experts % e == 0] or [1]}"
                             " (or fix data_parallel to a multiple of it)")
        return [fixed]
    if not num_experts:
        return [1]
    return [e for e in range(1, dp + 1) if dp % e == 0 and num_experts % e == 0]


def ep_group(setting: Setting, num_ranks: int, rank: int) -> list[int]:
    """Devices of the first ep group of pipeline rank `rank`: ep consecutive replicas."""
    return [d * num_ranks + rank for d in range(setting.ep)]


def expert_dispatch_seconds(graph: BlockGraph, cluster: Cluster, setting: Setting, num_ranks: int,
                            num_stages: int, scale: float, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """[num_blocks, num_stages] forward and backward seconds of each block's expert all-to-alls,
    one microbatch (`scale` of the traced batch) on stage s's ep group; zeros at ep = 1.

    Forward sends each routed row to its expert's rank and takes its product back, backward moves
    the same volumes the other way: per pass all_to_all_seconds(n, ep, link), n =
    `Block.expert_rows_bytes` × scale (cost_models.comm: pairwise exchange, (p − 1)α + (p − 1)/p ·
    n/β). Nothing overlaps it (the experts wait for their rows), so it lives in the block's time
    and the pipeline cut balances it like compute."""
    fwd = np.zeros((len(graph.blocks), num_stages))
    if setting.ep == 1:
        return fwd, fwd.copy()
    stages_on: dict = {}   # link → the stages whose ep group it binds (a few distinct links)
    for s in range(num_stages):
        stages_on.setdefault(cluster.link_for_group(ep_group(setting, num_ranks, s % num_ranks)), []).append(s)
    seconds: dict[int, np.ndarray] = {}   # rows bytes → per stage (the MoE layers' blocks are alike)
    for b, block in enumerate(graph.blocks):
        if block.expert_rows_bytes and block.expert_rows_bytes not in seconds:
            row = np.zeros(num_stages)
            for link, stages in stages_on.items():
                row[stages] = all_to_all_seconds(block.expert_rows_bytes * scale, setting.ep, link)
            seconds[block.expert_rows_bytes] = row
        if block.expert_rows_bytes:
            fwd[b] = seconds[block.expert_rows_bytes]
    return fwd, (fwd.copy() if training else np.zeros_like(fwd))


def expert_cast_correction(graph: BlockGraph, devices: list[str], setting: Setting, scale: float, training: bool,
                           free: bool) -> tuple[np.ndarray, np.ndarray]:
    """[num_blocks, num_stages] forward and backward seconds to add to the blocks' times, scaled to a
    microbatch, for their expert weight casts (`Block.expert_cast_times`, mixed precision).

    The blocks price the casts of the whole weights like any op, fixed + scale × scaled; a rank casts
    its own block of E / ep experts whatever the microbatch (fixed + scaled / ep), and nothing where
    FSDP already hands it bf16 weights (`free`: the cast returns its input)."""
    fwd = np.zeros((len(graph.blocks), len(devices)))
    bwd = np.zeros_like(fwd)
    for b, block in enumerate(graph.blocks):
        for s, device in enumerate(devices):
            t = next((t for t in block.expert_cast_times if t.device == device), None)
            if t is None:
                continue
            fwd[b, s] = (0.0 if free else t.fwd_fixed_s + t.fwd_scaled_s / setting.ep) - (
                t.fwd_fixed_s + scale * t.fwd_scaled_s)
            if training:
                bwd[b, s] = (0.0 if free else t.bwd_fixed_s + t.bwd_scaled_s / setting.ep) - (
                    t.bwd_fixed_s + scale * t.bwd_scaled_s)
    return fwd, bwd


def expert_gradient_sync_seconds(graph: BlockGraph, cluster: Cluster, request, problem, solution,
                                 setting: Setting) -> float:
    """Exposed seconds of the expert blocks' gradient sum after the last backward, the slowest
    pipeline rank's: a ring all-reduce of its expert gradients / ep over the dp / ep replicas
    holding the same experts (cost_models.comm), not overlapped (the runner reduces after the step's
    backward, like the pipelined dense parameters)."""
    edp = setting.dp // setting.ep
    if setting.ep == 1 or edp == 1 or not request.training or experts_sharded_over_edp(setting):
        return 0.0   # under ZeRO, FSDP reduces them over edp: priced with the data axis (axes/data.py)
    worst = 0.0
    for rank in range(problem.num_ranks):
        stages = set(range(rank, problem.num_stages, problem.num_ranks))
        held = sum(graph.blocks[b].expert_trainable_param_bytes for b, stage in enumerate(solution.stage_of_block)
                   if stage in stages) / setting.ep
        group = [d * problem.num_ranks + rank for d in range(0, setting.dp, setting.ep)]
        worst = max(worst, all_reduce_seconds(held, edp, cluster.link_for_group(group)))
    return worst


def _degrees(request: PlanRequest, cluster: Cluster, shape: SearchShape) -> list[int]:
    return expert_parallel_choices(request, shape.degrees.get("dp", 1), shape.num_experts)


def _groups(mesh: Mesh) -> GroupRanks:
    """'ep': each ep consecutive replicas of each (stage, tp index), the all-to-alls' group; 'edp':
    the replicas holding the same experts (one per ep group), whose expert gradients are summed."""
    if mesh.ep == 1:
        return {}
    replicas = [[mesh.rank_of(d, stage, t) for d in range(mesh.dp)] for stage in range(mesh.pp)
                for t in range(mesh.tp)]
    groups: GroupRanks = {"ep": [ranks[start:start + mesh.ep] for ranks in replicas
                                 for start in range(0, mesh.dp, mesh.ep)]}
    groups["edp"] = [ranks[offset::mesh.ep] for ranks in replicas for offset in range(mesh.ep)]
    return groups


def _describe(plan: Plan) -> str:
    return f"ep={plan.mesh.ep}" if plan.mesh.ep > 1 else ""


EXPERT = register(Axis(name="ep", title="expert parallel", degrees=_degrees, groups=_groups, describe=_describe,
                       step_seconds=expert_gradient_sync_seconds))
