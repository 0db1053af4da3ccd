"""Placements of a tensor on one tensor-parallel axis.

A value of the graph sits on the `tp` ranks of the axis in one of three ways
(DTensor's vocabulary, torch/distributed/tensor/placement_types.py):

- `Replicate()`: every rank holds the whole tensor;
- `Shard(dim, groups)`: dimension `dim` is cut into `groups` equal contiguous
  chunks and each chunk into `tp` equal pieces; rank r holds piece r of every
  chunk, concatenated. ``groups == 1`` is the ordinary even shard. ``groups > 1``
  is what a fused projection needs: the [q; k; v] output of one linear is
  sharded so that every rank holds its heads of q, of k and of v, and
  ``split(d, -1)`` then yields plain shards (DTensor calls this `_StridedShard`);
  `autopart.core.interfaces.take_shard` and `merge_shards` cut and join a tensor so;
- `Partial()`: every rank holds a full-size addend; the value is their sum.

Gradients follow Megatron-LM's convention (Shoeybi et al. 2019, §3): the
gradient of a Replicate value is the full gradient, identical on every rank; of
a Shard value the matching shard; of a Partial value the full gradient (the
gradient of a sum reaches every addend unchanged).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Rank r holds piece r of each of `groups` equal chunks of dimension `dim` (dim >= 0)."""

    dim: int
    groups: int = 1

    def __str__(self) -> str:
        return f"S({self.dim})" if self.groups == 1 else f"S({self.dim},{self.groups})"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a full-size addend; the value is the sum over ranks."""

    def __str__(self) -> str:
        return "P"


Placement = Union[Replicate, Shard, Partial]
R = Replicate()
P = Partial()

_SHARD = re.compile(r"^S\((\d+)(?:,(\d+))?\)$")


def parse_placement(text: str | Placement) -> Placement:
    """'R', 'P', 'S(2)' or 'S(2,3)' (dim 2 in 3 groups) → a Placement; Placements pass through."""
    if isinstance(text, (Replicate, Shard, Partial)):
        return text
    text = text.strip().replace(" ", "")
    if text == "R":
        return R
    if text == "P":
        return P
    match = _SHARD.match(text)
    if match is None:
        raise ValueError(f"placement {text!r}: write 'R', 'P', 'S(dim)' or 'S(dim,groups)'")
    return Shard(int(match.group(1)), int(match.group(2) or 1))


def local_shape(shape: tuple[int, ...], placement: Placement, tp: int) -> tuple[int, ...]:
    """Shape one rank holds of a tensor of `shape` placed as `placement` over `tp` ranks."""
    if not isinstance(placement, Shard):
        return tuple(shape)
    out = list(shape)
    out[placement.dim] //= tp
    return tuple(out)


def can_shard(shape: tuple[int, ...], dim: int, groups: int, tp: int) -> bool:
    """Whether dimension `dim` of `shape` splits evenly into `groups` chunks of `tp` pieces."""
    return 0 <= dim < len(shape) and shape[dim] > 0 and shape[dim] % (groups * tp) == 0
