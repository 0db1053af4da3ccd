"""Context parallelism: each sequence split over consecutive data-parallel replicas.

The axis's degree is `Mesh.cp` (the layout's `context_parallel`, `Setting.cp`). Like expert
parallelism it adds no ranks: cp divides the data-parallel replicas, each group of cp
consecutive replicas (of one pipeline rank and tp index) takes one share of the batch, and each
of them holds 1/cp of every sample's tokens. For causal attention the sequence is cut into
2·cp chunks and replica i of a group holds chunks i and 2·cp − 1 − i, so every rank attends
over the same number of (query, key) pairs (the load balance of Llama 3's context parallelism
and torchtitan's). Every op but attention is sequence-local; attention gathers the keys and
values of the whole sequence over the cp group (passes/context_parallel.py). The replicas keep
whole parameters, and their gradients are reduced over all dp replicas, cp ones included (the
loss of each rank is its share of the mean over all tokens).
"""

from __future__ import annotations

from autopart.axes.base import Axis, GroupRanks, SearchShape, register
from autopart.core.errors import InputError
from autopart.core.plan import Mesh, Plan
from autopart.core.request import PlanRequest
from autopart.cost_models import Cluster


def context_parallel_choices(request: PlanRequest, dp: int, sequence_length: int) -> list[int]:
    """Degrees that divide the replicas, leave the batch divisible over dp / cp groups and cut the
    sequence into 2·cp equal chunks: the one the user fixed (checked), else every such degree, 1 first."""
    batch = request.batch_size
    fits = [c for c in range(1, dp + 1) if dp % c == 0 and batch % (dp // c) == 0
            and (c == 1 or (sequence_length and sequence_length % (2 * c) == 0))]
    fixed = request.context_parallel
    if fixed is not None:
        if fixed not in fits:
            raise InputError(
                f"context_parallel={fixed} must divide the {dp} data-parallel replicas, leave the batch of {batch} "
                f"samples divisible over data_parallel / context_parallel groups, and cut the sequence of "
                f"{sequence_length} tokens into 2 × {fixed} equal chunks; choose one of {fits} "
                "(or fix data_parallel to a multiple of it)")
        return [fixed]
    return [1] if batch % dp == 0 else []


def _degrees(request: PlanRequest, cluster: Cluster, shape: SearchShape) -> list[int]:
    return context_parallel_choices(request, shape.degrees.get("dp", 1), shape.sequence_length)


def _groups(mesh: Mesh) -> GroupRanks:
    """'cp': each cp consecutive replicas of each (stage, tp index): the key/value exchanges' group."""
    if mesh.cp == 1:
        return {}
    replicas = [[mesh.rank_of(d, stage, t) for d in range(mesh.dp)] for stage in range(mesh.pp)
                for t in range(mesh.tp)]
    return {"cp": [ranks[start:start + mesh.cp] for ranks in replicas for start in range(0, mesh.dp, mesh.cp)]}


def _describe(plan: Plan) -> str:
    return f"cp={plan.mesh.cp}" if plan.mesh.cp > 1 else ""


CONTEXT = register(Axis(name="cp", title="context parallel", degrees=_degrees, groups=_groups,
                        describe=_describe))
