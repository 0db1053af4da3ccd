"""Ranks of a dp × pp (× tp) mesh and the process groups along each axis.

Rank layout (row-major, tp fastest, `Mesh.rank_of`): rank = (dp_index · pp + stage) · tp + tp_index.
Every rank creates every group in the same order, as `torch.distributed.new_group`
requires, and keeps the ones it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from autopart.plan import Mesh


@dataclass(frozen=True, kw_only=True)
class Coordinates:
    """Where one rank sits in the mesh."""

    rank: int
    dp_index: int
    stage: int
    tp_index: int


def coordinates(mesh: Mesh, rank: int) -> Coordinates:
    """Where `rank` sits in the mesh (the inverse of `Mesh.rank_of`)."""
    tp_index = rank % mesh.tp
    stage = (rank // mesh.tp) % mesh.pp
    dp_index = rank // (mesh.tp * mesh.pp)
    return Coordinates(rank=rank, dp_index=dp_index, stage=stage, tp_index=tp_index)


@dataclass
class MeshGroups:
    """This rank's process groups (None where the axis has size 1)."""

    pp: dist.ProcessGroup
    """The ranks of this rank's pipeline (same dp replica and tp index)."""
    pp_ranks: list[int]
    """Global ranks of that pipeline, stage 0 first."""
    dp: dist.ProcessGroup | None
    """The replicas of this rank's stage (same stage and tp index)."""
    dp_ranks: list[int]
    tp: dist.ProcessGroup | None
    """The ranks that split this rank's stage (same dp replica and stage)."""
    shared: dict[tuple[int, ...], dist.ProcessGroup | None]
    """Groups of stages (of this pipeline) that hold copies of one parameter, by stage tuple."""
    dp_shard: dist.ProcessGroup | None = None
    """HSDP (1 < mesh.dp_shard < mesh.dp): the replicas on this rank's host, which shard the state."""
    dp_replicate: dist.ProcessGroup | None = None
    """HSDP: the replicas on other hosts holding the same shard as this rank."""


def build_groups(mesh: Mesh, rank: int, shared_stage_sets: list[tuple[int, ...]]) -> MeshGroups:
    """Create every group of the mesh (collectively) and return this rank's."""
    me = coordinates(mesh, rank)
    pp_group = dp_group = None
    pp_ranks: list[int] = []
    dp_ranks: list[int] = []
    for dp_index in range(mesh.dp):
        for tp_index in range(mesh.tp):
            ranks = [mesh.rank_of(dp_index, s, tp_index) for s in range(mesh.pp)]
            # a group even of one stage: PipelineStage would otherwise take the whole world
            group = dist.new_group(ranks)
            if dp_index == me.dp_index and tp_index == me.tp_index:
                pp_group, pp_ranks = group, ranks
    for stage in range(mesh.pp):
        for tp_index in range(mesh.tp):
            ranks = [mesh.rank_of(d, stage, tp_index) for d in range(mesh.dp)]
            group = dist.new_group(ranks) if mesh.dp > 1 else None
            if stage == me.stage and tp_index == me.tp_index:
                dp_group, dp_ranks = group, ranks
    shard_group = replicate_group = None
    shard = mesh.dp_shard
    if 1 < shard < mesh.dp:  # HSDP: dp_shard consecutive replicas per host
        for stage in range(mesh.pp):
            for tp_index in range(mesh.tp):
                ranks = [mesh.rank_of(d, stage, tp_index) for d in range(mesh.dp)]
                mine = stage == me.stage and tp_index == me.tp_index
                for start in range(0, mesh.dp, shard):
                    group = dist.new_group(ranks[start:start + shard])
                    if mine and start <= me.dp_index < start + shard:
                        shard_group = group
                for offset in range(shard):
                    group = dist.new_group(ranks[offset::shard])
                    if mine and me.dp_index % shard == offset:
                        replicate_group = group
    tp_group = None
    for dp_index in range(mesh.dp):
        for stage in range(mesh.pp):
            ranks = [mesh.rank_of(dp_index, stage, t) for t in range(mesh.tp)]
            group = dist.new_group(ranks) if mesh.tp > 1 else None
            if dp_index == me.dp_index and stage == me.stage:
                tp_group = group
    shared: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    for stages in shared_stage_sets:
        for dp_index in range(mesh.dp):
            for tp_index in range(mesh.tp):
                ranks = [mesh.rank_of(dp_index, s, tp_index) for s in stages]
                group = dist.new_group(ranks)
                if dp_index == me.dp_index and tp_index == me.tp_index and me.stage in stages:
                    shared[stages] = group
    return MeshGroups(pp=pp_group, pp_ranks=pp_ranks, dp=dp_group, dp_ranks=dp_ranks, tp=tp_group,
                      dp_shard=shard_group, dp_replicate=replicate_group, shared=shared)
