"""Search over mesh shapes dp × pp × tp for the fastest plan.

For every tensor-parallel size tp that divides the devices (and fits in one
host), the strategy ILP chooses each op's split for a group of tp devices
(passes/tp_blocks.py, identical layers sharing variables); the pipeline
planner then cuts the restated blocks over the N / tp groups and chooses dp,
pp, microbatches and schedule (autopart/planner.py). The plan with the lowest
predicted step time wins; the report lists every shape tried.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch.fx

from autopart import passes
from autopart.cost_models import Cluster, optimizer_state_bytes
from autopart.errors import InputError, PlanError
from autopart.passes.blocks import BlockGraph
from autopart.passes.tp_placements import TPAssignment
from autopart.plan import Plan
from autopart.plan_errors import infeasible_error
from autopart.planner import PlanRequest, plan_pipeline


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
    return [t for t in range(1, per_host + 1) if n % t == 0 and t * stages <= n]


def group_cluster(cluster: Cluster, tp: int) -> Cluster:
    """The cluster as the pipeline planner sees it: one device per tp group (its first)."""
    if tp == 1:
        return cluster
    return dataclasses.replace(cluster, devices=cluster.devices[::tp], node_of_device=cluster.node_of_device[::tp])


def plan_mesh(gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster, request: PlanRequest,
              model_class: str, tp_choices: list[int],
              tp_fixed: Mapping[str, str] | None = None) -> tuple[Plan, TPAssignment | None]:
    """The best plan over the tp sizes given, and its tensor-parallel assignment."""
    results: list[tuple[Plan, TPAssignment | None]] = []
    errors: list[tuple[int, PlanError]] = []
    for tp in tp_choices:
        failed: list[tuple[int, PlanError]] = []
        for budget in [None] if tp == 1 else tp_memory_budgets(blocks, cluster, request, tp):
            try:
                tp_blocks, assignment = (blocks, None) if tp == 1 else passes.tensor_parallel_blocks(
                    gm, blocks, cluster, tp, memory_budget_bytes=budget, training=request.training, fixed=tp_fixed)
                plan = plan_pipeline(tp_blocks, group_cluster(cluster, tp), request, model_class)
            except PlanError as error:
                failed.append((tp, error))
                continue
            results.append((_in_real_devices(plan, cluster, tp, assignment), assignment))
            break
        else:
            errors.extend(failed[-1:])
    if not results:
        raise _closest(errors, gm, blocks, cluster, request, tuple(tp_choices))
    best, assignment = min(results, key=lambda r: r[0].predicted_step_seconds)
    candidates = tuple(c if plan is best or c.status != "chosen" else dataclasses.replace(c, status="feasible")
                       for plan, _ in results for c in plan.candidates)
    solver = dataclasses.replace(best.solver, plan_seconds=sum(p.solver.plan_seconds for p, _ in results),
                                 num_problems=sum(p.solver.num_problems for p, _ in results))
    return dataclasses.replace(best, candidates=candidates, solver=solver), assignment


def tp_memory_budgets(blocks: BlockGraph, cluster: Cluster, request: PlanRequest, tp: int) -> list[float]:
    """Parameter bytes per device the strategy ILP may keep, loosest first.

    The ILP chooses splits for the whole model on one tp group and budgets parameter bytes only;
    a device must also hold their gradients and optimizer state (`optimizer_state_bytes`: Adam 2×)
    and activations. So the budget is the group's share of the cluster's memory less one
    microbatch's activations (split over the group), divided by the bytes of training state per
    parameter byte (1 + 1 + optimizer's; frozen parameters are charged alike, conservatively).
    A pipeline spreads the model over the N / tp groups, so the loosest budget counts all of
    them; when the pipeline planner then finds no plan, a tighter budget (half, down to one
    group's memory) makes the ILP split more, as memory demands.
    """
    capacity = float(min(d.memory_bytes for d in cluster.devices))
    groups = max(cluster.num_devices // tp, 1)
    factor = 2 + optimizer_state_bytes(1, request.optimizer) if request.training else 1
    activations = sum(b.saved_bytes for b in blocks.blocks) / tp if request.training else 0.0
    budgets, share = [], float(groups)
    while True:
        budgets.append(max(capacity * share - activations, 0.0) / factor)
        if share <= 1:
            return budgets
        share = max(share / 2, 1.0)


def _closest(errors: list[tuple[int, PlanError]], gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster,
             request: PlanRequest, tp_choices: tuple[int, ...]) -> PlanError:
    """One error for every mesh shape tried: the closest attempt of all of them and the levers."""
    failures = [dataclasses.replace(f, tried=dict(f.tried, tensor_parallel=tp))
                for tp, error in errors for f in getattr(error, "failures", [])]
    if not failures:  # not a memory failure (a choice that cannot be met): the first says why
        return errors[0][1]
    return infeasible_error(blocks, cluster, request, failures, tensor_parallel=tp_choices)


def _in_real_devices(plan: Plan, cluster: Cluster, tp: int, assignment: TPAssignment | None) -> Plan:
    """Restate a plan made over tp groups in the cluster's own devices."""
    stages = tuple(dataclasses.replace(s, device=s.device * tp) for s in plan.stages)
    used = plan.mesh.dp * plan.mesh.pp * tp
    candidates = tuple(dataclasses.replace(c, tensor_parallel=tp) for c in plan.candidates)
    return dataclasses.replace(
        plan, stages=stages, mesh=dataclasses.replace(plan.mesh, tp=tp), cluster=cluster.to_dict(),
        idle_devices=tuple(range(used, cluster.num_devices)), candidates=candidates,
        tensor_parallel=assignment.to_dict() if assignment is not None else None,
    )
