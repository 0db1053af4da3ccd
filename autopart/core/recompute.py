"""Activation recomputation: the modes, what `selective` keeps, and the call that runs a region.

One place for what the planner prices, codegen emits and the runtimes run
(DESIGN: "each has one place in the Plan, the cost model, the runtime and the
report, and the runtime uses PyTorch's own mechanism for it"):

- 'none': autograd keeps what each op saves for backward.
- 'full': only the region's inputs are kept; backward runs the region's forward
  again (`torch.utils.checkpoint.checkpoint(use_reentrant=False)`).
- 'selective': the outputs of the expensive ops (matmuls, attention,
  convolutions: `SAVED_OPS`) are kept, the cheap ones (norms, activations,
  casts, views, softmax) are recomputed — Megatron's selective recompute
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models") expressed as a PyTorch selective-checkpoint policy
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`).

Non-reentrant checkpointing records the autocast state and the RNG state at
the first forward and replays the region under both, so mixed precision and
dropout recompute exactly what they computed. Dropout on tensor-parallel
shards draws from the rank's own stream (autopart/tp_random.py), which the
checkpoint does not know: `run_region` rewinds it for the replay too. This module imports no pass and
no runtime: the graphs codegen writes call `run_region`, and the one-process
tensor-parallel simulation calls it with a function that runs every rank.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from autopart.core.modes import RECOMPUTE_MODES
from autopart.core.tp_random import replaying, streams_of


aten = torch.ops.aten

_SAVED_DISPATCH_NAMES = (
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward", "_efficient_attention_forward",
)
"""ATen ops (as the dispatcher sees them inside a checkpoint, composite ops already decomposed)
whose outputs 'selective' keeps: the matmul and attention kernels, as in torchtitan's
op-level selective checkpoint policy and Megatron's selective recompute."""

SAVED_GRAPH_OPS = frozenset({
    "linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d",
    "convolution", "_convolution", "scaled_dot_product_attention", *_SAVED_DISPATCH_NAMES,
})
"""The same ops as graph nodes of an exported (not decomposed) graph: `aten.linear` reaches the
dispatcher as `addmm`/`mm`, `scaled_dot_product_attention` as one of its kernels. The planner
prices 'selective' with these (passes/coarsen.py)."""


def op_name(target: Any) -> str:
    """The ATen op name of a graph node's target ('' for non-ATen callables)."""
    packet = getattr(target, "overloadpacket", target)
    return getattr(packet, "__name__", "") if isinstance(target, (torch._ops.OpOverload,
                                                                  torch._ops.OpOverloadPacket)) else ""


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of `SAVED_OPS`, recompute everything else."""
    name = getattr(getattr(op, "overloadpacket", op), "__name__", "")
    return CheckpointPolicy.MUST_SAVE if name in _SAVED_DISPATCH_NAMES else CheckpointPolicy.PREFER_RECOMPUTE


_CONSUMED = getattr(torch.utils.checkpoint, "_CONSUMED", None)
"""What PyTorch's selective checkpoint writes over a kept output once a replay has used it."""


class _KeepEntries(dict):
    """Selective checkpoint storage whose kept outputs survive their first replay.

    Zero bubble's split backward (torch.distributed.pipelining's
    stage_backward_input, then stage_backward_weight) runs two autograd passes
    over a stage, so a checkpointed region replays twice; PyTorch's selective
    checkpoint frees each kept output on its first use and refuses the second
    ("Trying to backward an extra time"). Here the outputs live until the
    region's autograd graph is freed, which it is once its last backward ran.
    """

    def __setitem__(self, key, value) -> None:
        if _CONSUMED is not None and value is _CONSUMED and key in self:
            return
        super().__setitem__(key, value)


class _KeepList(list):
    """The same for PyTorch versions (2.11 and older) whose storage is a list per op that each
    replay pops from the front: a popped output goes back to the end, so a whole replay leaves
    the list as it found it."""

    def pop(self, index: int = -1):
        item = super().pop(index)
        self.append(item)
        return item


_KEEPING = {dict: _KeepEntries, list: _KeepList}


def _contexts(selective: bool, body: Callable[..., Any]) -> Callable[[], tuple[Any, Any]]:
    """The checkpoint's context_fn: PyTorch's selective-checkpoint modes for 'selective', and the
    body's sharded streams rewound for the replay."""
    streams = streams_of(body)

    def context_fn() -> tuple[Any, Any]:  # called as the region's forward starts
        forward, replay = create_selective_checkpoint_contexts(_selective_policy) if selective else (
            contextlib.nullcontext(), contextlib.nullcontext())
        keeping = _KEEPING.get(getattr(getattr(forward, "storage", None), "default_factory", None))
        if selective and keeping is not None and hasattr(replay, "storage"):
            forward.storage = replay.storage = defaultdict(keeping)
        if not streams:
            return forward, replay
        states = [stream.snapshot() for stream in streams]
        return forward, _Both(replay, replaying(streams, states))

    return context_fn


class _Both(contextlib.ExitStack):
    """Two context managers entered as one."""

    def __init__(self, first: Any, second: Any) -> None:
        super().__init__()
        self.first, self.second = first, second

    def __enter__(self) -> "_Both":
        super().__enter__()
        self.enter_context(self.first)
        self.enter_context(self.second)
        return self


def run_region(body: Callable[..., Any], mode: str, *args: Any) -> Any:
    """`body(*args)`, keeping for backward what `mode` says (see the module docstring).

    'none' calls the body; 'full' and 'selective' call it through PyTorch's
    non-reentrant checkpoint, which replays the body in backward (under the
    autocast and RNG state of the first call) to rebuild what was not kept.
    """
    if mode == "none" or not torch.is_grad_enabled():
        return body(*args)
    if mode in ("full", "selective"):
        return checkpoint(body, *args, use_reentrant=False, context_fn=_contexts(mode == "selective", body))
    raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")


__all__ = ["RECOMPUTE_MODES", "SAVED_GRAPH_OPS", "op_name", "run_region"]
