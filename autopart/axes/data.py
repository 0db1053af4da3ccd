"""Data parallelism: replicas of the pipeline, and how they hold and synchronise the training state.

The axis's degree is `Mesh.dp` (with `Mesh.dp_shard`, the replicas FSDP shards
over) and the layout's `data_parallel`, `data_parallel_mode` and `dp_shard`. The
modes are `core.modes.DATA_PARALLEL_MODES` (DDP, ZeRO-2, ZeRO-3, HSDP). Its price
is the exposed synchronisation per step (`data_parallel_sync_seconds`, bounded
before a solve by `sync_lower_bound`); the memory each mode saves is priced per
block in planner/step_costs.py. Collectives follow cost_models.comm (ring
algorithms, Thakur et al. 2005). Replicas are the slowest axis of the rank layout
(`Mesh.rank_of`).
"""

from __future__ import annotations

from typing import Sequence

from autopart.axes.base import Axis, GroupRanks, SearchShape, register
from autopart.axes.context import batch_divides
from autopart.axes.pipeline import microbatch_choices
from autopart.core.blocks import BlockGraph
from autopart.core.errors import InputError
from autopart.core.modes import DATA_PARALLEL_MODES, data_parallel_mode_name, reshards_parameters, shards_state
from autopart.core.plan import Mesh, Plan
from autopart.core.request import PlanRequest
from autopart.core.setting import Setting
from autopart.cost_models import (
    Cluster,
    all_gather_seconds,
    all_reduce_seconds,
    gradient_bytes,
    reduce_scatter_seconds,
)


def data_parallel_choices(request: PlanRequest, cluster: Cluster, sequence_length: int | None = None) -> list[int]:
    """Replica counts that divide the device count, and whose groups of cp replicas divide the batch
    for some context-parallel degree cp the search may try (axes/context.py; only cp = 1 where no
    sequence of `sequence_length` tokens can be split; None: not traced yet, any cp may)."""
    n, batch = cluster.num_devices, request.batch_size
    cp = request.context_parallel or 1
    if request.pipeline_parallel is not None and not 1 <= request.pipeline_parallel <= n:
        raise InputError(f"pipeline_parallel={request.pipeline_parallel} must be between 1 and the {n} devices "
                         "of the cluster")
    if request.data_parallel is not None:
        dp = request.data_parallel
        if dp < 1 or n % dp or not batch_divides(request, dp, sequence_length):
            groups = "" if cp == 1 else f" (in groups of context_parallel={cp})"
            raise InputError(
                f"data_parallel={dp} must divide both the {n} devices and{groups} the batch of {batch} samples; "
                f"choose one of {[d for d in range(1, n + 1) if n % d == 0 and d % cp == 0 and batch % (d // cp) == 0]}"
            )
        return [dp]
    fixed_ranks = request.pipeline_parallel or 1
    choices = [d for d in range(1, n + 1) if n % d == 0 and d * fixed_ranks <= n
               and batch_divides(request, d, sequence_length)]
    if request.num_microbatches is not None:
        if not choices:
            microbatch_choices(request, 1)  # raises the error that names the batch and the divisors
    return choices


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


def unsharded_fraction(request, setting: Setting) -> float:
    """Size of FSDP's gathered parameters and unreduced gradients relative to the float32 master
    copy: half under bf16 mixed precision (MixedPrecisionPolicy(param_dtype=bfloat16)), else 1."""
    return 0.5 if setting.shards > 1 and request.mixed_precision == "bf16" else 1.0


def dp_group(setting: Setting, num_ranks: int, rank: int) -> list[int]:
    """Devices (of one replica's R pipeline ranks each) holding pipeline rank `rank`'s replicas."""
    return [d * num_ranks + rank for d in range(setting.dp)]


def shard_group(setting: Setting, num_ranks: int, rank: int) -> list[int]:
    """The first shard group of pipeline rank `rank`: dp_shard consecutive replicas."""
    return [d * num_ranks + rank for d in range(setting.dp_shard)]


def replicate_group(setting: Setting, num_ranks: int, rank: int) -> list[int]:
    """The replicas holding the same shard (HSDP: one per host)."""
    return [d * num_ranks + rank for d in range(0, setting.dp, setting.dp_shard)]


def data_parallel_sync_seconds(graph: BlockGraph, cluster: Cluster, request, problem, solution,
                               setting: Setting) -> float:
    """Exposed time of the data-parallel synchronisation, the slowest pipeline rank's (s).

    'ddp' without a pipeline (one stage): DistributedDataParallel all-reduces
    in buckets during the last microbatch's backward, so only the part longer
    than that backward shows: max(0, all-reduce − one microbatch's backward).
    'ddp' with a pipeline: FSDP2's replicate, which torch.distributed.pipelining
    reduces once after the last backward: the all-reduce is exposed.
    'zero2': each stage is one FSDP unit, so the all-gather of its parameters
    before the first forward and the reduce-scatter of its gradients after the
    last backward are exposed. 'zero3'/'hsdp': `zero3_exposed_seconds`.
    """
    if setting.dp == 1 or not request.training:
        return 0.0
    exposed = 0.0
    stage_of = solution.stage_of_block
    for rank in range(problem.num_ranks):
        stages = range(rank, problem.num_stages, problem.num_ranks)
        members = [b for b, stage in enumerate(stage_of) if stage in stages]
        # expert blocks under expert parallelism sync over their own group (axes/expert.py)
        grad_bytes = sum(graph.blocks[b].trainable_param_bytes - _experts(graph.blocks[b], setting, True)
                         for b in members)
        param_bytes = sum(graph.blocks[b].param_bytes - _experts(graph.blocks[b], setting, False) for b in members)
        link = cluster.link_for_group(dp_group(setting, problem.num_ranks, rank))
        if reshards_parameters(setting.mode):
            sync = zero3_exposed_seconds(graph, cluster, request, problem, members, stage_of, setting, rank)
        elif setting.mode == "zero2":
            fraction = unsharded_fraction(request, setting)
            experts = _expert_collectives([graph.blocks[b] for b in members], cluster, request, setting,
                                          problem.num_ranks, rank)
            sync = (all_gather_seconds(param_bytes * fraction, setting.dp, link)
                    + reduce_scatter_seconds(grad_bytes, setting.dp, link) + sum(experts[0]) + sum(experts[1]))
        elif problem.num_stages > 1:
            sync = all_reduce_seconds(grad_bytes, setting.dp, link)
        else:
            backward = sum(float(problem.bwd_seconds[b, 0]) for b in members)
            sync = all_reduce_seconds(grad_bytes, setting.dp, link) - backward
        exposed = max(exposed, sync)
    return max(0.0, exposed)


def _experts(block, setting: Setting, trainable: bool) -> int:
    """The block's expert weight bytes the dp wrappers do not shard over dp (0 at ep = 1)."""
    if setting.ep == 1:
        return 0
    return block.expert_trainable_param_bytes if trainable else block.expert_param_bytes


def experts_sharded_over_edp(setting: Setting) -> bool:
    """Whether FSDP shards the expert blocks over the expert-data-parallel group (edp, the dp / ep
    replicas holding the same experts): ZeRO modes under expert parallelism with edp > 1
    (runtime/data_parallel.py). Then their gathers and reduce-scatters run over edp, priced here."""
    return shards_state(setting.mode) and setting.ep > 1 and setting.dp // setting.ep > 1


def edp_group(setting: Setting, num_ranks: int, rank: int) -> list[int]:
    """Devices of pipeline rank `rank`'s first edp group: one replica per ep group."""
    return [d * num_ranks + rank for d in range(0, setting.dp, setting.ep)]


def _expert_collectives(blocks, cluster: Cluster, request, setting: Setting, num_ranks: int,
                        rank: int) -> tuple[list[float], list[float]]:
    """Per block, FSDP's all-gather of its expert blocks (E / ep experts, bf16 under mixed precision)
    and reduce-scatter of their gradients over edp (s); zeros unless `experts_sharded_over_edp`."""
    if not experts_sharded_over_edp(setting):
        return [0.0] * len(blocks), [0.0] * len(blocks)
    edp, link = setting.dp // setting.ep, cluster.link_for_group(edp_group(setting, num_ranks, rank))
    fraction = 0.5 if request.mixed_precision == "bf16" else 1.0
    gather = [all_gather_seconds(b.expert_param_bytes / setting.ep * fraction, edp, link) for b in blocks]
    reduce = [reduce_scatter_seconds(gradient_bytes(b.expert_trainable_param_bytes / setting.ep), edp, link)
              for b in blocks]
    return gather, reduce


def zero3_exposed_seconds(graph: BlockGraph, cluster: Cluster, request, problem, members: list[int],
                          stage_of: Sequence[int], setting: Setting, rank: int) -> float:
    """Communication ZeRO-3 (or HSDP) leaves exposed on one pipeline rank per step (s).

    Each block is an FSDP unit. FSDP2 gathers a unit's parameters (bf16 under
    mixed precision) before its forward and again before its backward, and
    prefetches the next unit's gather while the current one computes; a unit's
    gradients are reduce-scattered (float32) while the next unit's backward
    runs. Per unit, the part of the communication longer than the compute it
    overlaps is exposed: max(0, comm − compute) (the overlap model of the
    ZeRO paper's analysis, Rajbhandari et al. 2020, and FSDP2's
    implicit prefetch). The first gather of each pass is exposed whole.
    HSDP gathers and reduce-scatters within the host's shard group and then
    all-reduces the shard across hosts.

    Per step: forward gathers every microbatch (parameters are freed after
    each forward). Without a pipeline (the runner drives FSDP itself) every
    microbatch's backward gathers again and the last one also reduces, unit by
    unit under the backward. In a pipeline, torch.distributed.pipelining keeps
    the parameters gathered from the first backward and reduces the whole
    stage after the last (PipelineStage.perform_reduce_grad): one backward
    gather, and the reduce-scatter exposed.
    """
    fraction = unsharded_fraction(request, setting)
    shard_link = cluster.link_for_group(shard_group(setting, problem.num_ranks, rank))
    replicas = setting.dp // setting.dp_shard
    cross_link = cluster.link_for_group(replicate_group(setting, problem.num_ranks, rank))
    blocks = [graph.blocks[b] for b in members]
    if not blocks:
        return 0.0
    sharded = [(b.param_bytes - _experts(b, setting, False), b.trainable_param_bytes - _experts(b, setting, True))
               for b in blocks]  # expert blocks under expert parallelism: over edp (_expert_collectives)
    expert_gather, expert_reduce = _expert_collectives(blocks, cluster, request, setting, problem.num_ranks, rank)
    gather = [all_gather_seconds(held * fraction, setting.dp_shard, shard_link) + g
              for (held, _), g in zip(sharded, expert_gather)]
    reduce = [reduce_scatter_seconds(gradient_bytes(trainable), setting.dp_shard, shard_link)
              + all_reduce_seconds(gradient_bytes(trainable) / setting.dp_shard, replicas, cross_link) + r
              for (_, trainable), r in zip(sharded, expert_reduce)]
    fwd = [float(problem.fwd_seconds[b, stage_of[b]]) for b in members]
    bwd = [float(problem.bwd_seconds[b, stage_of[b]]) for b in members]
    m = problem.num_microbatches
    forward = gather[0] + sum(max(0.0, gather[i] - fwd[i - 1]) for i in range(1, len(blocks)))
    # backward runs the units last to first: while unit j computes, the gather of the unit before
    # it (j − 1) and the reduce-scatter of the unit after it (j + 1) are in flight
    n = len(blocks)
    gather_back = gather[-1] + sum(max(0.0, gather[j - 1] - bwd[j]) for j in range(n - 1, 0, -1))
    if problem.num_stages > 1:
        return m * forward + gather_back + sum(reduce)
    last = (gather[-1] + sum(max(0.0, (gather[j - 1] if j > 0 else 0.0) + (reduce[j + 1] if j + 1 < n else 0.0)
                                 - bwd[j]) for j in range(n - 1, -1, -1)) + reduce[0])
    return m * forward + (m - 1) * gather_back + last


def sync_lower_bound(graph: BlockGraph, cluster: Cluster, request, problem, setting: Setting) -> float:
    """A bound on `data_parallel_sync_seconds` before solving: the slowest rank moves at least
    the average rank's bytes (1/R of the model); latency left out. ZeRO-3 may hide everything
    but its first gather: bound 0."""
    if (setting.dp == 1 or not request.training or reshards_parameters(setting.mode)
            or (setting.mode == "ddp" and problem.num_stages == 1)):
        return 0.0
    # the dense part: expert blocks under expert parallelism move fewer bytes, over edp or their own group
    grad_bytes = sum(b.trainable_param_bytes - _experts(b, setting, True) for b in graph.blocks) / problem.num_ranks
    param_bytes = sum(b.param_bytes - _experts(b, setting, False) for b in graph.blocks) / problem.num_ranks
    fastest = max(cluster.link_for_group(dp_group(setting, problem.num_ranks, r)).bandwidth
                  for r in range(problem.num_ranks))
    if setting.mode == "zero2":  # AG + RS
        moved = param_bytes * unsharded_fraction(request, setting) + grad_bytes
    else:  # AR = RS + AG
        moved = 2 * grad_bytes
    return (setting.dp - 1) / setting.dp * moved / fastest


def _degrees(request: PlanRequest, cluster: Cluster, shape: SearchShape) -> list[int]:
    """Replica counts, most first (the search's tie-break: more replicas, shorter pipelines)."""
    return sorted(data_parallel_choices(request, cluster, shape.sequence_length), reverse=True)


def _groups(mesh: Mesh) -> GroupRanks:
    """'dp': the replicas of each (stage, tp index); HSDP (1 < dp_shard < dp) also 'dp_shard', the
    replicas on one host that shard the state, and 'dp_replicate', the replicas across hosts that
    hold the same shard."""
    if mesh.dp == 1:
        return {}
    replicas = [[mesh.rank_of(d, stage, t) for d in range(mesh.dp)] for stage in range(mesh.pp)
                for t in range(mesh.tp)]
    groups: GroupRanks = {"dp": replicas}
    shard = mesh.dp_shard
    if 1 < shard < mesh.dp:
        groups["dp_shard"] = [ranks[start:start + shard] for ranks in replicas for start in range(0, mesh.dp, shard)]
        groups["dp_replicate"] = [ranks[offset::shard] for ranks in replicas for offset in range(shard)]
    return groups


def _describe(plan: Plan) -> str:
    mesh = plan.mesh
    text = f"dp={mesh.dp}" + (f" {plan.data_parallel_mode}" if mesh.dp > 1 else "")
    if plan.data_parallel_mode == "hsdp" and mesh.dp > 1:
        text += f" ({mesh.dp // mesh.dp_shard} hosts × {mesh.dp_shard})"
    return text


DATA = register(Axis(name="dp", title="data parallel", degrees=_degrees, groups=_groups, describe=_describe,
                     step_seconds=data_parallel_sync_seconds, step_bound=sync_lower_bound))
