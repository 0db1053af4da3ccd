"""The collectives of tensor-parallel rank modules: call_module nodes with Megatron's autograd pairs.

Collectives follow Megatron-LM's autograd pairs (Shoeybi et al. 2019, §3;
megatron/core/tensor_parallel/mappings.py), because the autograd registered
for `_c10d_functional.all_reduce` all-reduces again in backward, which makes a
column→row pair's gradients tp× too large (REFERENCES.md). With the gradient
of a Replicate value being the full gradient on every rank:

=================  ============================  ==============================
kind               forward                       backward
=================  ============================  ==============================
all_reduce (g)     sum over ranks                identity
grad_all_reduce(f) identity                      sum over ranks
all_gather         concatenate the shards        keep this rank's shard
slice              keep this rank's shard        concatenate the shards
reduce_scatter     this rank's shard of the sum  concatenate the shards
seq_all_gather     concatenate the shards        this rank's shard of the sum
=================  ============================  ==============================

(all_gather's backward is a local slice, not a reduce-scatter: its output's
gradient is already the full one on every rank; where a Replicate value also
feeds split ops, f supplies the sum.)

`seq_all_gather` is Megatron's sequence-parallel pair (Korthikanti et al. 2022,
§4.2.2; mappings.py `gather_from_sequence_parallel_region`): a value sharded on
its sequence dim, gathered for split work (a column-parallel linear) that needs
f on its gradient. all_gather then f would all-reduce the gradient and keep a
shard of it; the fused pair reduce-scatters it, moving half the bytes.

`TPCollective` runs on a real process group (`attach(group)`) with
`torch.distributed` ops inside autograd Functions. The one-process simulation
(`autopart.runtime.spmd`) runs the same modules across all ranks at once with
`across_ranks`, whose forward and backward (`simulated_forward`,
`simulated_backward`) compute exactly what the distributed ones compute.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx

from autopart.core.interfaces import merge_shards, take_shard
from autopart.core.sequence_saves import remember_gathered

KINDS = ("all_reduce", "grad_all_reduce", "all_gather", "slice", "reduce_scatter", "seq_all_gather")
PERFORMS = {
    ("all_reduce", "forward"): "all_reduce", ("grad_all_reduce", "backward"): "all_reduce",
    ("all_gather", "forward"): "all_gather", ("slice", "backward"): "all_gather",
    ("reduce_scatter", "forward"): "reduce_scatter", ("reduce_scatter", "backward"): "all_gather",
    ("seq_all_gather", "forward"): "all_gather", ("seq_all_gather", "backward"): "reduce_scatter",
}
"""(kind, phase) -> the collective that moves data then ('all_reduce', 'all_gather' or
'reduce_scatter'); pairs not listed are identities or local slices."""
COMMUNICATES = set(PERFORMS)
_LOG: list[list[tuple[str, str, str]]] = []


@contextlib.contextmanager
def collective_log() -> Iterator[list[tuple[str, str, str]]]:
    """Record (kind, 'forward'|'backward', value) of every communicating collective call in the block.

    `value` is the graph node whose value (or gradient) moves. Local halves of a
    pair (f's forward, g's backward, all_gather's backward slice) are not
    recorded. A simulated collective counts once per call, not once per rank."""
    events: list[tuple[str, str, str]] = []
    _LOG.append(events)
    try:
        yield events
    finally:
        _LOG.remove(events)


def _record(kind: str, phase: str, value: str) -> None:
    if (kind, phase) in COMMUNICATES and _LOG and not torch.compiler.is_compiling():
        for events in _LOG:
            events.append((kind, phase, value))


# ----------------------------------------------------------------------------- simulation semantics


def simulated_forward(kind: str, xs: Sequence[torch.Tensor], dim: int, groups: int) -> list[torch.Tensor]:
    """What every rank gets from a collective's forward, given every rank's input."""
    tp = len(xs)
    if kind == "all_reduce":
        total = _sum(xs)
        return [total.clone() for _ in xs]
    if kind == "grad_all_reduce":
        return [x.clone() for x in xs]
    if kind == "all_gather":
        full = merge_shards(xs, dim, groups)
        return [full.clone() for _ in xs]
    if kind == "slice":
        return [take_shard(x, dim, groups, tp, r) for r, x in enumerate(xs)]
    if kind == "reduce_scatter":
        total = _sum(xs)
        return [take_shard(total, dim, groups, tp, r) for r in range(tp)]
    if kind == "seq_all_gather":
        full = merge_shards(xs, dim, groups)
        return [full.clone() for _ in xs]
    raise ValueError(f"unknown collective kind {kind!r}; known: {KINDS}")


def simulated_backward(kind: str, grads: Sequence[torch.Tensor], dim: int, groups: int) -> list[torch.Tensor]:
    """What every rank's input gradient is, given every rank's output gradient."""
    tp = len(grads)
    if kind == "all_reduce":
        return [g.clone() for g in grads]
    if kind == "grad_all_reduce":
        total = _sum(grads)
        return [total.clone() for _ in grads]
    if kind == "all_gather":
        return [take_shard(g, dim, groups, tp, r) for r, g in enumerate(grads)]
    if kind in ("slice", "reduce_scatter"):
        full = merge_shards(grads, dim, groups)
        return [full.clone() for _ in grads]
    if kind == "seq_all_gather":
        total = _sum(grads)
        return [take_shard(total, dim, groups, tp, r) for r in range(tp)]
    raise ValueError(f"unknown collective kind {kind!r}; known: {KINDS}")


def _sum(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    # Rank order, like a reduction every rank receives identically.
    total = xs[0].clone()
    for x in xs[1:]:
        total = total + x
    return total


# ----------------------------------------------------------------------------- torch.distributed


def _dist_all_reduce(x: torch.Tensor, group, group_name: str | None = None) -> torch.Tensor:
    """The sum over the group, as a new tensor: the functional collective (traceable by Dynamo, so
    a compiled region keeps Megatron's f and g in its graph instead of breaking there)."""
    name = group_name if group_name is not None else group.group_name
    out = torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", name)
    return torch.ops._c10d_functional.wait_tensor(out)


def _dist_all_gather(x: torch.Tensor, dim: int, groups: int, group) -> torch.Tensor:
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x, group=group)
    return merge_shards(pieces, dim, groups)


def _dist_reduce_scatter(x: torch.Tensor, dim: int, groups: int, group) -> torch.Tensor:
    # gloo has no reduce-scatter: an all-reduce and a local slice give the same values
    # (the cost model prices the reduce-scatter NCCL runs).
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if groups == 1 and dist.get_backend(group) == "nccl":
        moved = x.movedim(dim, 0).contiguous()
        out = torch.empty((moved.shape[0] // tp, *moved.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, moved, group=group)
        return out.movedim(0, dim).contiguous()
    return take_shard(_dist_all_reduce(x, group), dim, groups, tp, rank)


class _DistCollective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind: str, dim: int, groups: int, group, value: str, group_name: str, tp: int, rank: int):
        ctx.kind, ctx.dim, ctx.groups, ctx.group, ctx.value = kind, dim, groups, group, value
        ctx.group_name, ctx.tp, ctx.rank = group_name, tp, rank
        _record(kind, "forward", value)
        if kind == "all_reduce":
            return _dist_all_reduce(x, group, group_name)
        if kind == "grad_all_reduce":
            return x.clone()
        if kind == "all_gather":
            return _dist_all_gather(x, dim, groups, group)
        if kind == "seq_all_gather":   # kept as the shard for backward (core/sequence_saves.py)
            out, shard = _dist_all_gather(x, dim, groups, group), x.detach()
            remember_gathered(out, lambda: _dist_all_gather(shard, dim, groups, group))
            return out
        if kind == "slice":
            return take_shard(x, dim, groups, tp, rank)
        if kind == "reduce_scatter":
            return _dist_reduce_scatter(x, dim, groups, group)
        raise ValueError(f"unknown collective kind {kind!r}")

    @staticmethod
    def backward(ctx, grad):
        kind, dim, groups, group = ctx.kind, ctx.dim, ctx.groups, ctx.group
        _record(kind, "backward", ctx.value)
        tp, rank = ctx.tp, ctx.rank
        if kind == "all_reduce":
            out = grad
        elif kind == "grad_all_reduce":
            out = _dist_all_reduce(grad, group, ctx.group_name)
        elif kind == "all_gather":
            out = take_shard(grad, dim, groups, tp, rank)
        elif kind == "seq_all_gather":
            out = _dist_reduce_scatter(grad, dim, groups, group)
        else:
            out = _dist_all_gather(grad, dim, groups, group)
        return out, None, None, None, None, None, None, None, None


class _AcrossRanks(torch.autograd.Function):
    """One collective over all ranks' tensors in one process: forward and backward as on a process group."""

    @staticmethod
    def forward(ctx, kind: str, dim: int, groups: int, value: str, *xs: torch.Tensor):
        ctx.kind, ctx.dim, ctx.groups, ctx.value = kind, dim, groups, value
        _record(kind, "forward", value)
        outs = tuple(simulated_forward(kind, xs, dim, groups))
        if kind == "seq_all_gather":   # kept as the shards for backward (core/sequence_saves.py)
            shards = [x.detach() for x in xs]
            for out in outs:
                remember_gathered(out, lambda: merge_shards(shards, dim, groups))
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        _record(ctx.kind, "backward", ctx.value)
        return (None, None, None, None, *simulated_backward(ctx.kind, grads, ctx.dim, ctx.groups))


class TPCollective(torch.nn.Module):
    """A collective node of a rank module (a `call_module`): one of `KINDS` on the tp axis."""

    def __init__(self, kind: str, *, dim: int = 0, groups: int = 1, tp: int, rank: int, value: str = "",
                 to_compute_dtype: bool = False) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"TPCollective(kind={kind!r}): known kinds are {KINDS}")
        self.kind, self.dim, self.groups, self.tp, self.rank = kind, dim, groups, tp, rank
        self.value = value
        """Node of the original graph whose value this collective moves."""
        self.to_compute_dtype = to_compute_dtype
        """Under autocast, cast a float32 input to the autocast dtype before moving it: every reader is a
        matmul autocast would cast it for anyway, and the gather then moves (and its saved copy keeps)
        half the bytes."""
        self.process_group = None
        self.group_name: str | None = None
        """The group's name, as functional collectives take it."""

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_compute_dtype and x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def extra_repr(self) -> str:
        return f"{self.kind}, dim={self.dim}, groups={self.groups}, rank={self.rank}/{self.tp}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.process_group is None:
            raise RuntimeError(
                f"tp collective {self.kind} has no process group: call "
                "attach_process_group(rank_module, group) before running a rank module on "
                "torch.distributed, or run all ranks with autopart.runtime.spmd.simulate_tp"
            )
        return _DistCollective.apply(self._cast(x), self.kind, self.dim, self.groups, self.process_group, self.value,
                                     self.group_name, self.tp, self.rank)

    def attach(self, group) -> None:
        """Talk over `group` from now on (its size must be the tp degree)."""
        size = dist.get_world_size(group)
        if size != self.tp:
            raise ValueError(f"process group has {size} ranks but the module was sharded for tp={self.tp}")
        self.process_group = group
        self.group_name = group.group_name

    def across_ranks(self, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every rank's output, given every rank's input (rank order), with the same autograd
        as on a process group: for running all ranks in one process."""
        return _AcrossRanks.apply(self.kind, self.dim, self.groups, self.value, *(self._cast(x) for x in xs))


def attach_process_group(module: torch.nn.Module, group) -> None:
    """Make every TPCollective of `module` talk over `group` (its size must be the tp degree)."""
    for sub in module.modules():
        if isinstance(sub, TPCollective):
            sub.attach(group)


def count_collectives(modules: list[torch.fx.GraphModule] | torch.fx.GraphModule) -> dict[str, int]:
    """Collective nodes of one rank module (the first, if given several), by kind, those inside its
    region submodules (passes/regions.py) included."""
    gm = modules[0] if isinstance(modules, (list, tuple)) else modules
    counts: dict[str, int] = {}
    graphs = [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    for module in graphs:
        for node in module.graph.nodes:
            if node.op == "call_module":
                sub = module.get_submodule(node.target)
                if isinstance(sub, TPCollective):
                    counts[sub.kind] = counts.get(sub.kind, 0) + 1
    return counts
