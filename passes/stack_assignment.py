"""A tensor-parallel assignment chosen on a copy with a few identical layers, restated on the whole model.

The strategy ILP runs on the copy (passes/layer_stack.py) with identical
layers tied and every value between blocks pinned Replicate, so each layer's
choice is independent of the others and equal for all identical layers; layer
i of the whole model takes the choice of the kept layer that stands for it
(passes/stack_blocks.py). Nodes correspond block by block and position by
position (the same ops in the same order, checked); parameters by name with the
layer index moved; placeholders by position. Each decision's input names are
renamed through the corresponding nodes' own inputs.
"""

from __future__ import annotations

import dataclasses

import torch.fx

from autopart.passes.layer_stack import LayerStack
from autopart.core.blocks import BlockGraph
from autopart.passes.node_costs import node_cost
from autopart.passes.tensor_parallel.assignment import Collective, NodePlacement, TPAssignment
from autopart.passes.tensor_parallel.placements import Shard
from autopart.passes.stack_blocks import StackExpansion, representative_layer


def restate_assignment(short_gm: torch.fx.GraphModule, short_blocks: BlockGraph, full_gm: torch.fx.GraphModule,
                       full_blocks: BlockGraph, expansion: StackExpansion,
                       assignment: TPAssignment) -> TPAssignment | None:
    """`assignment` (made on `short_gm`) on `full_gm`; None when the two graphs do not line up."""
    source = _correspondence(short_gm, short_blocks, full_gm, full_blocks, expansion)
    if source is None:
        return None
    short_nodes = {n.name: n for n in short_gm.graph.nodes}
    nodes: dict[str, NodePlacement] = {}
    collectives: list[Collective] = []
    by_value: dict[str, list[Collective]] = {}
    for collective in assignment.collectives:
        by_value.setdefault(collective.value, []).append(collective)
    param_bytes = 0.0
    for node in full_gm.graph.nodes:
        name = source.get(node.name)
        if name is None:
            continue
        decision = assignment.nodes.get(name)
        if decision is not None:
            local = dict(zip((a.name for a in short_nodes[name].all_input_nodes),
                             (a.name for a in node.all_input_nodes)))
            local[name] = node.name
            try:
                nodes[node.name] = dataclasses.replace(
                    decision, inputs=tuple((local[n], p) for n, p in decision.inputs),
                    grad_sync=tuple(local[n] for n in decision.grad_sync),
                    scaled_bias=local[decision.scaled_bias] if decision.scaled_bias is not None else None)
            except KeyError:
                return None
            if node.op == "get_attr":
                size = node_cost(node).param_bytes
                param_bytes += size / assignment.tp if isinstance(decision.output, Shard) else size
        collectives += [dataclasses.replace(c, value=node.name) for c in by_value.get(name, ())]
    return dataclasses.replace(assignment, nodes=nodes, collectives=tuple(collectives),
                               param_bytes_per_device=int(param_bytes))


def _correspondence(short_gm, short_blocks: BlockGraph, full_gm, full_blocks: BlockGraph,
                    expansion: StackExpansion) -> dict[str, str] | None:
    """Whole-model node name -> the analysed node it restates."""
    if len(full_blocks.blocks) != expansion.num_blocks:
        return None
    short_nodes = {n.name: n for n in short_gm.graph.nodes}
    full_nodes = {n.name: n for n in full_gm.graph.nodes}
    source: dict[str, str] = {}
    for whole, block in enumerate(full_blocks.blocks):
        analysed = short_blocks.blocks[expansion.analysed_block(whole)]
        if len(block.node_names) != len(analysed.node_names):
            return None
        for full_name, short_name in zip(block.node_names, analysed.node_names):
            if full_nodes[full_name].target != short_nodes[short_name].target:
                return None
            source[full_name] = short_name
    short_inputs = [n.name for n in short_gm.graph.nodes if n.op == "placeholder"]
    full_inputs = [n.name for n in full_gm.graph.nodes if n.op == "placeholder"]
    if len(short_inputs) != len(full_inputs):
        return None
    source.update(zip(full_inputs, short_inputs))
    short_attrs = {n.target: n.name for n in short_gm.graph.nodes if n.op == "get_attr"}
    for node in full_gm.graph.nodes:
        if node.op == "get_attr":
            target = _analysed_name(node.target, expansion.stack)
            if target not in short_attrs:
                return None
            source[node.name] = short_attrs[target]
    return source


def _analysed_name(target: str, stack: LayerStack) -> str:
    """A parameter of layer i named as the one of the kept layer that stands for it."""
    head = stack.layer_prefix(0)[:-1]
    if not target.startswith(head):
        return target
    index, _, rest = target[len(head):].partition(".")
    if not index.isdigit() or not rest:
        return target
    return f"{stack.kept_prefix(representative_layer(int(index), stack))}.{rest}"
