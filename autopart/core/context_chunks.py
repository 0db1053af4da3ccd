"""Context parallelism's layout of a sequence: which positions each rank of a cp group holds.

A sequence of S tokens is cut into 2·cp equal chunks of L = S / (2·cp) positions; rank i of a
cp group holds chunks i and 2·cp − 1 − i, in that order, and its local sequence is their
concatenation. Under a causal mask every rank then attends over the same number of
(query, key) pairs: chunk c sees (c + 1)·L keys, so rank i's two chunks see (2·cp + 1)·L together
(Llama 3's context parallelism and torchtitan's load balancing; PyTorch's
`torch.distributed.tensor.experimental._context_parallel._load_balancer._HeadTailLoadBalancer`
lays sequences out the same way, but is private and builds its indices for DTensor buffers).

A tensor dimension may merge the sequence with other dimensions (logits [b, S, V] viewed as
[b·S, V]): it holds `outer` × S × `inner` elements in row-major order, and a rank holds, for
every outer index, its positions, each with its `inner` elements. Every index here is a plain
function of (S, cp, rank, outer, inner), shared by the pass that rewrites rank modules and the
modules that run them. The rank modules themselves carry a `ContextParallelInfo` in their meta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTEXT_PARALLEL_META_KEY = "autopart_context_parallel"
"""GraphModule meta: a context-parallel rank module's `ContextParallelInfo`."""
CP_RANDOM_ATTR = "_cp_random"
"""Attribute of a context-parallel rank module holding the `ShardedStream` its random ops on whole values
draw from: alike on every rank of the group (passes/context_parallel/rewrite.py)."""
CP_RANDOM_SEED_OFFSET = 31337
"""Its seed above the default generator's (`tp_random.replica_seed` of the batch shard: every replica of a cp
group draws alike, each group of samples afresh)."""


def check_divisible(sequence_length: int, cp: int) -> None:
    """Raise ValueError unless the sequence cuts into 2·cp equal chunks."""
    if cp < 1 or sequence_length % (2 * cp):
        raise ValueError(f"a sequence of {sequence_length} tokens does not cut into 2 × context_parallel="
                         f"{cp} equal chunks; choose a context_parallel c with {sequence_length} % (2·c) == 0")


def chunks_of(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2·cp) rank `rank` holds, in its local order."""
    if not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} is outside 0..{cp - 1}")
    return rank, 2 * cp - 1 - rank


def local_positions(sequence_length: int, cp: int, rank: int) -> list[int]:
    """The sequence positions rank `rank` holds, in its local order."""
    check_divisible(sequence_length, cp)
    size = sequence_length // (2 * cp)
    return [c * size + j for c in chunks_of(cp, rank) for j in range(size)]


def local_index(sequence_length: int, cp: int, rank: int, outer: int = 1, inner: int = 1,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Indices, into a dimension of outer × S × inner elements, of the ones rank `rank` holds (its
    local dimension's order: every outer index, then its positions, then inner)."""
    positions = torch.tensor(local_positions(sequence_length, cp, rank), dtype=torch.int64, device=device)
    base = torch.arange(outer, dtype=torch.int64, device=device)[:, None, None] * (sequence_length * inner)
    within = torch.arange(inner, dtype=torch.int64, device=device)[None, None, :]
    return (base + positions[None, :, None] * inner + within).reshape(-1)


def natural_order(sequence_length: int, cp: int, outer: int = 1, inner: int = 1,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """For the ranks' local dimensions concatenated in rank order (what an all-gather returns), the
    index of each element of the whole dimension: `gathered.index_select(dim, natural_order(...))`
    is the whole tensor in sequence order."""
    gathered = torch.cat([local_index(sequence_length, cp, r, outer, inner, device) for r in range(cp)])
    order = torch.empty_like(gathered)
    order[gathered] = torch.arange(gathered.numel(), dtype=torch.int64, device=gathered.device)
    return order


def causal_chunk_masks(sequence_length: int, cp: int, rank: int, device: torch.device | str | None = None
                       ) -> list[tuple[int, torch.Tensor]]:
    """For each of rank `rank`'s two chunks: (keys it may see, its boolean causal mask [L, keys]).

    Chunk c (queries at positions c·L … c·L + L − 1) sees the keys 0 … (c + 1)·L − 1, query j the
    ones up to c·L + j: a causal mask aligned at its lower right corner."""
    check_divisible(sequence_length, cp)
    size = sequence_length // (2 * cp)
    masks = []
    for c in chunks_of(cp, rank):
        keys = (c + 1) * size
        masks.append((keys, torch.ones(size, keys, dtype=torch.bool, device=device).tril(diagonal=c * size)))
    return masks


@dataclass(frozen=True, kw_only=True)
class ContextParallelInfo:
    """A rank module whose sequences are split over a cp group (passes/context_parallel/)."""

    cp: int
    sequence_length: int
    """Tokens per sample, whole (S)."""
    modules: tuple[str, ...]
    """call_module targets of its context-parallel ops (at the module's top or inside its regions).
    Each has `cp_rank` (None until `localize` gives it this rank's index; the one-process simulation
    leaves it None), `process_group`, and `across_ranks(per_rank_args)`: every rank's output from
    every rank's arguments, in one process."""
    cp_rank: int | None = None
    """This module's index in its cp group once localized."""


def context_parallel_info(gm: torch.nn.Module) -> ContextParallelInfo | None:
    """The `ContextParallelInfo` of a context-parallel rank module, or None."""
    return getattr(gm, "meta", {}).get(CONTEXT_PARALLEL_META_KEY)
