"""Sequence parallelism on the tensor-parallel axis (Megatron-SP, Korthikanti et al. 2022, §4.2.2).

Between the split regions of a transformer layer (attention heads, MLP columns)
Megatron-2019 keeps the activations whole on every tp rank: the residual adds,
the norms and dropout run on all tokens tp times over, and the tensors they save
for backward are tp copies of the same bytes. Sequence parallelism shards those
activations along the sequence dimension instead: a row-parallel linear's
Partial output is reduce-scattered onto sequence shards (not all-reduced), the
norm, residual add and dropout run on 1/tp of the tokens, and the next
column-parallel linear all-gathers its input (whose gradient is reduce-scattered
back: collectives.py's `seq_all_gather`). The bytes moved equal the all-reduce's
(a ring all-reduce is a reduce-scatter then an all-gather); the saved activations
of the sharded ops shrink by tp.

Here it is one more placement the strategy ILP may choose, not a separate
rewrite: with `sequence=True`

- elementwise ops and norms are offered `Shard(1)`, the sequence dim of
  their [batch, sequence, hidden] float operands, beside the
  placements their inputs propagate (`sequence_candidates`), so a norm can read
  a reduce-scattered residual stream;
- the values between blocks (the residual stream, where a pipeline may cut)
  may be that sequence shard as well as Replicate (`boundary_placements`);
  with `force` (``sequence_parallel=True``) the residual stream must be.

The ILP prices the choice with everything else (collective α–β times, the
1/tp compute of the sharded ops); the saved bytes of sharded values are divided
by tp when blocks are restated (block_costs.py), which is what lets the planner
recompute less.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.fx

from autopart.core.blocks import BlockGraph
from autopart.passes.tensor_parallel.placements import Placement, R, Shard, can_shard, parse_placement

Candidates = Callable[[torch.fx.Node], list[Placement]]


def sequence_dim(value) -> int | None:
    """The sequence dimension of a residual-stream activation: dim 1 of a 3-D float [batch, sequence,
    hidden] tensor, else None (4-D values are attention's [b, s, heads, d] or [b, heads, s, d], split
    by heads inside the regions; models laid out [s, b, h] are not recognised)."""
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or not value.dtype.is_floating_point:
        return None
    return 1


def sequence_shard(node: torch.fx.Node, tp: int) -> Shard | None:
    """`Shard(sequence dim)` of the node's value when its length divides by tp, else None."""
    val = node.meta.get("val")
    d = sequence_dim(val)
    if d is None or not can_shard(tuple(int(s) for s in val.shape), d, 1, tp):
        return None
    return Shard(d)


def sequence_candidates(cands: Candidates, tp: int) -> Candidates:
    """`cands` plus each float activation's sequence shard (what a sequence-parallel region reads)."""
    def with_sequence(node: torch.fx.Node) -> list[Placement]:
        found = list(cands(node))
        shard = sequence_shard(node, tp)
        if shard is not None and shard not in found:
            found.append(shard)
        return found
    return with_sequence


def boundary_placements(gm: torch.fx.GraphModule, blocks: BlockGraph, tp: int, *, force: bool,
                        fixed: Mapping[str, Placement | str] | None = None) -> dict[str, Placement | frozenset]:
    """Placements the values between blocks may take under sequence parallelism, then the user's `fixed`.

    The residual stream (a value read by the next block only) may be Replicate or its sequence shard
    (only the shard with `force`, where its op can produce one: an embedding's output stays
    Replicate); values read by several blocks (rotary tables, masks) stay Replicate.
    A pipeline stage's output is gathered to Replicate (shard.py), so any cut between blocks runs.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    allowed: dict[str, Placement | frozenset] = {}
    for value in blocks.values:
        node = nodes.get(value.node_name)
        shard = sequence_shard(node, tp) if node is not None and node.op == "call_function" else None
        residual = shard is not None and value.consumers == (value.producer + 1,)
        allowed[value.node_name] = frozenset({shard} if force else {R, shard}) if residual else R
    allowed.update({k: parse_placement(v) for k, v in (fixed or {}).items()})
    return allowed
