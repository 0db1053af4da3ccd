"""Ranks of a dp × pp (× tp) mesh and the process groups along each axis.

Rank layout (row-major, tp fastest, `Mesh.rank_of`): rank = (dp_index · pp + stage) · tp + tp_index.
Every rank creates every group in the same order, as `torch.distributed.new_group`
requires, and keeps the ones it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from autopart.axes import AXES
from autopart.core.plan import Mesh


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
    ep: dist.ProcessGroup | None = None
    """Expert parallelism: the consecutive replicas that split this rank's experts (the all-to-alls)."""
    edp: dist.ProcessGroup | None = None
    """Expert parallelism: the replicas holding the same experts as this rank (their gradients summed)."""
    cp: dist.ProcessGroup | None = None
    """Context parallelism: the consecutive replicas that split this rank's sequences (key/value exchanges)."""
    cp_ranks: list[int] | None = None
    """The global ranks of `cp`, in chunk order (replica i of the group holds chunks i and 2·cp − 1 − i)."""


def build_groups(mesh: Mesh, rank: int, shared_stage_sets: list[tuple[int, ...]]) -> MeshGroups:
    """Create every group of the mesh (collectively) and return this rank's.

    Each axis says which groups it needs (`Axis.groups`, autopart/axes/); every rank creates all of
    them in the axes' order, then the groups of the stages that share a parameter (tied weights).
    """
    mine: dict[str, dist.ProcessGroup] = {}
    ranks_of: dict[str, list[int]] = {}
    for axis in AXES.values():
        for name, groups in axis.groups(mesh).items():
            for ranks in groups:
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[name], ranks_of[name] = group, ranks
    me = coordinates(mesh, rank)
    shared: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    for stages in shared_stage_sets:
        for dp_index in range(mesh.dp):
            for tp_index in range(mesh.tp):
                ranks = [mesh.rank_of(dp_index, s, tp_index) for s in stages]
                group = dist.new_group(ranks)
                if dp_index == me.dp_index and tp_index == me.tp_index and me.stage in stages:
                    shared[stages] = group
    return MeshGroups(pp=mine["pp"], pp_ranks=ranks_of["pp"], dp=mine.get("dp"),
                      dp_ranks=ranks_of.get("dp", [rank]), tp=mine.get("tp"), dp_shard=mine.get("dp_shard"),
                      dp_replicate=mine.get("dp_replicate"), shared=shared, ep=mine.get("ep"), edp=mine.get("edp"),
                      cp=mine.get("cp"), cp_ranks=ranks_of.get("cp"))
