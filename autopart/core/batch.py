"""One batch of inputs: its size, its rows, its microbatches.

A batched tensor is one whose dim 0 is the batch size; every other value
(constants, tensors without that dim 0) goes whole to every part. The driver
cuts the example batch with these to trace one microbatch; the runtimes cut
every step's batch and targets with them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from autopart.core.errors import InputError


def split_microbatches(flat_inputs: Sequence[Any], batch_size: int, num_microbatches: int) -> list[list[Any]]:
    """Chunk every tensor whose dim 0 is the batch; other values go to every microbatch."""
    if num_microbatches < 1 or batch_size % num_microbatches:
        raise InputError(
            f"a batch of {batch_size} samples does not divide into {num_microbatches} microbatches; "
            "pass a batch that is a multiple of the planned microbatch count"
        )
    return split_rows(list(flat_inputs), batch_size, num_microbatches)


def split_rows(tree: Any, batch_size: int, num_microbatches: int) -> list[Any]:
    """`tree` once per microbatch, each batched tensor (dim 0 = batch_size) cut to its rows."""
    size = batch_size // num_microbatches
    return [take_rows(tree, batch_size, i * size, (i + 1) * size) for i in range(num_microbatches)]


def take_rows(tree: Any, batch_size: int, start: int, stop: int) -> Any:
    """Rows start..stop of every tensor in `tree` whose dim 0 is the batch; other leaves as they are."""
    def rows(x: Any) -> Any:
        batched = isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch_size
        return x[start:stop] if batched else x

    return torch.utils._pytree.tree_map(rows, tree)


def batch_size_of(flat_inputs: Sequence[Any]) -> int:
    """Samples in the batch: dim 0 of the first tensor that has one."""
    for x in flat_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    raise InputError("no input tensor has a batch dimension (dim 0); pass at least one batched tensor")
