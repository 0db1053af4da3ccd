"""Search over mesh shapes dp × pp × tp for the fastest plan.

For every tensor-parallel size tp that divides the devices and the devices of a
host (tp groups never span hosts; pipeline and data parallelism cross them over
the cluster's inter-host link), the strategy ILP chooses each op's split for a group of tp devices
(passes/tp_blocks.py, identical layers sharing variables); the pipeline
search (autopart/search.py) then cuts the restated blocks over the N / tp
groups and chooses dp, pp, microbatches, schedule and dp mode for all tp sizes
at once, best first under a lower bound. The plan with the lowest predicted
step time wins; the report lists the layouts tried.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping

import torch.fx

from autopart import passes
from autopart.cost_models import Cluster
from autopart.errors import InputError, PlanError
from autopart.passes.blocks import BlockGraph
from autopart.passes.tp_placements import TPAssignment
from autopart.plan import Plan
from autopart.planner import PlanRequest
from autopart.search import TPOption, search


def tensor_parallel_choices(cluster: Cluster, fixed: int | None, fixed_stages: int | None,
                            fixed_replicas: int | None = None) -> list[int]:
    """tp sizes that divide the devices and stay within one host (tp traffic needs the fast link),
    leaving room for the stages and replicas the user fixed."""
    n = cluster.num_devices
    if fixed is not None:
        if fixed < 1 or n % fixed:
            raise InputError(f"tensor_parallel={fixed} must divide the {n} devices; choose one of "
                             f"{[t for t in range(1, n + 1) if n % t == 0]}")
        return [fixed]
    per_host = sum(1 for node in cluster.node_of_device if node == cluster.node_of_device[0])
    stages = (fixed_stages or 1) * (fixed_replicas or 1)
    # t divides the host's devices too, so that no group straddles two hosts (ranks are laid
    # out tp fastest: group g holds devices g·t .. g·t + t − 1)
    return [t for t in range(1, per_host + 1) if n % t == 0 and per_host % t == 0 and t * stages <= n]


def group_cluster(cluster: Cluster, tp: int) -> Cluster:
    """The cluster as the pipeline planner sees it: one device per tp group (its first)."""
    if tp == 1:
        return cluster
    return dataclasses.replace(cluster, devices=cluster.devices[::tp], node_of_device=cluster.node_of_device[::tp])


def plan_mesh(gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster, request: PlanRequest,
              model_class: str, tp_choices: list[int],
              tp_fixed: Mapping[str, str] | None = None, *,
              restate: Callable[[BlockGraph], BlockGraph] | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[Plan, TPAssignment | None]:
    """The best plan over the tp sizes given, and its tensor-parallel assignment.

    `restate` turns the blocks of `gm` into the blocks the plan places (the repeated layers of
    the whole model when `gm` holds a few of them: autopart/layer_stack.py); `progress`
    receives a line per tp size and the search's progress.
    """
    options: list[TPOption] = []
    assignments: dict[int, TPAssignment | None] = {}
    errors: list[PlanError] = []
    budget = min(d.memory_bytes for d in cluster.devices)
    for tp in tp_choices:
        started = time.perf_counter()
        try:
            tp_blocks, assignment = (blocks, None) if tp == 1 else passes.tensor_parallel_blocks(
                gm, blocks, cluster, tp, memory_budget_bytes=budget, training=request.training, fixed=tp_fixed)
        except PlanError as error:
            errors.append(error)
            if progress is not None:
                progress(f"tp={tp}: no op split fits ({str(error).splitlines()[0]})")
            continue
        if progress is not None and tp > 1:
            progress(f"tp={tp}: op splits chosen in {time.perf_counter() - started:.2f} s")
        options.append(TPOption(tp=tp, graph=restate(tp_blocks) if restate else tp_blocks,
                                cluster=group_cluster(cluster, tp)))
        assignments[tp] = assignment
    if not options:
        raise errors[0]
    result = search(options, request, model_class, progress)
    tp = result.option.tp
    return _in_real_devices(result.plan, cluster, tp, assignments[tp]), assignments[tp]


def _in_real_devices(plan: Plan, cluster: Cluster, tp: int, assignment: TPAssignment | None) -> Plan:
    """Restate a plan made over tp groups in the cluster's own devices."""
    stages = tuple(dataclasses.replace(s, device=s.device * tp) for s in plan.stages)
    used = plan.mesh.dp * plan.mesh.pp * tp
    return dataclasses.replace(
        plan, stages=stages, mesh=dataclasses.replace(plan.mesh, tp=tp), cluster=cluster.to_dict(),
        idle_devices=tuple(range(used, cluster.num_devices)),
        tensor_parallel=assignment.to_dict() if assignment is not None else None,
    )
