"""Sequence parallelism keeps a gathered input as its shard until backward (Megatron-SP's memory saving).

Under sequence parallelism a column-parallel linear reads the all-gather of a
sequence-sharded activation (collectives.py's `seq_all_gather`); autograd would
keep that whole gathered tensor for the weight gradient, tp times the shard
every rank already holds. Megatron-LM keeps the shard and all-gathers it again
in backward (Korthikanti et al. 2022, §4.2.2; megatron/core/tensor_parallel/
layers.py, `LinearWithGradAccumulationAndAsyncCommunication`), which is what
makes the layer's saved activations s·b·h·34/t. Here the same is done with
`torch.autograd.graph.saved_tensors_hooks` instead of a fused linear, so that
the rank modules keep the graph's own ATen ops:

- the collective registers each gathered output with a function that gathers
  it again (`remember_gathered`), for as long as the tensor lives;
- while a rank module runs forward (`keep_gathered_as_shards`, entered by the
  runtimes), a tensor autograd saves whose storage is a registered gather is
  packed as that function plus its view geometry, and unpacked in backward by
  gathering again (the same collective on every rank of the group, in the order
  autograd meets the saves, which is the same on every rank).

Inside recomputed regions `torch.utils.checkpoint`'s own hooks come first; they keep nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

_GATHERED: dict[int, Callable[[], torch.Tensor]] = {}
"""Storage address of a live gathered tensor -> how to gather it again."""


def _address(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # fake, meta or sparse tensors hold no storage address
        return 0


def remember_gathered(full: torch.Tensor, regather: Callable[[], torch.Tensor]) -> None:
    """Let saves of `full` (or a view of it) be packed as `regather`, while `full` lives."""
    key = _address(full)
    if key == 0:
        return
    _GATHERED[key] = regather
    weakref.finalize(full, _GATHERED.pop, key, None)


@dataclass(frozen=True)
class _Regather:
    regather: Callable[[], torch.Tensor]
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _pack(tensor: torch.Tensor):
    regather = _GATHERED.get(_address(tensor)) if tensor.device.type != "meta" else None
    if regather is None:
        return tensor
    return _Regather(regather, tensor.size(), tensor.stride(), tensor.storage_offset())


def _unpack(packed):
    if not isinstance(packed, _Regather):
        return packed
    with torch.no_grad():
        full = packed.regather()
    return full.as_strided(packed.size, packed.stride, packed.offset)


SEQUENCE_GATHER = "seq_all_gather"
"""The kind of the collective (passes/tensor_parallel/collectives.py) whose outputs this keeps as shards."""


def gathers_sequence(module: torch.nn.Module) -> bool:
    """Whether a rank module all-gathers sequence shards (a collective submodule of that kind)."""
    return any(getattr(m, "kind", None) == SEQUENCE_GATHER for m in module.modules())


@contextlib.contextmanager
def keep_gathered_as_shards(enabled: bool = True) -> Iterator[None]:
    """Autograd saves of gathered sequence shards are kept as the shard and gathered again in backward.

    Only where a module gathers sequence shards (`gathers_sequence`): installed hooks are part of what
    TorchDynamo guards on, so a compiled region run under them in forward and without them in a
    recomputed backward would compile twice and save different tensors."""
    if enabled and not _ACTIVE:
        _ACTIVE.append(True)
        try:
            with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
                yield
        finally:
            _ACTIVE.pop()
    else:
        yield


_ACTIVE: list[bool] = []
"""Non-empty while the hooks are installed (a stage calling into its regions does not stack them)."""
