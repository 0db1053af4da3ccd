"""Random ops on sharded values draw from the tp rank's own stream (autopart/tp_random.py).

After `shard_graph`, every node of a rank module carries its tensor-parallel
placement. A random op (dropout, bernoulli, SDPA with dropout) whose output is
sharded becomes `sharded_random(stream, op, ...)`, where `stream` is the rank
module's `ShardedStream` (attribute `_tp_random`, seeded per tp rank): its
shards draw independent masks. Random ops on replicated or partial values keep
the default generator, which all ranks of the group hold alike, so they drop
the same elements everywhere (a partial sum masked alike on every rank sums to
the masked total).
"""

from __future__ import annotations

import torch
import torch.fx

from autopart.passes.tensor_parallel.shard import PLACEMENT_META_KEY
from autopart.core.tp_random import STREAM_ATTR, ShardedStream, draws_random, sharded_random, sharded_seed


def route_sharded_random(ranks: list[torch.fx.GraphModule], base_seed: int | None = None) -> list[torch.fx.GraphModule]:
    """Give each rank module its own stream and route its sharded random ops through it (in place)."""
    seed = torch.initial_seed() if base_seed is None else base_seed
    for tp_index, gm in enumerate(ranks):
        sharded = [n for n in gm.graph.nodes
                   if draws_random(n) and str(n.meta.get(PLACEMENT_META_KEY, "R")).startswith("S")]
        if not sharded:
            continue
        route_through_stream(gm, STREAM_ATTR, ShardedStream(sharded_seed(seed, tp_index, tp=len(ranks))), sharded)
        gm.recompile()
    return ranks


def route_through_stream(gm: torch.fx.GraphModule, attr: str, stream: ShardedStream,
                         nodes: list[torch.fx.Node]) -> None:
    """Make every random op of `nodes` draw from `stream` (held as submodule `attr`) through
    `sharded_random`, keeping each node's name and meta; the caller recompiles."""
    gm.add_submodule(attr, stream)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        held = gm.graph.get_attr(attr)
    for node in nodes:
        with gm.graph.inserting_before(node):
            routed = gm.graph.call_function(sharded_random, (held, node.target, *node.args), dict(node.kwargs))
        routed.meta = dict(node.meta)
        node.replace_all_uses_with(routed)
        name = node.name
        gm.graph.erase_node(node)
        routed._rename(name)  # the plan's name: per-node decisions and blocks still find it
