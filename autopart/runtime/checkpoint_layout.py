"""Which part of an original tensor a rank holds, as boxes of the whole tensor.

A rank's tensor of one original parameter (or optimizer moment) is its
tensor-parallel slice (`ParamSlice`: dim `d` cut into `groups` chunks, each cut
in `tp` pieces; the rank holds piece `index` of every chunk), further cut by
FSDP into a dim-0 shard (a DTensor on the dp mesh). Both are expressed as a
list of `Box`es: a rectangle of the whole tensor (offsets, sizes) and where it
starts in the rank's local tensor. A checkpoint stores one piece per box and
a load fills each of its own boxes from whichever saved pieces intersect it,
so any plan reads any other plan's checkpoint (resharding).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autopart.core.interfaces import ParamSlice


@dataclass(frozen=True)
class Box:
    """A rectangle of a whole tensor and where it lies in a rank's local tensor."""

    offsets: tuple[int, ...]
    """First index in the whole tensor, per dim."""
    sizes: tuple[int, ...]
    local: tuple[int, ...]
    """First index in the rank's local tensor, per dim."""

    def local_view(self, local: torch.Tensor) -> torch.Tensor:
        """The box's part of the rank's local tensor (a view)."""
        view = local
        for dim, (start, size) in enumerate(zip(self.local, self.sizes)):
            view = view.narrow(dim, start, size)
        return view

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "device_mesh")


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def boxes_of(tensor: torch.Tensor, piece: ParamSlice | None) -> tuple[tuple[int, ...], list[Box]]:
    """(shape of the whole original tensor, this rank's boxes of it) for a rank's `tensor`
    (plain, or an FSDP DTensor) that holds tensor-parallel slice `piece` (None: whole)."""
    tp_shape = tuple(tensor.shape)  # a DTensor's shape is its global (here: tp-local) shape
    if is_dtensor(tensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        sizes, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        sizes, offsets = tuple(sizes), tuple(offsets)
    else:
        sizes, offsets = tp_shape, (0,) * len(tp_shape)
    if piece is None or piece.dim is None or piece.tp == 1:
        full = tp_shape
        boxes = [Box(offsets, sizes, (0,) * len(sizes))]
    else:
        d = piece.dim
        full = tp_shape[:d] + (tp_shape[d] * piece.tp,) + tp_shape[d + 1:]
        length = full[d] // (piece.groups * piece.tp)  # one rank's piece of one chunk
        chunk = full[d] // piece.groups
        boxes = []
        x, end = offsets[d], offsets[d] + sizes[d]
        while x < end:  # the local range along d crosses chunks: one box per chunk it touches
            k, within = divmod(x, length)
            n = min(length - within, end - x)
            start = k * chunk + piece.index * length + within
            boxes.append(Box(offsets[:d] + (start,) + offsets[d + 1:], sizes[:d] + (n,) + sizes[d + 1:],
                             (0,) * d + (x - offsets[d],) + (0,) * (len(sizes) - d - 1)))
            x += n
    return full, [box for box in boxes if box.numel > 0]


def intersection(a_offsets, a_sizes, b_offsets, b_sizes) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offsets, sizes) of the overlap of two boxes, or None when they do not overlap."""
    lo = tuple(max(a, b) for a, b in zip(a_offsets, b_offsets))
    hi = tuple(min(a + m, b + n) for a, m, b, n in zip(a_offsets, a_sizes, b_offsets, b_sizes))
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, tuple(h - l for l, h in zip(lo, hi))


def tiles(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether the boxes cover `shape` exactly once (no gap, no overlap)."""
    if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(shape):
        return False
    return all(intersection(*boxes[i], *boxes[j]) is None for i in range(len(boxes)) for j in range(i))


def all_gather_json(value, device: torch.device, group=None) -> list:
    """Every rank's JSON-able `value`, in rank order (sent as UTF-8 bytes: nothing is pickled)."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    world = dist.get_world_size(group)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, padded.to(device), group=group)
    return [json.loads(p[:int(s.item())].cpu().numpy().tobytes().decode()) for p, s in zip(parts, sizes)]
