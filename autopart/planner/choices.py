"""Which microbatch size the planner traces at, from the choices each axis offers."""

from __future__ import annotations

from autopart.axes.context import batch_shard_choices
from autopart.axes.data import data_parallel_choices
from autopart.axes.pipeline import microbatch_choices
from autopart.core.request import PlanRequest
from autopart.cost_models import Cluster


def smallest_microbatch(request: PlanRequest, cluster: Cluster) -> int:
    """Samples in the smallest microbatch any candidate uses: the size to trace at."""
    shards = [s for dp in data_parallel_choices(request, cluster) for s in batch_shard_choices(request, dp, None)]
    return min(request.batch_size // s // microbatch_choices(request, s)[-1] for s in shards)
