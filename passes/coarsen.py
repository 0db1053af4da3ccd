"""Group the nodes of a costed graph into blocks, the units the planner places.

A block is a run of consecutive nodes (graph order, which is topological) that
belong to the same module at the chosen depth of ``nn_module_stack``. At depth
0 that module is the model's repeated layer (the element of a ModuleList or
Sequential, e.g. ``model.layers.3``), so the solver's size follows the number of
layers, not of ops; deeper levels split layers into their submodules, and the
last level puts every op in a block of its own (for more stages than layers).

Identical repeated layers get the same `Block.signature` (same ops, shapes and
dtypes), which later passes use to share decisions between them.
"""

from __future__ import annotations

import hashlib
import operator
import re

import torch
import torch.fx
import torch.utils._pytree as pytree

from autopart.cost_models import Cluster
from autopart.passes.attention_reads import attention_reads
from autopart.passes.expert_parallel import expert_bytes, expert_weight_casts
from autopart.passes.node_costs import (NodeCost, fixed_seconds, mutates, node_cost, per_call_seconds,
                                        priced_seconds)
from autopart.core.blocks import Block, BlockGraph, BlockTimes, BlockValue
from autopart.core.recompute import SAVED_GRAPH_OPS, op_name

_ELEMENT = re.compile(r"(^|\.)\d+$")  # "layers.3", "0": an element of a ModuleList/Sequential
ROOT = "<root>"


def coarsen(gm: torch.fx.GraphModule, cluster: Cluster, *, min_blocks: int = 1,
            depth: int | None = None) -> BlockGraph:
    """Blocks at the coarsest depth that gives at least `min_blocks` blocks (or at `depth`).

    Depth 0 groups by repeated layer; each deeper level splits by the next
    module down; when no module is left to split by, every op is its own block.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in gm.graph.nodes:
        node_cost(node) if node.op != "output" else None  # fail early if not annotated
    max_depth = max((len(_stack(n)) for n in nodes), default=0)
    if depth is not None:
        return _block_graph(gm, _runs(nodes, depth, op_level=depth > max_depth), cluster, depth)
    depth = 0
    while True:
        runs = _runs(nodes, depth, op_level=depth > max_depth)
        if len(runs) >= min_blocks or depth > max_depth:
            break
        depth += 1
    return _block_graph(gm, runs, cluster, depth)


def _stack(node: torch.fx.Node) -> list[str]:
    return [path for path, _cls in (node.meta.get("nn_module_stack") or {}).values() if path]


def _key(node: torch.fx.Node, depth: int) -> str:
    """The module path that groups `node` at `depth` (0: its repeated layer)."""
    stack = _stack(node)
    if not stack:
        return ROOT
    layer = next((i for i, path in enumerate(stack) if _ELEMENT.search(path)), 0)
    return stack[min(layer + depth, len(stack) - 1)]


def _runs(nodes: list[torch.fx.Node], depth: int, op_level: bool) -> list[tuple[str, list[torch.fx.Node]]]:
    runs: list[tuple[str, list[torch.fx.Node]]] = []
    keys: dict[torch.fx.Node, str] = {}
    for node in nodes:
        if node.target is operator.getitem and node.args[0] in keys:
            # an element of a multi-output op stays with the op: tuples do not cross stages
            key = keys[node.args[0]]
        else:
            key = node.name if op_level else _key(node, depth)
        keys[node] = key
        if runs and runs[-1][0] == key:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
    if not op_level:
        runs = _merge_glue(runs)
    seen: dict[str, int] = {}
    named = []
    for key, members in runs:
        seen[key] = seen.get(key, 0) + 1
        named.append((key if seen[key] == 1 else f"{key}#{seen[key]}", members))
    return named


def _merge_glue(runs: list[tuple[str, list[torch.fx.Node]]]) -> list[tuple[str, list[torch.fx.Node]]]:
    """Fold runs that read no parameter (residual adds, masks between layers) into the run before.

    They are glue of the enclosing module, too small to be worth a cut of their own.
    """
    merged: list[tuple[str, list[torch.fx.Node]]] = []
    for key, members in runs:
        reads_param = any(arg.op == "get_attr" for n in members for arg in n.all_input_nodes)
        if merged and not reads_param:
            merged[-1][1].extend(members)
        elif merged and merged[-1][0] == key:
            merged[-1][1].extend(members)
        else:
            merged.append((key, list(members)))
    return merged


def _block_graph(
    gm: torch.fx.GraphModule, runs: list[tuple[str, list[torch.fx.Node]]], cluster: Cluster, depth: int
) -> BlockGraph:
    block_of: dict[torch.fx.Node, int] = {}
    for index, (_, members) in enumerate(runs):
        for node in members:
            block_of[node] = index
    # Model inputs enter the pipeline at the first block.
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            block_of[node] = 0

    devices = {d.name: d for d in cluster.devices}
    output_bytes = [0] * len(runs)
    output_float32_bytes = [0] * len(runs)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for node in dict.fromkeys(a for a in pytree.tree_leaves(output.args) if isinstance(a, torch.fx.Node)):
        if node in block_of:
            tensors = [t for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)]
            output_bytes[block_of[node]] += sum(t.numel() * t.element_size() for t in tensors)
            output_float32_bytes[block_of[node]] += sum(4 * t.numel() for t in tensors if t.is_floating_point())
    blocks = []
    for index, (name, members) in enumerate(runs):
        attrs = _attrs_read(members)
        costs = [node_cost(n) for n in members]
        attr_costs = [node_cost(a) for a in attrs]
        kept = [node_cost(n) for n in members if op_name(n.target) in SAVED_GRAPH_OPS]
        recomputed = [node_cost(n) for n in members if op_name(n.target) not in SAVED_GRAPH_OPS]
        blocks.append(
            Block(
                name=name,
                node_names=tuple(n.name for n in members),
                param_names=tuple(dict.fromkeys(a.target for a in attrs)),
                signature=_signature(members),
                fwd_flops=sum(c.fwd_flops for c in costs),
                bwd_flops=sum(c.bwd_flops for c in costs),
                param_bytes=_unique_sum(attrs, lambda c: c.param_bytes),
                num_params=sum({a.target: a.meta["val"].numel() for a in attrs
                                if node_cost(a).param_bytes > 0}.values()),
                trainable_param_bytes=_unique_sum(attrs, lambda c: c.param_bytes if c.trainable else 0),
                buffer_bytes=_unique_sum(attrs, lambda c: c.buffer_bytes),
                saved_bytes=sum(c.saved_bytes for c in costs) + sum(c.saved_bytes for c in attr_costs),
                times=tuple(_times(costs, device) for device in devices.values()),
                model_output_bytes=output_bytes[index],
                model_output_float32_bytes=output_float32_bytes[index],
                parameters=tuple({a.target: (a.target, node_cost(a).param_bytes, node_cost(a).trainable,
                                             a.meta["val"].numel())
                                  for a in attrs if node_cost(a).param_bytes > 0}.values()),
                input_bytes=_input_bytes(members),
                selective_saved_bytes=sum(c.output_bytes for c in kept),
                autocast_weight_bytes=_autocast_weight_bytes(members),
                # a 'selective' region runs op by op, compiled plan or not (autopart/runtime/kernels.py)
                selective_times=tuple(_times(recomputed, device, eager=True) for device in devices.values()),
                eager_times=(tuple(_times(costs, device, eager=True) for device in devices.values())
                             if any(c.op_by_op is not None for c in costs) else ()),
                recomputable=not _writes_outside(members),
                expert_cast_times=_expert_cast_times(members, devices.values()),
                **expert_bytes(members, attrs),
                **attention_reads(members),
            )
        )

    values = []
    for node, producer in block_of.items():
        consumers = sorted({block_of[u] for u in node.users if u in block_of and block_of[u] != producer})
        if consumers:  # every data dependency orders blocks, whatever its type
            tensors = [t for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)]
            values.append(
                BlockValue(node_name=node.name, producer=producer, consumers=tuple(consumers),
                           num_bytes=sum(t.numel() * t.element_size() for t in tensors))
            )
    values.sort(key=lambda v: (v.producer, v.node_name))
    return BlockGraph(blocks=tuple(blocks), values=tuple(values), depth=depth)


def _expert_cast_times(members: list[torch.fx.Node], devices) -> tuple[BlockTimes, ...]:
    """Per device, the time of the expert weight casts among `members` (empty when there are none)."""
    casts = [node_cost(n) for n in expert_weight_casts(members)]
    return tuple(_times(casts, device) for device in devices) if casts else ()


def _autocast_weight_bytes(members: list[torch.fx.Node]) -> int:
    """Bytes of the weight copies autocast makes for the matmuls of `members` (each weight once: the
    autocast cache keeps one copy per weight within the region)."""
    copies: dict[str, int] = {}
    for node in members:
        out = node.meta.get("val")
        if op_name(node.target) not in SAVED_GRAPH_OPS or not isinstance(out, torch.Tensor):
            continue
        for arg in node.all_input_nodes:
            weight = arg.meta.get("val")
            if (arg.op == "get_attr" and isinstance(weight, torch.Tensor) and weight.is_floating_point()
                    and weight.dim() >= 2  # a bias's copy is not saved: its gradient is a sum
                    and weight.dtype != out.dtype and node_cost(arg).param_bytes > 0):
                copies[arg.target] = weight.numel() * out.element_size()
    return sum(copies.values())


def _writes_outside(members: list[torch.fx.Node]) -> bool:
    """Whether an op of `members` writes into a tensor no member computed (a buffer, an input)."""
    inside = set(members)
    for node in members:
        if not mutates(node.target):
            continue
        schema = node.target._schema
        for position, argument in enumerate(schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
            written = [v for v in pytree.tree_leaves(value) if isinstance(v, torch.fx.Node)]
            if any(v not in inside for v in written):
                return True
    return False


def _input_bytes(members: list[torch.fx.Node]) -> int:
    """Bytes of the tensors `members` read that no member computes and no get_attr holds (each once)."""
    inside = set(members)
    seen: set[torch.fx.Node] = set()
    total = 0
    for node in members:
        for arg in node.all_input_nodes:
            if arg in inside or arg in seen or arg.op == "get_attr":
                continue
            seen.add(arg)
            total += sum(t.numel() * t.element_size() for t in pytree.tree_leaves(arg.meta.get("val"))
                         if isinstance(t, torch.Tensor))
    return total


def _attrs_read(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    attrs = []
    for node in members:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                attrs.append(arg)
    return list(dict.fromkeys(attrs))


def _unique_sum(attrs: list[torch.fx.Node], part) -> int:
    by_target = {a.target: part(node_cost(a)) for a in attrs}
    return sum(by_target.values())


def _times(costs: list[NodeCost], device, *, eager: bool = False) -> BlockTimes:
    """The block's forward and backward seconds on `device` (with `eager`, op by op), split into what
    is fixed per call (launches, `fixed_seconds`; weight conversions, `per_call_seconds`) and the
    rest, which scales with the microbatch."""
    seconds = [priced_seconds(c, device.name, eager=eager) for c in costs]
    fwd = sum(f for f, _ in seconds)
    bwd = sum(b for _, b in seconds)
    # fixed: each node's launches and its work once per call (autocast's weight conversions), at most its time
    fixed = [(min(t[0], launch[0] + call[0]), min(t[1], launch[1] + call[1])) for t, launch, call in zip(
        seconds, (fixed_seconds(c, device.name, device.launch_overhead_s, eager=eager) for c in costs),
        (per_call_seconds(c, device.name, eager=eager) for c in costs))]
    fwd_fixed = sum(f for f, _ in fixed)
    bwd_fixed = sum(b for _, b in fixed)
    return BlockTimes(
        device=device.name,
        fwd_fixed_s=fwd_fixed,
        fwd_scaled_s=fwd - fwd_fixed,
        bwd_fixed_s=bwd_fixed,
        bwd_scaled_s=bwd - bwd_fixed,
    )


def _signature(members: list[torch.fx.Node]) -> str:
    """Hash of ops, output shapes and dtypes, and parameter shapes: equal for identical layers."""
    digest = hashlib.sha1()
    for node in members:
        digest.update(str(node.target).encode())
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            digest.update(f"{tuple(val.shape)}{val.dtype}".encode())
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and isinstance(arg.meta.get("val"), torch.Tensor):
                digest.update(f"p{tuple(arg.meta['val'].shape)}".encode())
    return digest.hexdigest()[:16]
