"""Expert tensor parallelism: a grouped expert matmul split over the tp group like a linear.

A mixture-of-experts layer's experts multiply their rows by [E, K, N] weights (HF 5.x:
`grouped_mm(x [S, D], gate_up_proj.T [E, D, 2F], offs)`, then `grouped_mm(h [S, F], down_proj.T
[E, F, D], offs)`; passes/expert_parallel.py). Each expert is a two-matmul MLP, so Megatron's
split applies expert by expert (Megatron-core's expert tensor parallelism): the first matmul
column-parallel (every expert's N dim, 2F, split; the gate and up halves split each, as a fused
[gate; up] is: the group count of the chunk that follows), the second row-parallel (its K dim, F,
split, and the rows' F with it), the partial sums reduced after it. The rows, the offsets and the
routing stay replicated: every rank computes a 1/tp slice of every expert on every routed row.

Strategies (besides running replicated):
- colwise: x Replicate, w Shard(2, g) → out Shard(1, g), 1/tp of the FLOPs; x's gradient is a
  per-rank addend (Megatron's f: an all-reduce in backward);
- rowwise: x Shard(1), w Shard(1) → out Partial, 1/tp of the FLOPs.
The offsets (integer) are read replicated. The strategy ILP chooses these or keeping the experts
whole, like any op, by their price (compute split, collectives, parameter bytes).
"""

from __future__ import annotations

import dataclasses

import torch.fx

from autopart.passes.tensor_parallel.placements import P, Shard, can_shard
from autopart.passes.tensor_parallel.strategy import Strategy, make_strategy, shape_of


def grouped_matmul_rule(node: torch.fx.Node, tp: int, groups: set[int], cands) -> list[Strategy]:
    """Column- and row-parallel strategies of `op(x [S, K], w [E, K, N], offs)` (module docstring)."""
    x, w = node.args[0], node.args[1]
    xs, ws, out = shape_of(x.meta["val"]), shape_of(w.meta["val"]), shape_of(node.meta["val"])
    if xs is None or ws is None or out is None or len(xs) != 2 or len(ws) != 3 or len(out) != 2:
        return []
    strategies = []
    for g in sorted(groups):
        if can_shard(ws, 2, g, tp) and can_shard(out, 1, g, tp):
            strategies.append(make_strategy(node, "colwise", Shard(1, g), {w: Shard(2, g)}, 1 / tp))
    if can_shard(ws, 1, 1, tp) and can_shard(xs, 1, 1, tp):
        strategies.append(make_strategy(node, "rowwise", P, {w: Shard(1), x: Shard(1)}, 1 / tp))
    return strategies


def experts_under_tp(gm: torch.fx.GraphModule, experts, assignment):
    """The plan's `ExpertsPlan` with its expert tensor parallelism: tp where the assignment splits the
    expert weights, and their bytes for the whole model (the blocks the plan was made on count a
    rank's 1/tp of a split weight). Unchanged without experts or tp."""
    if experts is None or assignment is None:
        return experts
    from autopart.passes.expert_parallel import expert_weight_of, is_expert_matmul
    from autopart.passes.node_costs import node_cost

    attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    weights = {expert_weight_of(n) for n in gm.graph.nodes if is_expert_matmul(n)} - {None}
    full = held = 0.0
    for target in weights:
        node = attrs.get(target)
        if node is None:
            continue
        size = node_cost(node).param_bytes
        split = isinstance(assignment.output_placement(node.name), Shard)
        full, held = full + size, held + (size / assignment.tp if split else size)
    if not full or held == full:
        return experts
    return dataclasses.replace(experts, tp=assignment.tp, weight_bytes=int(round(experts.weight_bytes * full / held)))


__all__ = ["experts_under_tp", "grouped_matmul_rule"]
