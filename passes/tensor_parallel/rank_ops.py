"""The few local ops a split op needs on a tensor-parallel rank (shard.py rewrites ops into them).

- `ScaledBias`: a row-parallel linear's bias, added as bias/tp on every rank of
  the Partial output with an identity backward;
- `vocab_parallel_embedding`: Megatron's VocabParallelEmbedding, each rank
  looking up the rows it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ScaleForward(torch.autograd.Function):
    """x·s forward, identity backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScaledBias(torch.nn.Module):
    """out + bias/tp on each rank of a Partial output; the bias gradient stays the full one.

    Summed over the tp ranks the forward adds the bias once; each rank's bias
    gradient is the sum of the (replicated) output gradient, as in the unsplit
    op. A module (a call_module node), not a function: a GraphModule that is
    pickled is traced again when loaded, which would inline a function's
    custom autograd into a plain multiplication.
    """

    def __init__(self, tp: int) -> None:
        super().__init__()
        self.tp = tp

    def extra_repr(self) -> str:
        return f"tp={self.tp}"

    def forward(self, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return out + _ScaleForward.apply(bias, 1.0 / self.tp)


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, start: int,
                             padding_idx: int = -1) -> torch.Tensor:
    """This rank's addend of an embedding whose rows [start, start + rows) it holds (Megatron's
    VocabParallelEmbedding): ids outside the range read zeros; the ranks' outputs sum to the lookup."""
    rows = weight.shape[0]
    local = ids - start
    outside = (local < 0) | (local >= rows)
    local = local.masked_fill(outside, 0)
    pad = padding_idx - start if padding_idx >= 0 and 0 <= padding_idx - start < rows else -1
    out = F.embedding(local, weight, padding_idx=pad if pad >= 0 else None)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)
