"""Price a costed graph as TorchInductor runs it: fused kernels instead of op by op.

An analysis pass over `passes.annotate`'s `NodeCost`s, for plans that compile
their kernels (Plan.compile_kernels). It rewrites each node's seconds; FLOPs,
bytes and memory stay as annotated.

Inductor runs matmuls, attention and convolutions as library kernels ("extern"
kernels: cuBLAS, FlashAttention) and fuses the memory-bound ops between them
(elementwise, norms, rotary embeddings, activations, casts, reductions) into
generated kernels that read each input once and write only what is used
outside the kernel (Ansel et al. 2024, "PyTorch 2", §4: "TorchInductor ...
fuses pointwise and reduction ops"). So:

- a fusion group is a maximal set of memory-bound nodes connected by edges,
  at the same extern depth (the number of extern kernels on the longest path
  from the graph's inputs: ops separated by a matmul cannot share a kernel)
  and in the same repeated layer (`_layer`); views join the group of what
  they view and move nothing;
- a group's forward time is its memory traffic at the fused-kernel bandwidth:
  `(bytes of every distinct tensor it reads from outside + bytes of every
  member value used outside) / DeviceSpec.achieved_fused_bandwidth`, plus one
  `DeviceSpec.fused_launch_seconds` per kernel (one, and one more for each
  reduction after the first: Inductor splits a norm's statistics from its
  pointwise tail when they cannot share a loop);
- its backward moves `BACKWARD_BYTES_FACTOR` × that (the output gradients and
  the saved values read, input gradients written), in as many kernels;
- extern kernels keep their roofline times, less autocast's conversions of
  activations (`NodeCost.fusible_casts`), which Inductor writes in the kernel
  that produces the activation; conversions of weights stay kernels of their own.

A group's time is shared among its members that move data, in proportion to
the bytes each moves op by op (`_group_shares`), its launches likewise
(`NodeCost.launch_seconds`: fixed per call, not scaled by the batch or a
tensor-parallel split). Views and members that move nothing get none. Were it
charged to one member, a tensor-parallel split would scale the whole group by
that member's placement, and the strategy ILP could replicate the others at no
price, keeping their activations whole on every rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from autopart.cost_models import Cluster
from autopart.passes.node_costs import (
    AUTOCAST_CAST_BYTES_PER_ELEMENT,
    BACKWARD_BYTES_FACTOR,
    COST_META_KEY,
    NodeCost,
    node_cost,
)

__all__ = ["fusion_groups", "price_fused_kernels"]


def price_fused_kernels(gm: torch.fx.GraphModule, cluster: Cluster) -> torch.fx.GraphModule:
    """Rewrite every node's `NodeCost.seconds` as compiled kernels run (see the module docstring)."""
    devices = {d.name: d for d in cluster.devices}
    shares: dict[torch.fx.Node, tuple[tuple[str, float, float], tuple[str, float, float]]] = {}
    for group in fusion_groups(gm):
        shares.update(_group_shares(group, devices))
    for node in gm.graph.nodes:
        cost = node.meta.get(COST_META_KEY)
        if cost is None or node.op != "call_function":
            continue
        if node in shares or _is_fusible(node):
            none = tuple((name, 0.0, 0.0) for name, _, _ in cost.seconds)  # a view, or a member moving nothing
            seconds, launches, per_call = shares.get(node, (none, none, none))
            node.meta[COST_META_KEY] = dataclasses.replace(cost, seconds=seconds, launch_seconds=launches,
                                                           op_by_op=cost, per_call_seconds=per_call)
        elif cost.fusible_casts:  # an extern kernel: its activations arrive converted
            seconds = tuple((name, max(0.0, fwd - _casts_seconds(cost, devices[name])),
                             max(0.0, bwd - _casts_seconds(cost, devices[name])) if bwd else 0.0)
                            for name, fwd, bwd in cost.seconds)
            fewer = len(cost.fusible_casts)  # the conversions' launches go with them
            launches = tuple((name, max(0.0, fwd - fewer * devices[name].launch_overhead_s),
                              max(0.0, bwd - fewer * devices[name].launch_overhead_s) if bwd else 0.0)
                             for name, fwd, bwd in cost.launch_seconds)
            node.meta[COST_META_KEY] = dataclasses.replace(cost, seconds=seconds, op_by_op=cost,
                                                           launch_seconds=launches)
    return gm


def _group_shares(group: list[torch.fx.Node], devices: dict) -> dict[torch.fx.Node, tuple]:
    """Each member's share of its fused kernels: {node: ((device, fwd s, bwd s) per device,
    (device, fwd launch s, bwd launch s) per device, the same of reading weights, once per call)}.

    The kernels' time is split over the members that move data, in proportion to the bytes each
    moves op by op (`NodeCost.fwd_bytes`); the backward's over those of them autograd differentiates.
    Every member so carries its own part of the work: a block cut, a recomputed region and a
    tensor-parallel split each see the members they hold (a split member saves 1/tp of its share,
    a replicated one none), and a group's members sum to the group's time."""
    moved = _group_bytes(group)
    if moved == 0:
        return {}
    inside = set(group)
    weight_bytes = sum(_tensor_bytes(a.meta.get("val")) for a in {a for n in group for a in n.all_input_nodes
                                                                   if a not in inside and a.op == "get_attr"})
    kernels = max(1, sum(1 for n in group if _is_reduction(n)))
    name = next(iter(devices))
    weights = {n: float(node_cost(n).fwd_bytes) for n in group if node_cost(n).fwd_bytes > 0}
    grad_weights = {n: w for n, w in weights.items() if node_cost(n).bwd_seconds(name) > 0}
    total, grad_total = sum(weights.values()), sum(grad_weights.values())
    shares = {}
    for node, weight in weights.items():
        share = weight / total
        grad_share = grad_weights.get(node, 0.0) / grad_total if grad_total else 0.0
        seconds, launches, per_call = [], [], []
        for device_name, device in devices.items():
            launch = kernels * device.fused_launch_seconds
            fwd = _fused_seconds(moved, kernels, device)
            bwd = _fused_seconds(BACKWARD_BYTES_FACTOR * moved, kernels, device)
            reads = weight_bytes / device.achieved_fused_bandwidth  # a norm's weight: read once, whatever the batch
            seconds.append((device_name, share * fwd, grad_share * bwd))
            launches.append((device_name, share * launch, grad_share * launch))
            per_call.append((device_name, share * reads, grad_share * BACKWARD_BYTES_FACTOR * reads))
        shares[node] = (tuple(seconds), tuple(launches), tuple(per_call))
    return shares


def fusion_groups(gm: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
    """The memory-bound nodes of `gm` in fusion groups (each in graph order), groups by first member."""
    depth: dict[torch.fx.Node, int] = {}
    parent: dict[torch.fx.Node, torch.fx.Node] = {}

    def find(n: torch.fx.Node) -> torch.fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        depth[node] = max((depth[a] + (1 if _is_extern(a) else 0) for a in inputs), default=0)
        if not _is_fusible(node):
            continue
        parent[node] = node
        for a in inputs:
            if a in parent and depth[a] == depth[node] and _layer(a) == _layer(node):
                parent[find(a)] = find(node)
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in parent:
            groups.setdefault(find(node), []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(groups.values(), key=lambda g: order[g[0]])


def _layer(node: torch.fx.Node) -> str:
    """The repeated layer a node belongs to: its module path up to the last numbered part
    ('model.layers.3' of 'model.layers.3.mlp.act_fn'), '' outside numbered containers. Groups stay
    within one layer, so each layer of a stack is priced alike, as the analysis of three of them
    restates for all (passes/stack_blocks.py); Inductor would also fuse a layer's last residual
    add with the next layer's norm, one activation's write and read fewer per layer."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    if not paths:
        return ""
    parts = paths[-1].split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:numbered[-1] + 1]) if numbered else ""


def _is_extern(node: torch.fx.Node) -> bool:
    """A node Inductor runs as a library kernel: one with tensor-core FLOPs (matmul, attention, conv)."""
    cost = node.meta.get(COST_META_KEY)
    return node.op == "call_function" and cost is not None and cost.fwd_flops > 0


def _is_fusible(node: torch.fx.Node) -> bool:
    """A memory-bound call (or a view) producing tensors: what Inductor generates kernels for."""
    if node.op != "call_function" or _is_extern(node) or node.meta.get(COST_META_KEY) is None:
        return False
    return _tensor_bytes(node.meta.get("val")) > 0


def _is_reduction(node: torch.fx.Node) -> bool:
    """Fewer elements out than its largest input: a sum, mean, norm's statistics, softmax's max."""
    out = _numel(node.meta.get("val"))
    largest = max((_numel(a.meta.get("val")) for a in node.all_input_nodes), default=0)
    return node_cost(node).fwd_bytes > 0 and 0 < out < largest


def _group_bytes(group: list[torch.fx.Node]) -> int:
    """Bytes a fused kernel moves: each outside tensor read once, each value used outside written once."""
    inside = set(group)
    if all(node_cost(n).fwd_bytes == 0 for n in group):
        return 0  # views only: no kernel
    reads = {a for n in group for a in n.all_input_nodes if a not in inside}
    read_bytes = sum(_tensor_bytes(a.meta.get("val")) for a in reads)
    written = [n for n in group if any(u not in inside for u in n.users) or not n.users]
    # A view written out is the data of the member it views; a view of an outside tensor writes nothing.
    write_bytes = sum(_tensor_bytes(n.meta.get("val")) for n in written
                      if node_cost(n).fwd_bytes > 0 or any(a in inside for a in n.all_input_nodes))
    return int(read_bytes + write_bytes)


def _fused_seconds(bytes_moved: float, kernels: int, device) -> float:
    if bytes_moved <= 0:
        return 0.0
    return bytes_moved / device.achieved_fused_bandwidth + kernels * device.fused_launch_seconds


def _casts_seconds(cost: NodeCost, device) -> float:
    """What autocast's conversions of the node's activation inputs cost eagerly (node_costs.py prices
    each as its own memory-bound kernel)."""
    from autopart.cost_models import op_seconds

    return sum(op_seconds(0, AUTOCAST_CAST_BYTES_PER_ELEMENT * n, device, torch.bfloat16) for n in cost.fusible_casts)


def _tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(value)
               if isinstance(t, torch.Tensor))


def _numel(value: Any) -> int:
    return max((t.numel() for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)), default=0)
