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
        rows = _sampled_rows(mask)
        value = _constant_value(gm, mask, rows)
        if value is None:
            continue
        verdict = _mask_kind(value, q.shape[-2], k.shape[-2], rows)
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


LARGE_MASK_ELEMENTS = 1 << 26
"""Masks of more elements (beyond 8,192 × 8,192) are checked on a sample of their query rows
(`_sampled_rows`): at 131,072 tokens a whole mask is 17 GB of booleans, and its float
intermediates four times that, more than the planning machine has."""


def _sampled_rows(mask: torch.fx.Node) -> torch.Tensor | None:
    """The query rows a large mask is checked on: the first and last 256 and 512 spread evenly
    between (a sliding window or a packed document boundary shows in the last rows, a prefix in
    the first); None for a mask small enough to check whole."""
    value = mask.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.numel() <= LARGE_MASK_ELEMENTS:
        return None
    n = int(value.shape[-2])
    return torch.unique(torch.cat([torch.arange(min(256, n)), torch.arange(max(n - 256, 0), n),
                                   torch.linspace(0, n - 1, 512).long()]))


def _mask_kind(mask: torch.Tensor, num_queries: int, num_keys: int,
               rows: torch.Tensor | None = None) -> str | None:
    """'causal' if the mask lets query i see keys 0..i only, 'all' if it hides nothing, else None;
    `rows`: the query rows `mask` holds on its dim -2 (a sample of a large mask), None for all."""
    expected = num_queries if rows is None else len(rows)
    if mask.dim() < 2 or tuple(mask.shape[-2:]) not in ((expected, num_keys), (1, num_keys)):
        return None
    visible = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == float("-inf")) | (mask <= -1e30)).all()):
        return None  # an additive bias, not a mask
    if bool(visible.all()):
        return "all"
    if num_queries != num_keys:
        return None
    queries = torch.arange(num_queries) if rows is None else rows
    causal = torch.arange(num_keys)[None, :] <= queries[:, None]
    return "causal" if bool((visible == causal).all()) else None


_ROW_WISE = {getattr(torch.ops.aten, name).default if name in ("expand", "logical_not", "bitwise_not", "_to_copy")
             else getattr(torch.ops.aten, name) for name in ("expand", "logical_not", "bitwise_not", "_to_copy")}
for _name in ("le", "lt", "ge", "gt", "eq", "ne", "__and__", "__or__", "bitwise_and", "bitwise_or",
              "logical_and", "logical_or", "mul", "add", "sub"):
    _ROW_WISE |= {getattr(getattr(torch.ops.aten, _name), o) for o in ("Tensor", "Scalar")
                  if hasattr(getattr(torch.ops.aten, _name), o)}
_ROW_WISE |= {torch.ops.aten.to.dtype_layout, torch.ops.aten.to.dtype, torch.ops.aten.where.self,
              torch.ops.aten.masked_fill.Scalar}
"""Elementwise (broadcasting) ops: row r of their output needs only row r of their inputs."""


def _row_args(node: torch.fx.Node, env: dict, rowed: set, rows: torch.Tensor, num_rows: int):
    """`node`'s arguments with every whole tensor of `num_rows` rows on dim -2 cut to `rows` (values
    already computed on those rows stay), and an expand's size on dim -2 to len(rows)."""
    def arg(a):
        if not isinstance(a, torch.fx.Node):
            return torch.device("cpu") if isinstance(a, torch.device) else a
        v = env[a]
        if a in rowed or not isinstance(v, torch.Tensor) or v.dim() < 2 or v.shape[-2] != num_rows:
            return v
        return v.index_select(-2, rows)
    args, kwargs = pytree.tree_map(arg, (node.args, node.kwargs), is_leaf=lambda a: isinstance(a, torch.fx.Node))
    if node.target is torch.ops.aten.expand.default:
        sizes = list(args[1])
        if len(sizes) >= 2 and sizes[-2] == num_rows:
            sizes[-2] = len(rows)
        args = (args[0], sizes, *args[2:])
    return args, kwargs


def _constant_value(gm: torch.fx.GraphModule, target: torch.fx.Node,
                    rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """The value of `target` if it does not depend on any input's values or any parameter, else None;
    with `rows`, only those rows of its dim -2: every value larger than `LARGE_MASK_ELEMENTS` is
    then computed on those rows alone (None if one is not made by an elementwise op)."""
    num_rows = int(target.meta["val"].shape[-2]) if rows is not None else 0
    rowed: set[torch.fx.Node] = set()
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
                val = node.meta.get("val")
                if rows is not None and isinstance(val, torch.Tensor) and val.numel() > LARGE_MASK_ELEMENTS:
                    if node.target not in _ROW_WISE or val.dim() < 2 or val.shape[-2] != num_rows:
                        return None
                    args, kwargs = _row_args(node, env, rowed, rows, num_rows)
                    rowed.add(node)
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

