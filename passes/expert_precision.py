"""Mixed precision for the grouped expert matmuls: both operands in the autocast dtype.

`torch.autocast` lowers every matmul-class op (mm, bmm, linear, matmul, conv,
attention) to bf16, but PyTorch's autocast lists do not name the grouped matmul
(`aten._grouped_mm`, `aten.grouped_mm`) nor transformers' looped fallback
(`transformers::grouped_mm_fallback`). So HF's experts cast their rows to the
weight's dtype to avoid a mismatch (transformers/integrations/moe.py
`_grouped_mm`: `input.to(weight.dtype)`), and under autocast over float32 master
weights the experts, most of an MoE's FLOPs, compute in float32: 15× slower than
bf16 on an H100 (67 against 989 TFLOP/s), while every other matmul runs in bf16.
A model loaded in bf16 runs the same kernels in bf16, as Megatron-core's and
torchtitan's grouped GEMMs do under mixed precision.

`compile(..., mixed_precision="bf16")` means what autocast means for a matmul:
its operands cast to bf16, the product in bf16, the master weights and their
gradients float32. This pass writes that into the traced graph, before the
values are re-propagated under autocast (autocast_values.py) and priced
(node_costs.py), so the runtime runs and the planner prices the same thing:
each grouped expert matmul `op(x, view(w), offs)` becomes
`op(x.to(bf16), view(w.to(bf16)), offs)` (the weight cast before its views, as
a bf16 model's weight is laid out; HF's own `x.to(float32)` is skipped, so bf16
rows are not widened and narrowed again). The kernel stays the one traced. Autograd
turns the casts' gradients back to float32, as autocast's own casts do.

The eager model under `torch.autocast` still runs its experts in float32: a plan
with mixed precision equals it within bf16's bounds, not bit for bit
(tests/test_mixed_precision.py compares with eager autocast whose grouped matmuls
are cast the same way).
"""

from __future__ import annotations

import torch
import torch.fx

from autopart.passes.expert_parallel import expert_weight_of, is_expert_matmul

CAST = torch.ops.aten.to.dtype


def experts_in_compute_dtype(gm: torch.fx.GraphModule, dtype: torch.dtype) -> list[str]:
    """Cast both operands of every grouped expert matmul of `gm` to `dtype`, in place.

    Returns the matmul nodes rewritten. A matmul whose weight is not a parameter seen through
    views is left as it is (`expert_weight_of`)."""
    done = []
    for node in list(gm.graph.nodes):
        if not is_expert_matmul(node) or expert_weight_of(node) is None:
            continue
        x, w = node.args[0], node.args[1]
        if _dtype(w) == dtype and _dtype(x) == dtype:
            continue
        chain = []   # the views between the parameter and the matmul, parameter side first
        while w.op != "get_attr":
            chain.insert(0, w)
            w = w.args[0]
        widened = x if x.op == "call_function" and x.target is CAST and x.args[1] == torch.float32 else None
        if widened is not None:   # HF's input.to(float32) of bf16 rows: cast the rows themselves, once
            x = widened.args[0]
        with gm.graph.inserting_before(node):
            rows = _cast(gm, x, dtype, node)
            weight = _cast(gm, w, dtype, node)
            for view in chain:
                copy = gm.graph.call_function(view.target, (weight, *view.args[1:]), dict(view.kwargs))
                copy.meta = {**node.meta, "val": view.target(weight.meta["val"], *view.args[1:], **view.kwargs)}
                weight = copy
        node.args = (rows, weight, *node.args[2:])
        if widened is not None and not widened.users:
            gm.graph.erase_node(widened)
        for view in reversed(chain):
            if not view.users:
                gm.graph.erase_node(view)
        done.append(node.name)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _dtype(node: torch.fx.Node) -> torch.dtype | None:
    return getattr(node.meta.get("val"), "dtype", None)


def _cast(gm: torch.fx.GraphModule, value: torch.fx.Node, dtype: torch.dtype, reader: torch.fx.Node) -> torch.fx.Node:
    """`value.to(dtype)` as a node, with the reader's module stack (it belongs to the reader's block)."""
    cast = gm.graph.call_function(CAST, (value, dtype))
    cast.meta = {**reader.meta, "val": value.meta["val"].to(dtype)}
    return cast


__all__ = ["experts_in_compute_dtype"]
