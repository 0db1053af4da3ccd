"""The ops a context-parallel rank module calls (call_module nodes, `cp_op_<k>`).

Each op runs two ways, like the tensor-parallel collectives (passes/tensor_parallel/collectives.py):

- on a process group: `forward`, with `cp_rank` (this rank's index in its cp group, set by
  `localize`) and `process_group` (the cp group, set by `attach_context_group`);
- in one process, every rank of a cp group at once: `across_ranks(per_rank_args)`, used by the
  lock-step simulation (autopart/runtime/spmd.py). There the collectives are plain differentiable
  tensor ops over all ranks' values (a concatenation, a sum), so autograd gives each rank what the
  collective's backward gives it on a process group.

Gradient convention. Every rank of a cp group computes the whole loss (the outputs and the loss
pieces are gathered or all-reduced), and seeds its own backward with it. The collectives'
backward are their exact adjoints: the all-gather's is a reduce-scatter (a sum over ranks), the
all-reduce's an all-reduce. So the gradients of the cp ranks' parameter copies sum to cp times
the gradient of the loss, and the data-parallel average over all dp replicas (cp ones included)
is the gradient of the mean loss over the batch, as DDP and FSDP already compute it.

| op | forward | backward |
| --- | --- | --- |
| `ContextSlice` | this rank's positions of a whole tensor | zeros elsewhere (index_select's) |
| `ContextGather` | all-gather, then sequence order | reduce-scatter of the sum |
| `ContextReduce` | all-reduce (sum) | all-reduce (sum) |
| `ContextAttention` | causal attention of this rank's two query chunks against the gathered keys | SDPA's |
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from autopart.core.context_chunks import causal_chunk_masks, check_divisible, local_index, natural_order
from autopart.passes.tensor_parallel.collectives import _dist_all_gather, _dist_reduce_scatter


class ContextOp(torch.nn.Module):
    """What every context-parallel op holds: the sequence, the group size, this rank's index."""

    communicates = False
    """Whether the op needs the cp process group (not only its rank index)."""

    def __init__(self, *, cp: int, sequence_length: int, value: str = "") -> None:
        super().__init__()
        check_divisible(sequence_length, cp)
        self.cp, self.sequence_length, self.value = cp, sequence_length, value
        self.cp_rank: int | None = None
        """This rank's index in its cp group (None: not localized; the simulation runs every rank)."""
        self.process_group = None
        self._indices: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"cp={self.cp}, sequence={self.sequence_length}, rank={self.cp_rank}, value={self.value}"

    def _index(self, kind: str, rank: int | None, outer: int, inner: int, device: torch.device) -> torch.Tensor:
        key = (kind, rank, outer, inner, str(device))
        if key not in self._indices:
            S, cp = self.sequence_length, self.cp
            self._indices[key] = (local_index(S, cp, rank, outer, inner, device) if kind == "local"
                                  else natural_order(S, cp, outer, inner, device))
        return self._indices[key]

    def _rank(self) -> int:
        if self.cp_rank is None:
            raise RuntimeError(f"{type(self).__name__} on {self.value} has no cp rank: localize the rank module "
                               "(passes.context_parallel.localize) or run all ranks with autopart.runtime.spmd")
        return self.cp_rank

    def _group(self):
        if self.process_group is None:
            raise RuntimeError(f"{type(self).__name__} on {self.value} has no process group: call "
                               "attach_context_group(rank_module, group) before running a localized rank module")
        return self.process_group

    def across_ranks(self, per_rank_args: Sequence[tuple]) -> list[Any]:
        """Every rank's output from every rank's arguments (rank order), in one process."""
        return [self.local(r, *args) for r, args in enumerate(per_rank_args)]

    def local(self, rank: int, *args: Any) -> Any:
        raise NotImplementedError


def _outer(x: torch.Tensor, dim: int, sequence: int, inner: int) -> int:
    size = x.shape[dim]
    if size % (sequence * inner):
        raise ValueError(f"dim {dim} of shape {tuple(x.shape)} does not hold {sequence} positions × {inner}")
    return size // (sequence * inner)


class ContextSlice(ContextOp):
    """This rank's positions of a whole tensor along `dim` (a token input, rotary tables, masks, labels)."""

    def __init__(self, *, dim: int, inner: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim, self.inner = dim, inner

    def local(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        outer = _outer(x, self.dim, self.sequence_length, self.inner)
        return x.index_select(self.dim, self._index("local", rank, outer, self.inner, x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(self._rank(), x)


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` in rank order; backward: this rank's piece of the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _dist_all_gather(x, dim, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _dist_reduce_scatter(grad.contiguous(), ctx.dim, 1, ctx.group), None, None


class ContextGather(ContextOp):
    """The whole tensor, in sequence order, from every rank's positions along `dim` (keys and values
    for attention, the model's outputs, the operand of an op that mixes positions)."""

    communicates = True

    def __init__(self, *, dim: int, inner: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim, self.inner = dim, inner

    def _ordered(self, gathered: torch.Tensor) -> torch.Tensor:
        outer = _outer(gathered, self.dim, self.sequence_length, self.inner)
        return gathered.index_select(self.dim, self._index("natural", None, outer, self.inner, gathered.device))

    def across_ranks(self, per_rank_args: Sequence[tuple]) -> list[torch.Tensor]:
        whole = self._ordered(torch.cat([args[0] for args in per_rank_args], dim=self.dim))
        return [whole] + [whole.clone() for _ in per_rank_args[1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bool:   # gloo moves no booleans; a mask needs no gradient
            return self._ordered(_dist_all_gather(x.to(torch.uint8), self.dim, 1, self._group())).bool()
        return self._ordered(_GatherSequence.apply(x.contiguous(), self.dim, self._group()))


class ContextReduce(ContextOp):
    """The sum over the cp group (loss pieces, a sum or mean over the sequence); backward sums too:
    PyTorch's functional all-reduce, whose registered autograd is that all-reduce (traceable by Dynamo)."""

    communicates = True

    def across_ranks(self, per_rank_args: Sequence[tuple]) -> list[torch.Tensor]:
        total = per_rank_args[0][0]
        for args in per_rank_args[1:]:
            total = total + args[0]
        return [total] + [total.clone() for _ in per_rank_args[1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", self._group().group_name)
        return torch.ops._c10d_functional.wait_tensor(out)


class ContextAttention(ContextOp):
    """`scaled_dot_product_attention(q, k, v, is_causal=True)` for this rank's queries (its two chunks,
    positions `local_positions`) against the whole keys and values (gathered, sequence order).

    One SDPA call per chunk, against the keys up to the chunk's end, with the causal mask aligned at
    its lower right (`causal_chunk_masks`). Why not `torch.nn.attention.bias.causal_lower_right`:
    its flash path ignores `enable_gqa` and it runs on CUDA kernels only; a boolean mask runs on
    every backend (the memory-efficient kernel on GPUs)."""

    def __init__(self, *, scale: float | None, dropout_p: float, enable_gqa: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale, self.dropout_p, self.enable_gqa = scale, dropout_p, enable_gqa
        self._masks: dict[tuple, list[tuple[int, torch.Tensor]]] = {}

    def local(self, rank: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key = (rank, str(q.device))
        if key not in self._masks:
            self._masks[key] = causal_chunk_masks(self.sequence_length, self.cp, rank, q.device)
        size = q.shape[-2] // 2
        outputs = []
        for half, (keys, mask) in enumerate(self._masks[key]):
            outputs.append(F.scaled_dot_product_attention(
                q.narrow(-2, half * size, size), k.narrow(-2, 0, keys), v.narrow(-2, 0, keys), attn_mask=mask,
                dropout_p=self.dropout_p, scale=self.scale, enable_gqa=self.enable_gqa))
        return torch.cat(outputs, dim=-2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.local(self._rank(), q, k, v)


def context_ops(module: torch.nn.Module) -> list[ContextOp]:
    return [m for m in module.modules() if isinstance(m, ContextOp)]


__all__ = ["ContextAttention", "ContextGather", "ContextOp", "ContextReduce", "ContextSlice", "context_ops"]
