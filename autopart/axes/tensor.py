"""Tensor parallelism: each op split across a group of devices within one host.

The axis's degree is `Mesh.tp` and the layout's `tensor_parallel`. Its price lives
in the blocks: the strategy ILP (passes/tensor_parallel/problem.py, solved by
solver/strategy_ilp.py) chooses every op's split and charges its collectives, and
the blocks are restated per device of the group (passes/tensor_parallel/block_costs.py),
so it adds nothing to a step beyond the stages. tp is the fastest axis of the rank
layout: a group is tp consecutive ranks, never across hosts.
"""

from __future__ import annotations

import dataclasses

from autopart.axes.base import Axis, GroupRanks, SearchShape, register
from autopart.core.errors import InputError
from autopart.core.plan import Mesh, Plan
from autopart.core.request import PlanRequest
from autopart.cost_models import Cluster


def tensor_parallel_choices(cluster: Cluster, fixed: int | None, fixed_ranks: int | None,
                            fixed_replicas: int | None = None) -> list[int]:
    """tp sizes that divide the devices and stay within one host (tp traffic needs the fast link),
    leaving room for the pipeline ranks and replicas the user fixed."""
    n = cluster.num_devices
    if fixed is not None:
        if fixed < 1 or n % fixed:
            raise InputError(f"tensor_parallel={fixed} must divide the {n} devices; choose one of "
                             f"{[t for t in range(1, n + 1) if n % t == 0]}")
        return [fixed]
    per_host = sum(1 for node in cluster.node_of_device if node == cluster.node_of_device[0])
    groups = (fixed_ranks or 1) * (fixed_replicas or 1)
    # t divides the host's devices too, so that no group straddles two hosts (ranks are laid
    # out tp fastest: group g holds devices g·t .. g·t + t − 1)
    return [t for t in range(1, per_host + 1) if n % t == 0 and per_host % t == 0 and t * groups <= n]


def group_cluster(cluster: Cluster, tp: int) -> Cluster:
    """The cluster as the pipeline planner sees it: one device per tp group (its first)."""
    if tp == 1:
        return cluster
    return dataclasses.replace(cluster, devices=cluster.devices[::tp], node_of_device=cluster.node_of_device[::tp])


def _degrees(request: PlanRequest, cluster: Cluster, shape: SearchShape) -> list[int]:
    return tensor_parallel_choices(cluster, request.tensor_parallel, request.pipeline_parallel, request.data_parallel)


def _groups(mesh: Mesh) -> GroupRanks:
    """'tp': the ranks that split each stage of each replica."""
    if mesh.tp == 1:
        return {}
    return {"tp": [[mesh.rank_of(d, s, t) for t in range(mesh.tp)] for d in range(mesh.dp) for s in range(mesh.pp)]}


def _describe(plan: Plan) -> str:
    sequence = plan.tensor_parallel is not None and plan.tensor_parallel.sequence_parallel
    return f"tp={plan.mesh.tp}" + (" sp" if sequence else "")


TENSOR = register(Axis(name="tp", title="tensor parallel", degrees=_degrees, groups=_groups, describe=_describe))
