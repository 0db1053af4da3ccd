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
dropout recompute exactly what they computed. This module imports no pass and
no runtime: the graphs codegen writes call `run_region`, and the one-process
tensor-parallel simulation calls it with a function that runs every rank.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RECOMPUTE_MODES = ("none", "selective", "full")
"""From the most kept (fastest backward) to the least kept (a whole extra forward)."""

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
prices 'selective' with these (passes/blocks.py)."""


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


def _selective_contexts():
    caching, cached = create_selective_checkpoint_contexts(_selective_policy)
    if hasattr(caching, "storage") and hasattr(cached, "storage"):
        caching.storage = cached.storage = defaultdict(_KeepEntries)
    return caching, cached


def run_region(body: Callable[..., Any], mode: str, *args: Any) -> Any:
    """`body(*args)`, keeping for backward what `mode` says (see the module docstring).

    'none' calls the body; 'full' and 'selective' call it through PyTorch's
    non-reentrant checkpoint, which replays the body in backward (under the
    autocast and RNG state of the first call) to rebuild what was not kept.
    """
    if mode == "none" or not torch.is_grad_enabled():
        return body(*args)
    if mode == "full":
        return checkpoint(body, *args, use_reentrant=False)
    if mode == "selective":
        return checkpoint(body, *args, use_reentrant=False, context_fn=_selective_contexts)
    raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")


def check_mode(recompute: str | None, what: str = "recompute") -> str | None:
    """`recompute` if it is a known mode or None, else a ValueError naming the choices."""
    if recompute is not None and recompute not in RECOMPUTE_MODES:
        raise ValueError(f"{what}={recompute!r} is not known; use one of {RECOMPUTE_MODES} or None "
                         "(the planner chooses)")
    return recompute


__all__ = ["RECOMPUTE_MODES", "SAVED_GRAPH_OPS", "check_mode", "op_name", "run_region"]
