"""What would fit when nothing does: more devices, or a smaller batch, found by the search that plans.

When `compile` finds no plan for lack of memory, its error says the smallest
device count that does hold the model and the largest batch these devices hold.
Both come from running the same mesh search (autopart/mesh_search.py) on the
same analysed graph again, on a cluster of more devices like the first, or with
a smaller batch, so the advice cannot contradict a plan: "the smallest count
that fits is N" means N devices were planned and N − 1 were not.

Counts grow by doubling until one plans, then bisect down to the first that
does (feasibility is taken as monotone between two counts probed); batches
bisect alike. Each probe is a whole search, silent and without retracing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

from autopart.cost_models import Cluster
from autopart.core.errors import AutopartError, PlanError
from autopart.core.plan import Plan
from autopart.planner.choices import PlanRequest

MAX_GROWTH = 8
"""Device counts are probed up to this many times the cluster's (beyond: 'even K do not hold it')."""

BUDGET_SECONDS = 60.0
"""Wall time the probes of one error may take (a search over thousands of devices takes seconds); past it,
the advice says what was established so far."""

PlanOn = Callable[[Cluster, PlanRequest], Plan]
"""Runs the search for a cluster and a request; raises PlanError (or InputError) when nothing fits."""

_NEEDS = "  What would fit — "


def scaled_cluster(cluster: Cluster, count: int) -> Cluster:
    """`count` devices like the cluster's first, on hosts as large as its first host (a cluster on one
    host grows it to 8 GPUs, as `Cluster.parse` packs them; CPU devices share one host), with its links."""
    first = cluster.devices[0]
    per_host = sum(1 for node in cluster.node_of_device if node == cluster.node_of_device[0])
    if cluster.num_nodes == 1:
        per_host = count if first.device_type == "cpu" else max(per_host, 8)
    return Cluster(devices=(first,) * count, node_of_device=tuple(i // per_host for i in range(count)),
                   intra_node_link=cluster.intra_node_link, inter_node_link=cluster.inter_node_link)


def with_fit_advice(error: PlanError, cluster: Cluster, request: PlanRequest, plan_on: PlanOn) -> PlanError:
    """`error` (no plan for lack of memory) with the devices and the batch that would fit, each found by
    `plan_on`; other errors are returned as they are."""
    if not getattr(error, "failures", None):
        return error
    quiet = dataclasses.replace(request, verbose=False)
    deadline = time.perf_counter() + BUDGET_SECONDS
    devices = _device_advice(cluster, quiet, plan_on, deadline)
    batch = _batch_advice(cluster, quiet, plan_on, deadline)
    lines = str(error).splitlines()
    at = next((k for k, line in enumerate(lines) if line.startswith(_NEEDS)), None)
    rest = lines[at][len(_NEEDS):].rstrip(".") if at is not None else ""
    needs = _NEEDS + "; ".join(p for p in (devices, rest, batch) if p) + "."
    lines = lines[:at] + [needs] + lines[at + 1:] if at is not None else lines + [needs]
    error.args = ("\n".join(lines),)
    return error


def _plans(plan_on: PlanOn, cluster: Cluster, request: PlanRequest) -> Plan | None:
    try:
        return plan_on(cluster, request)
    except AutopartError:
        return None


def _device_advice(cluster: Cluster, request: PlanRequest, plan_on: PlanOn, deadline: float) -> str:
    n, name = cluster.num_devices, cluster.devices[0].name
    limit = MAX_GROWTH * n
    failing, count, found = n, n, None
    while found is None and count < limit:  # double until a count plans
        if time.perf_counter() > deadline:
            return (f"devices: more than {failing} {name} devices (the planner's search stopped probing after "
                    f"{BUDGET_SECONDS:.0f} s)")
        count = min(count * 2, limit)
        found = _plans(plan_on, scaled_cluster(cluster, count), request)
        if found is None:
            failing = count
    if found is None:
        return f"devices: even {limit} {name} devices do not hold it (the planner's search, up to {MAX_GROWTH}×)"
    while count - failing > 1:  # bisect: `failing` does not plan, `count` does
        if time.perf_counter() > deadline:
            return (f"devices: {count} {name} devices fit, {failing} do not (the planner's search stopped "
                    f"narrowing it after {BUDGET_SECONDS:.0f} s)")
        middle = (failing + count) // 2
        plan = _plans(plan_on, scaled_cluster(cluster, middle), request)
        if plan is None:
            failing = middle
        else:
            count, found = middle, plan
    mesh = found.mesh
    how = (f"dp={mesh.dp} × pp={mesh.pp} × tp={mesh.tp}, {found.num_microbatches} microbatch"
           f"{'es' if found.num_microbatches > 1 else ''}, {found.schedule}")
    return (f"devices: the smallest count of {name} devices that fits is {count} (the planner's search plans "
            f"{how}; {count - 1} {'does' if count == 2 else 'do'} not fit)")


def _batch_advice(cluster: Cluster, request: PlanRequest, plan_on: PlanOn, deadline: float) -> str:
    """The largest batch below the request's that these devices plan, keeping its fixed choices
    (a fixed microbatch count or replica count: batches that are multiples of them)."""
    size = request.batch_size
    step = math.lcm(request.num_microbatches or 1, request.data_parallel or 1)

    def plans(batch: int) -> bool:
        return _plans(plan_on, cluster, dataclasses.replace(request, batch_size=batch)) is not None

    low, high = 0, size // step  # in units of `step`: low plans (or is 0), high does not
    if high > 1 and time.perf_counter() > deadline:
        return f"batch: not probed (the planner's search spent the {BUDGET_SECONDS:.0f} s for advice on devices)"
    if high <= 1 or not plans(step):
        return (f"batch: not even a batch of {step} sample{'s' if step > 1 else ''} fits {cluster.num_devices} "
                "device(s): the state alone is too large; shard it (data_parallel_mode='zero3' with more "
                "devices), split layers (tensor_parallel) or use a lighter optimizer (optimizer='sgd')")
    low = 1
    while high - low > 1:
        if time.perf_counter() > deadline:
            return (f"batch: a batch of {low * step} samples fits {cluster.num_devices} device(s), "
                    f"{high * step} does not (the planner's search stopped narrowing it)")
        middle = (low + high) // 2
        low, high = (middle, high) if plans(middle * step) else (low, middle)
    return (f"batch: a batch of at most {low * step} samples fits {cluster.num_devices} device(s) (the planner's "
            f"search; {size} does not)")
