"""Attention masks that are constants become SDPA's own flags.

transformers builds its attention mask as a graph of `arange`/`le`/`expand`
ops when it is being traced (`create_causal_mask` cannot skip it then), so the
exported graph hands `scaled_dot_product_attention` an explicit
[batch, 1, seq, seq] mask where the eager model passes none and sets
`is_causal=True`. With a mask, CUDA's SDPA cannot take its flash kernel: the
same Llama step ran 0.90× eager on an H200. This pass evaluates each mask that
does not depend on the inputs' values, and where it is exactly causal (or lets
every query see every key) replaces it by `is_causal=True` (or no mask) — the
computation the eager model runs.

A mask that depends on data (a padding mask from `attention_mask`, token ids)
is left as it is.

The same tracing path makes grouped-query attention copy its keys and values
to every query head first (transformers' `repeat_kv`: unsqueeze, expand,
reshape), where the eager model, with no mask, calls SDPA with
`enable_gqa=True` and copies nothing. Once the mask is gone, that copy becomes
`enable_gqa=True` on the un-repeated keys and values too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from autopart.passes.attrs import fetch_attr, named_arguments

_SDPA = torch.ops.aten.scaled_dot_product_attention.default

# Ops that read only an input's shape, dtype or device, never its values: an input reached only
# through them can be any tensor of that shape for the mask to come out the same.
_METADATA_ONLY = {
    torch.ops.aten.new_ones.default, torch.ops.aten.new_zeros.default, torch.ops.aten.new_empty.default,
    torch.ops.aten.new_full.default, torch.ops.aten.ones_like.default, torch.ops.aten.zeros_like.default,
    torch.ops.aten.empty_like.default, torch.ops.aten.full_like.default, torch.ops.aten.sym_size.int,
}


def use_causal_attention(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace every constant causal (or all-visible) SDPA mask by `is_causal=True` (or no mask)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        args = named_arguments(node)
        mask = args["attn_mask"]
        if not isinstance(mask, torch.fx.Node) or args["is_causal"]:
            continue
        q, k = (a.meta.get("val") for a in (args["query"], args["key"]))
        if q is None or k is None:
            continue
        value = _constant_value(gm, mask)
        if value is None:
            continue
        verdict = _mask_kind(value, q.shape[-2], k.shape[-2])
        if verdict is None:
            continue
        args["attn_mask"], args["is_causal"] = None, verdict == "causal"
        node.args = (args["query"], args["key"], args["value"])
        node.kwargs = {k: v for k, v in args.items() if k not in ("query", "key", "value")}
        changed = True
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _SDPA:
            changed |= _use_gqa(node)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _use_gqa(node: torch.fx.Node) -> bool:
    """SDPA on keys and values repeated per query head -> SDPA with enable_gqa on the originals."""
    args = named_arguments(node)
    if args["attn_mask"] is not None or args.get("enable_gqa") or "enable_gqa" not in args:
        return False
    sources = [_repeated_from(args[name]) for name in ("key", "value")]
    if any(s is None for s in sources) or sources[0][1] != sources[1][1]:
        return False
    args["key"], args["value"], args["enable_gqa"] = sources[0][0], sources[1][0], True
    node.args = (args["query"], args["key"], args["value"])
    node.kwargs = {k: v for k, v in args.items() if k not in ("query", "key", "value")}
    return True


_VIEWS = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def _repeated_from(value: Any) -> tuple[torch.fx.Node, int] | None:
    """(x, n_rep) if `value` is x [b, h, s, d] with each head repeated n_rep times (repeat_kv), else None."""
    if not isinstance(value, torch.fx.Node) or value.target not in _VIEWS:
        return None
    expand = value.args[0]
    if not isinstance(expand, torch.fx.Node) or expand.target is not torch.ops.aten.expand.default:
        return None
    source = expand.args[0]
    while isinstance(source, torch.fx.Node) and source.target is torch.ops.aten.slice.Tensor and _whole(source):
        source = source.args[0]  # x[:, :, None] traces to full slices around the unsqueeze
    if not isinstance(source, torch.fx.Node) or source.target is not torch.ops.aten.unsqueeze.default \
            or source.args[1] != 2:
        return None
    base = source.args[0]
    while isinstance(base, torch.fx.Node) and base.target is torch.ops.aten.slice.Tensor and _whole(base):
        base = base.args[0]
    x, out = base.meta.get("val") if isinstance(base, torch.fx.Node) else None, value.meta.get("val")
    if x is None or out is None or x.dim() != 4 or out.dim() != 4 or out.shape[1] % x.shape[1]:
        return None
    n_rep = out.shape[1] // x.shape[1]
    if tuple(out.shape) != (x.shape[0], x.shape[1] * n_rep, x.shape[2], x.shape[3]):
        return None
    return base, n_rep


def _whole(node: torch.fx.Node) -> bool:
    """A slice that keeps its whole dimension (start 0, end past the size, step 1)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    size = node.args[0].meta["val"].shape[dim if dim is not None else 0]
    return (start in (None, 0)) and (end is None or end >= size) and (step in (None, 1))


def _mask_kind(mask: torch.Tensor, num_queries: int, num_keys: int) -> str | None:
    """'causal' if the mask lets query i see keys 0..i only, 'all' if it hides nothing, else None."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) not in ((num_queries, num_keys), (1, num_keys)):
        return None
    visible = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == float("-inf")) | (mask <= -1e30)).all()):
        return None  # an additive bias, not a mask
    if bool(visible.all()):
        return "all"
    if num_queries != num_keys:
        return None
    causal = torch.ones(num_queries, num_keys, dtype=torch.bool).tril()
    return "causal" if bool((visible == causal).all()) else None


def _constant_value(gm: torch.fx.GraphModule, target: torch.fx.Node) -> torch.Tensor | None:
    """The value of `target` if it does not depend on any input's values or any parameter, else None."""
    ancestors: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    stack = [target]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        ancestors.append(node)
        stack.extend(node.all_input_nodes)
    params = {id(p) for p in gm.parameters()}
    for node in ancestors:
        if node.op == "placeholder" and any(u in seen and u.target not in _METADATA_ONLY for u in node.users):
            return None
        if node.op == "get_attr":
            attr = fetch_attr(gm, node.target)
            if id(attr) in params or (isinstance(attr, torch.Tensor) and attr.is_meta):
                return None
        if node.op not in ("placeholder", "get_attr", "call_function"):
            return None
    env: dict[torch.fx.Node, Any] = {}
    try:
        for node in gm.graph.nodes:  # graph order is a topological order
            if node not in seen:
                continue
            if node.op == "placeholder":
                val = node.meta.get("val")
                env[node] = (torch.empty(val.shape, dtype=val.dtype) if isinstance(val, torch.Tensor) else val)
            elif node.op == "get_attr":
                env[node] = fetch_attr(gm, node.target)
            else:
                args, kwargs = pytree.tree_map(
                    lambda a: env[a] if isinstance(a, torch.fx.Node)
                    else torch.device("cpu") if isinstance(a, torch.device) else a, (node.args, node.kwargs))
                with torch.no_grad():
                    env[node] = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a mask we cannot evaluate stays a mask
        return None
    value = env[target]
    return value if isinstance(value, torch.Tensor) else None

