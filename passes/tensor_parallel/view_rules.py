"""Rules of view-like ops (view/reshape, transpose/permute/unsqueeze/expand, split/getitem, slice, cat).

How a Shard moves through view/reshape: the dims of the input and output that hold the same elements.

A reshape from shape xs to shape ys groups consecutive dims whose products
match (e.g. [b, s, h*d] → [b, s, h, d]: ([0],[0]), ([1],[1]), ([2],[2, 3])). A
shard of an input dim is first merged into its group's flattened dim and then
split into the group's output dims:

- merging: a shard of dim k in `groups` chunks, with P = the product of the
  group's dims before k, is the flattened dim sharded in P·groups chunks;
- splitting a flattened dim sharded in G chunks into output dims n_1, n_2, …:
  while n_i divides G the whole of n_i indexes chunks (G ← G / n_i, go on);
  the shard lands on the first n_i that G divides with (n_i / G) % tp == 0, as
  Shard(i, G); otherwise the layout is not a shard of any output dim.

So [b, s, h·d] Shard(2) → [b, s, h, d] Shard(2); [b, s, 3·h·d] Shard(2, 3) →
[b, s, 3, h, d] Shard(3); [b, s, h, d] Shard(2) → [b, s, h·d] Shard(2); and
[b, s, d] Shard(1) → [b·s, d] Shard(0, b).
"""

from __future__ import annotations

from math import prod

import torch
import torch.fx

from autopart.passes.tensor_parallel.placements import P, Shard, can_shard
from autopart.passes.tensor_parallel.strategy import dim_arg, make_strategy, shape_of

aten = torch.ops.aten


def view_shapes_map(xs: tuple[int, ...], ys: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Groups (input dims, output dims) of equal element count covering both shapes in order."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n, m = len(xs), len(ys)
    while i < n or j < m:
        if i < n and xs[i] == 1 and (j >= m or ys[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < m and ys[j] == 1 and (i >= n or xs[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n or j >= m:
            raise ValueError(f"cannot view shape {xs} as {ys}")
        ins, outs = [i], [j]
        pi, po = xs[i], ys[j]
        i += 1
        j += 1
        while pi != po:
            if pi < po:
                if i >= n:
                    raise ValueError(f"cannot view shape {xs} as {ys}")
                ins.append(i)
                pi *= xs[i]
                i += 1
            else:
                if j >= m:
                    raise ValueError(f"cannot view shape {xs} as {ys}")
                outs.append(j)
                po *= ys[j]
                j += 1
        groups.append((ins, outs))
    return groups


def merge_split_placement(groups: list[tuple[list[int], list[int]]], p: Shard, xs: tuple[int, ...],
                          ys: tuple[int, ...], tp: int) -> Shard | None:
    """The output Shard a reshape gives input Shard `p`, or None if it is not one."""
    for ins, outs in groups:
        if p.dim not in ins:
            continue
        chunks = prod(xs[d] for d in ins if d < p.dim) * p.groups
        for d in outs:
            size = ys[d]
            if chunks % size == 0:
                chunks //= size
                continue
            if size % chunks == 0 and (size // chunks) % tp == 0:
                return Shard(d, chunks)
            return None
        return None
    return None


# ----------------------------------------------------------------------------- rules of view-like ops


def view_rule(node, tp, groups, cands):
    """view/reshape/_unsafe_view/flatten: a shard moves to the dim that holds the same elements."""
    x = node.args[0]
    xs, out = shape_of(x.meta["val"]), shape_of(node.meta["val"])
    strategies = []
    for p in cands(x):
        if p == P:
            strategies.append(make_strategy(node, "follow", P, {x: P}, 1.0))
        elif isinstance(p, Shard):
            q = merge_split_placement(view_shapes_map(xs, out), p, xs, out, tp)
            if q is not None:
                strategies.append(make_strategy(node, "follow", q, {x: p}, 1 / tp))
    return strategies


def dims_perm_rule(node, tp, groups, cands):
    """transpose / permute / t / unsqueeze / squeeze / expand: the shard follows its dim."""
    x = node.args[0]
    xs, out = shape_of(x.meta["val"]), shape_of(node.meta["val"])
    nd = len(xs)
    t = node.target
    if t in (aten.transpose.int, aten.t.default):
        a, b = (node.args[1] % nd, node.args[2] % nd) if t == aten.transpose.int else (0, 1)
        move = lambda d: b if d == a else a if d == b else d  # noqa: E731
    elif t == aten.permute.default:
        perm = [d % nd for d in node.args[1]]
        move = lambda d: perm.index(d)  # noqa: E731
    elif t == aten.unsqueeze.default:
        u = node.args[1] % (nd + 1)
        move = lambda d: d + 1 if d >= u else d  # noqa: E731
    elif t in (aten.squeeze.dim, aten.squeeze.dims):
        sq = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        sq = {d % nd for d in sq if xs[d % nd] == 1}
        move = lambda d: d - sum(1 for s in sq if s < d)  # noqa: E731
    elif t == aten.expand.default:
        lead = len(out) - nd
        move = lambda d: d + lead  # noqa: E731
    else:
        return []
    strategies = []
    for p in cands(x):
        if p == P and t != aten.expand.default:
            strategies.append(make_strategy(node, "follow", P, {x: P}, 1.0))
        elif isinstance(p, Shard) and xs[p.dim] == out[move(p.dim)]:
            strategies.append(make_strategy(node, "follow", Shard(move(p.dim), p.groups), {x: p}, 1 / tp))
    return strategies


def split_rule(node, tp, groups, cands):
    """split / split_with_sizes / chunk: along an unsplit dim pieces keep the placement;
    along the split dim, `groups` = k·sections gives pieces in k groups (a fused [q; k; v])."""
    x = node.args[0]
    xs = shape_of(x.meta["val"])
    pieces = [shape_of(v) for v in node.meta["val"]]
    if node.target == aten.chunk.default:
        d = dim_arg(node, 2, 0, len(xs))
    else:
        d = dim_arg(node, 2, 0, len(xs))
    sizes = [s[d] for s in pieces]
    strategies = []
    for p in cands(x):
        if p == P:
            strategies.append(make_strategy(node, "follow", P, {x: P}, 1.0))
        elif isinstance(p, Shard) and p.dim != d:
            strategies.append(make_strategy(node, "follow", p, {x: p}, 1 / tp))
        elif isinstance(p, Shard) and len(set(sizes)) == 1 and p.groups % len(sizes) == 0:
            g = p.groups // len(sizes)
            if all(can_shard(s, d, g, tp) for s in pieces):
                strategies.append(make_strategy(node, "follow", Shard(d, g), {x: p}, 1 / tp))
    return strategies


def getitem_rule(node, tp, groups, cands):
    """An element of a split (or of a tuple-returning op) has the placement the op gave its elements."""
    src = node.args[0]
    return [make_strategy(node, "follow", p, {src: p}, 1.0) for p in cands(src)]


def slice_rule(node, tp, groups, cands):
    """slice / select along an unsplit dim keep the placement."""
    x = node.args[0]
    xs = shape_of(x.meta["val"])
    d = dim_arg(node, 1, 0, len(xs))
    out = []
    for p in cands(x):
        if isinstance(p, Shard) and p.dim != d:
            nd = p.dim - (1 if node.target == aten.select.int and p.dim > d else 0)
            out.append(make_strategy(node, "follow", Shard(nd, p.groups), {x: p}, 1 / tp))
        elif p == P:
            out.append(make_strategy(node, "follow", P, {x: P}, 1.0))
    return out


def cat_rule(node, tp, groups, cands):
    """cat along an unsplit dim: every operand in the same placement."""
    xs = [a for a in node.args[0] if isinstance(a, torch.fx.Node)]
    out = shape_of(node.meta["val"])
    d = dim_arg(node, 1, 0, len(out))
    proposals = {p for x in xs for p in cands(x) if (isinstance(p, Shard) and p.dim != d) or p == P}
    return [make_strategy(node, "follow", p, {x: p for x in xs}, 1 / tp if p != P else 1.0)
            for p in sorted(proposals, key=str)]
