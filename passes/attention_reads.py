"""What a block's attention ops read of the sequence: the keys and values context parallelism
exchanges (autopart/axes/context.py prices the exchange and the gathered copy)."""

from __future__ import annotations

import torch
import torch.fx

from autopart.core.recompute import op_name
from autopart.passes.attrs import named_arguments

ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                           "_scaled_dot_product_cudnn_attention"})
"""Fused attention kernels: (query, key, value, ...) with the sequence on dim -2."""


def is_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and op_name(node.target) in ATTENTION_OPS


def attention_reads(members: list[torch.fx.Node]) -> dict[str, int]:
    """A block's `Block.attention_kv_bytes` and `attention_sequence` from its nodes: its fused
    attention kernels, and attention written as matmul → softmax → matmul (eager: keys transposed,
    the sequence on their last dim; passes/context_parallel/layout.py finds them)."""
    from autopart.passes.context_parallel.layout import attention_site

    kv_bytes = sequence = 0
    for node in members:
        site = attention_site(node) if not is_attention(node) else None
        if site is not None and site.key_dim == -1:
            for value, dim in ((site.key.meta.get("val"), -1), (site.value.meta.get("val"), -2)):
                if isinstance(value, torch.Tensor):
                    kv_bytes += value.numel() * value.element_size()
                    sequence = max(sequence, int(value.shape[dim]))
        if not is_attention(node):
            continue
        args = named_arguments(node)  # every fused kernel's schema names them query, key, value
        for name in ("key", "value"):
            value = args[name].meta.get("val") if isinstance(args[name], torch.fx.Node) else None
            if isinstance(value, torch.Tensor):
                kv_bytes += value.numel() * value.element_size()
                sequence = max(sequence, int(value.shape[-2]))
    return dict(attention_kv_bytes=int(kv_bytes), attention_sequence=sequence)
