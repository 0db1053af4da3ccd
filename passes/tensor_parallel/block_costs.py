"""Block costs under a tensor-parallel assignment, for the pipeline planner.

For one tp group size the strategy problem (problem.py) is built with stage
boundaries pinned Replicate (`boundaries_replicated`: every value that crosses
blocks), so any pipeline cut between blocks needs no resharding. Once the
driver has it solved, `restate_blocks` restates each block's cost per device
of the tp group: compute of the chosen strategies plus the collectives of the
values the block computes, parameter bytes of the chosen slices, and saved
activations in the placement each op keeps them (`_saved_on_rank`). The pipeline planner
places these blocks on tp groups as it places unsplit blocks on devices.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
import torch.fx

from autopart.cost_models import Cluster
from autopart.core.blocks import Block, BlockGraph, BlockTimes
from autopart.passes.attention_reads import is_attention
from autopart.passes.context_parallel.layout import attention_site
from autopart.passes.attrs import named_arguments
from autopart.passes.expert_parallel import expert_weight_of, is_expert_matmul
from autopart.passes.node_costs import node_cost
from autopart.passes.tensor_parallel.assignment import TPAssignment
from autopart.passes.tensor_parallel.placements import Placement, R, Shard
from autopart.passes.tensor_parallel.problem import TPProblemIndex


def boundaries_replicated(blocks: BlockGraph,
                          fixed: Mapping[str, Placement | str] | None = None) -> dict[str, Placement | str]:
    """Fixed placements for a pipeline's strategy problem: every value that crosses blocks
    Replicate, then the user's own (`fixed`, which may override them)."""
    pinned: dict[str, Placement | str] = {v.node_name: R for v in blocks.values}
    pinned.update(fixed or {})
    return pinned


def restate_blocks(gm: torch.fx.GraphModule, blocks: BlockGraph, cluster: Cluster, index: TPProblemIndex,
                   choice: Sequence[int], assignment: TPAssignment) -> BlockGraph:
    """`blocks` with every cost per device of the tp group, under the strategy `choice` (one per group
    of `index.problem`) and the `assignment` read back from it."""
    chosen = {name: choice[g] for name, g in index.node_group.items()}
    seconds = {name: float(index.node_seconds[name][k]) for name, k in chosen.items()}
    eager = index.node_eager_seconds or index.node_seconds
    eager_seconds = {name: float(eager[name][k]) for name, k in chosen.items()}
    param_bytes = {name: int(index.node_param_bytes[name][k]) for name, k in chosen.items()}
    for collective in assignment.collectives:
        seconds[collective.value] = seconds.get(collective.value, 0.0) + collective.seconds
        eager_seconds[collective.value] = eager_seconds.get(collective.value, 0.0) + collective.seconds
    attr_node = {n.target: n.name for n in gm.graph.nodes if n.op == "get_attr"}
    nodes = {n.name: n for n in gm.graph.nodes}
    device = cluster.devices[0].name
    new_blocks = tuple(_restate(block, nodes, attr_node, seconds, eager_seconds, param_bytes, assignment, device,
                                index.pricing.training) for block in blocks.blocks)
    return dataclasses.replace(blocks, blocks=new_blocks)


def _saved_on_rank(node: torch.fx.Node, assignment: TPAssignment) -> float:
    """Bytes `node` keeps for backward on one rank: an input's storage in the placement the op reads it
    (a colwise linear keeps a replicated input whole, a norm on sequence shards 1/tp of it, and an input
    gathered from its sequence shard is kept as the shard: core/sequence_saves.py); its own outputs and
    intermediates (an autocast copy of a split weight) 1/tp unless its output is Replicate."""
    cost = node_cost(node)
    decision = assignment.nodes.get(node.name)
    from_inputs = 0.0
    for name, nbytes in cost.saved_inputs:
        place = decision.input_placement(name) if decision is not None else None
        if place is None:
            place = assignment.output_placement(name)
        regathered = name in (decision.grad_sync if decision is not None else ()) and isinstance(
            assignment.output_placement(name), Shard)
        from_inputs += nbytes / assignment.tp if isinstance(place, Shard) or regathered else nbytes
    own = cost.saved_bytes - sum(n for _, n in cost.saved_inputs)
    return from_inputs + own / (1 if assignment.output_placement(node.name) == R else assignment.tp)


def _kv_on_rank(node: torch.fx.Node, assignment: TPAssignment) -> float:
    """Bytes of the keys and values an attention op reads on one rank: 1/tp where it reads them
    split (by heads), whole where it reads them replicated. Eager attention (matmul → softmax →
    matmul, `node` its softmax) is priced by the placements its keys and values are made in."""
    site = None if is_attention(node) else attention_site(node)
    if site is None and not is_attention(node):
        return 0.0
    decision = assignment.nodes.get(node.name) if site is None else None
    total = 0.0
    reads = [named_arguments(node)[name] for name in ("key", "value")] if site is None else [site.key, site.value]
    for value in reads:
        tensor = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if not isinstance(tensor, torch.Tensor):
            continue
        place = decision.input_placement(value.name) if decision is not None else None
        if place is None:
            place = assignment.output_placement(value.name)
        total += tensor.numel() * tensor.element_size() / (assignment.tp if isinstance(place, Shard) else 1)
    return total


def _ratio(times: BlockTimes, seconds: dict[str, float], block: Block, training: bool) -> float:
    """The block's time under the chosen strategies (`seconds` per node: forward, and backward when
    `training`) over its time unsplit (`times`)."""
    old = times.fwd(1.0) + (times.bwd(1.0) if training else 0.0)
    new = sum(seconds.get(name, 0.0) for name in block.node_names)
    return new / old if old > 0 else 1.0


def _scaled(times: tuple[BlockTimes, ...], ratio: float, backward: bool = True) -> tuple[BlockTimes, ...]:
    return tuple(BlockTimes(device=t.device, fwd_fixed_s=t.fwd_fixed_s * ratio, fwd_scaled_s=t.fwd_scaled_s * ratio,
                            bwd_fixed_s=t.bwd_fixed_s * ratio if backward else 0.0,
                            bwd_scaled_s=t.bwd_scaled_s * ratio if backward else 0.0) for t in times)


def _restate(block: Block, nodes, attr_node, seconds, eager_seconds, param_bytes, assignment: TPAssignment,
             device: str, training: bool) -> Block:
    ratio = _ratio(block.time_on(device), seconds, block, training)
    # op by op (a compiled plan's selective regions, and their replay), by the same splits
    eager_ratio = (_ratio(next(t for t in block.eager_times if t.device == device), eager_seconds, block, training)
                   if block.eager_times else ratio)
    held = sum(param_bytes.get(attr_node[t], 0) for t in block.param_names if t in attr_node)
    share = held / block.param_bytes if block.param_bytes else 1.0
    saved = sum(_saved_on_rank(nodes[name], assignment) for name in block.node_names)
    # the pipeline planner prices fwd and bwd separately: keep the block's own split of the two
    scaled = _scaled(block.times, ratio)
    # recomputation's figures follow the same splits: what 'selective' keeps (matmul outputs) and the
    # autocast copies of the weights shrink as the saved tensors and the weights do; the block's inputs
    # (a stage boundary, replicated) do not; the replayed forward takes the block's new time
    kept = saved / block.saved_bytes if block.saved_bytes else 1.0
    kv = sum(_kv_on_rank(nodes[name], assignment) for name in block.node_names)
    selective = _scaled(block.selective_times, eager_ratio, backward=False)
    if block.expert_param_bytes:
        block = _restate_experts(block, nodes, attr_node, param_bytes, assignment)
    return dataclasses.replace(block, times=scaled, eager_times=_scaled(block.eager_times, eager_ratio),
                               param_bytes=int(held), num_params=int(block.num_params * share),
                               trainable_param_bytes=int(block.trainable_param_bytes * share),
                               saved_bytes=int(saved),
                               selective_saved_bytes=int(block.selective_saved_bytes * kept),
                               autocast_weight_bytes=int(block.autocast_weight_bytes * share),
                               selective_times=selective, attention_kv_bytes=int(kv),
                               parameters=tuple((t, param_bytes.get(attr_node.get(t), 0), trainable,
                                                 int(numel * param_bytes.get(attr_node.get(t), 0) / size) if size else 0)
                                                for t, size, trainable, numel in block.parameters))


def _restate_experts(block: Block, nodes, attr_node, param_bytes, assignment: TPAssignment) -> Block:
    """The block's expert figures on one rank of the tp group: under expert tensor parallelism
    (expert_rules.py) each rank holds 1/tp of every expert weight (and of its bf16 copy and cast), and
    the rows it dispatches and gets back under expert parallelism are the ones in its placements."""
    matmuls = [nodes[n] for n in block.node_names if is_expert_matmul(nodes[n]) and expert_weight_of(nodes[n])]
    weights = {expert_weight_of(n) for n in matmuls}
    held = sum(param_bytes.get(attr_node.get(t), 0) for t in weights)
    share = held / block.expert_param_bytes
    rows = 0.0
    for node in matmuls:
        x, out, decision = node.args[0], node, assignment.nodes.get(node.name)
        x_place = decision.input_placement(x.name) if decision is not None else None
        for value, place in ((x, x_place), (out, assignment.output_placement(out.name))):
            val = value.meta["val"]
            rows += val.numel() * val.element_size() / (assignment.tp if isinstance(place, Shard) else 1)
    casts = tuple(BlockTimes(device=t.device, fwd_fixed_s=t.fwd_fixed_s, fwd_scaled_s=t.fwd_scaled_s * share,
                             bwd_fixed_s=t.bwd_fixed_s, bwd_scaled_s=t.bwd_scaled_s * share)
                  for t in block.expert_cast_times)
    return dataclasses.replace(block, expert_param_bytes=int(held),
                               expert_trainable_param_bytes=int(block.expert_trainable_param_bytes * share),
                               expert_cast_bytes=int(block.expert_cast_bytes * share), expert_cast_times=casts,
                               expert_rows_bytes=int(rows))
