"""How a sequence shard moves through each ATen op, and what an op needs when it cannot take one.

A value is either whole (the same on every rank of the cp group) or a `SeqShard`: dim `dim`
holds outer × S × inner elements of the whole value (S: the sequence), and a rank holds its
positions only (autopart/core/context_chunks.py). A rule sees the op's node (whole shapes in
`meta["val"]`) and the layouts of its inputs, and decides:

- the layout of its output (a tuple of them for ops that return several tensors);
- conversions of inputs, per input: `slice` a whole input to this rank's positions where it
  meets a shard (rotary tables, masks, position ids, shifted labels: index-selected along the
  dim broadcasting aligns with the shard), or `gather` a shard whole (the keys and values of
  attention, the operand of an op that mixes positions);
- a rewrite of the op itself: a reduction over the sequence (sum, mean, a loss) becomes its local
  sum all-reduced over the cp group (a mean divides by the whole count), and causal attention
  becomes `ContextAttention` (the local queries are two chunks at known positions).

Ops without a rule that read a shard get it gathered (correct, each rank then computes the op
whole); the pass warns about each such node outside attention (layout.py).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from math import prod
from typing import Any, Callable

import torch
import torch.fx

from autopart.passes.attrs import named_arguments

aten = torch.ops.aten


@dataclass(frozen=True)
class SeqShard:
    """Dim `dim` holds this rank's positions: outer × (S / cp) × inner of its outer × S × inner."""

    dim: int
    inner: int = 1

    def __str__(self) -> str:
        return f"S({self.dim})" if self.inner == 1 else f"S({self.dim}, inner={self.inner})"


@dataclass(frozen=True)
class Conversion:
    """What an input needs before its consumer: 'slice' (whole → this rank's positions along `dim`)
    or 'gather' (shard along `dim` → whole)."""

    kind: str
    dim: int
    inner: int = 1


@dataclass(frozen=True)
class Rewrite:
    """The op replaced: 'sum' (its local sum all-reduced), 'mean' (that divided by `count`),
    'class_mean' (a class loss: the summed loss over the summed count of counted targets) or
    'causal_attention'."""

    kind: str
    count: int = 0


@dataclass
class Decision:
    out: Any = None
    convert: dict[torch.fx.Node, Conversion] = field(default_factory=dict)
    rewrite: Rewrite | None = None
    mixes: bool = False
    """An input was gathered because the op mixes positions (not attention's keys and values)."""


class Context:
    """What a rule reads: the sequence length and the layouts found so far."""

    def __init__(self, sequence_length: int, layouts: dict[str, Any]) -> None:
        self.S = sequence_length
        self.layouts = layouts

    def shard(self, a: Any) -> SeqShard | None:
        layout = self.layouts.get(a.name) if isinstance(a, torch.fx.Node) else None
        return layout if isinstance(layout, SeqShard) else None

    @staticmethod
    def shape(a: Any) -> tuple[int, ...] | None:
        val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None

    def tensors(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if self.shape(a) is not None]


def _norm(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def gather(s: SeqShard) -> Conversion:
    return Conversion("gather", s.dim, s.inner)


def gather_all(node: torch.fx.Node, ctx: Context, mixes: bool = True) -> Decision:
    """Every shard the op reads gathered whole; the output whole (the default for ops without a rule)."""
    convert = {a: gather(s) for a in ctx.tensors(node) if (s := ctx.shard(a))}
    return Decision(out=None, convert=convert, mixes=mixes and bool(convert))


def _same_layout(node: torch.fx.Node, shard: SeqShard) -> Any:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(shard if isinstance(v, torch.Tensor) and v.dim() > shard.dim else None for v in val)
    return shard


def broadcast(node: torch.fx.Node, ctx: Context, operands: list[torch.fx.Node], out_shape: tuple[int, ...]
              ) -> Decision | None:
    """Operands aligned from the right against `out_shape` (broadcasting): the common output shard,
    whole operands sliced where they span the sharded dim; None if the shards disagree."""
    nd = len(out_shape)
    aligned = {}
    for a in operands:
        s, shape = ctx.shard(a), ctx.shape(a)
        if s is not None:
            aligned[a] = SeqShard(s.dim + nd - len(shape), s.inner)
    if not aligned:
        return Decision(out=None)
    out = next(iter(aligned.values()))
    if any(s != out for s in aligned.values()):
        return None
    convert = {}
    for a in operands:
        shape = ctx.shape(a)
        if a in aligned or shape is None:
            continue
        k = out.dim - (nd - len(shape))
        if k >= 0 and shape[k] != 1:
            convert[a] = Conversion("slice", k, out.inner)
    return Decision(out=out, convert=convert)


def pointwise(node: torch.fx.Node, ctx: Context) -> Decision:
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    if not isinstance(first, torch.Tensor):
        return gather_all(node, ctx)
    decision = broadcast(node, ctx, ctx.tensors(node), tuple(first.shape))
    if decision is None:
        return gather_all(node, ctx)
    if decision.out is not None:
        decision.out = _same_layout(node, decision.out)
    return decision


def reshape(node: torch.fx.Node, ctx: Context) -> Decision:
    """Any op that keeps the elements' order (view, reshape, flatten, unflatten, squeeze, unsqueeze,
    alias): the sequence factor must stay whole inside one output dim."""
    x = node.args[0]
    s, xs, ys = ctx.shard(x), ctx.shape(x), ctx.shape(node)
    if s is None:
        return Decision(out=None)
    outer = xs[s.dim] // (ctx.S * s.inner)
    before = prod(xs[:s.dim]) * outer          # elements' index above the sequence's
    after = s.inner * prod(xs[s.dim + 1:])      # and below it
    for k in range(len(ys)):
        rest = prod(ys[k + 1:])
        if after % rest == 0 and (ys[k] * rest) % (ctx.S * after) == 0:
            return Decision(out=SeqShard(k, after // rest))
    return gather_all(node, ctx)


def dim_map(node: torch.fx.Node, ctx: Context, mapping: Callable[[int], int | None]) -> Decision:
    """A permutation-like op: the sharded dim moves to `mapping(dim)` (None: the op mixes positions)."""
    x = node.args[0]
    s = ctx.shard(x)
    if s is None:
        return Decision(out=None)
    d = mapping(s.dim)
    return gather_all(node, ctx) if d is None else Decision(out=_same_layout(node, SeqShard(d, s.inner)))


def transpose(node, ctx):
    nd = len(ctx.shape(node.args[0]))
    a, b = (_norm(d, nd) for d in node.args[1:3])
    return dim_map(node, ctx, lambda d: b if d == a else a if d == b else d)


def permute(node, ctx):
    nd = len(ctx.shape(node.args[0]))
    dims = [_norm(d, nd) for d in node.args[1]]
    return dim_map(node, ctx, dims.index)


def t(node, ctx):
    return dim_map(node, ctx, lambda d: 1 - d if len(ctx.shape(node.args[0])) == 2 else d)


def expand(node, ctx):
    shift = len(ctx.shape(node)) - len(ctx.shape(node.args[0]))
    return dim_map(node, ctx, lambda d: d + shift)


def along(node: torch.fx.Node, ctx: Context, removes: bool = False) -> Decision:
    """Ops along one dim (slice, select, narrow, index_select, split, chunk, unbind, softmax,
    cumsum): local unless that dim is the sequence's; `removes`: the op drops the dim."""
    args = named_arguments(node)
    x = node.args[0]
    nd = len(ctx.shape(x))
    dim = _norm(args.get("dim") if args.get("dim") is not None else 0, nd)
    index = args.get("index")
    if isinstance(index, torch.fx.Node) and ctx.shard(index):
        return gather_all(node, ctx)
    return dim_map(node, ctx, lambda d: None if d == dim else d - (removes and dim < d))


def reduction(node: torch.fx.Node, ctx: Context) -> Decision:
    """sum/mean and the reductions that only gather (amax, var, logsumexp, ...) over some dims."""
    x = node.args[0]
    s, xs = ctx.shard(x), ctx.shape(x)
    if s is None:
        return Decision(out=None)
    args = named_arguments(node)
    dims = args.get("dim")
    dims = list(range(len(xs))) if dims is None or dims == [] else [dims] if isinstance(dims, int) else list(dims)
    dims = sorted({_norm(d, len(xs)) for d in dims})
    if s.dim not in dims:
        keep = bool(args.get("keepdim"))
        return Decision(out=_same_layout(node, SeqShard(s.dim - (0 if keep else sum(d < s.dim for d in dims)),
                                                        s.inner)))
    packet = node.target.overloadpacket
    if packet is aten.sum:
        return Decision(out=None, rewrite=Rewrite("sum"))
    if packet is aten.mean:
        return Decision(out=None, rewrite=Rewrite("mean", count=prod(xs[d] for d in dims)))
    return gather_all(node, ctx)


def norm(node: torch.fx.Node, ctx: Context) -> Decision:
    """Layer / RMS norms over the last len(normalized_shape) dims."""
    x = node.args[0]
    s = ctx.shard(x)
    normalized = len(node.args[1])
    others = [a for a in ctx.tensors(node) if a is not x and ctx.shard(a)]
    if s is None or s.dim >= len(ctx.shape(x)) - normalized or others:
        return gather_all(node, ctx)
    return Decision(out=_same_layout(node, s))


def embedding(node, ctx):
    weight, ids = node.args[0], node.args[1]
    if ctx.shard(weight):
        return gather_all(node, ctx)
    s = ctx.shard(ids)
    return Decision(out=s)


def concatenate(node: torch.fx.Node, ctx: Context, stack: bool) -> Decision:
    tensors = [a for a in node.args[0] if isinstance(a, torch.fx.Node)]
    shards = {ctx.shard(a) for a in tensors} - {None}
    if not shards:
        return Decision(out=None)
    nd = len(ctx.shape(tensors[0]))
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd + stack)
    s = next(iter(shards))
    if len(shards) > 1 or (not stack and s.dim == dim):
        return gather_all(node, ctx)
    convert = {a: Conversion("slice", s.dim, s.inner) for a in tensors if not ctx.shard(a)
               and ctx.shape(a)[s.dim] != 1}
    return Decision(out=SeqShard(s.dim + (stack and dim <= s.dim), s.inner), convert=convert)


def matmul(node: torch.fx.Node, ctx: Context, a: torch.fx.Node, b: torch.fx.Node, b_transposed: bool = False,
           extra: tuple[torch.fx.Node, ...] = ()) -> Decision:
    """a[..., n, k] @ b[..., k, m] (b stored [..., m, k] for linear). Keeps a's rows or a batch dim
    sharded; b's columns sharded only when a is whole; a shard of k (or a second one) is gathered:
    for attention written as matmuls, the keys and the values."""
    if a is b:   # one node read twice (x @ x.T): no conversion can tell the two apart
        return gather_all(node, ctx)
    out_shape = ctx.shape(node)
    nd = len(out_shape)
    sa, sb = ctx.shard(a), ctx.shard(b)
    na, nb = len(ctx.shape(a)), len(ctx.shape(b))
    convert: dict[torch.fx.Node, Conversion] = {}
    out = None
    if sa is not None:
        if na < 2 or sa.dim == na - 1:          # a's contraction dim (or a vector): gather
            convert[a] = gather(sa)
        else:
            out = SeqShard(sa.dim + nd - na, sa.inner)
    if sb is not None:
        contraction = nb - 1 if b_transposed else nb - 2
        columns = nb - 2 if b_transposed else nb - 1
        b_out = None if nb < 2 or sb.dim == contraction else (
            nd - 1 if sb.dim == columns else sb.dim + nd - nb)
        if b_out is None or (out is not None and b_out != out.dim) or (out is not None and out.inner != sb.inner):
            convert[b] = gather(sb)
        elif out is None:
            out = SeqShard(b_out, sb.inner)
    if out is not None:   # whole operands sharing the output's sharded batch dim: sliced
        for x, n in ((a, na), (b, nb)):
            if x in convert or ctx.shard(x):
                continue
            k = out.dim - (nd - n)
            batch_dims = range(n - 2)
            if k in batch_dims and ctx.shape(x)[k] != 1:
                convert[x] = Conversion("slice", k, out.inner)
    for x in extra:   # bias: broadcast against the output
        if not isinstance(x, torch.fx.Node):
            continue
        if ctx.shard(x) and (out is None or ctx.shard(x) != SeqShard(out.dim - (nd - len(ctx.shape(x))),
                                                                      out.inner)):
            convert[x] = gather(ctx.shard(x))
        elif out is not None and not ctx.shard(x):
            k = out.dim - (nd - len(ctx.shape(x)))
            if k >= 0 and ctx.shape(x)[k] != 1:
                convert[x] = Conversion("slice", k, out.inner)
    # gathering b's shard is how attention written as matmuls gathers its keys and values
    return Decision(out=out, convert=convert, mixes=a in convert and convert[a].kind == "gather")


def linear(node, ctx):
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    decision = matmul(node, ctx, node.args[0], node.args[1], b_transposed=True, extra=(bias,))
    decision.mixes = any(c.kind == "gather" for c in decision.convert.values())
    return decision


def addmm(node, ctx):
    return matmul(node, ctx, node.args[1], node.args[2], extra=(node.args[0],))


def baddbmm(node, ctx):
    return matmul(node, ctx, node.args[1], node.args[2], extra=(node.args[0],))


def plain_matmul(node, ctx):
    return matmul(node, ctx, node.args[0], node.args[1])


def attention(node: torch.fx.Node, ctx: Context) -> Decision:
    """SDPA: the queries stay sharded, the keys and values are gathered, a mask keeps the rows of
    the local queries; `is_causal` needs the queries' positions: `ContextAttention`."""
    args = named_arguments(node)
    q, k, v, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
    if q is k or q is v or (mask is not None and mask in (q, k, v)):   # a node read as two of them
        return gather_all(node, ctx, mixes=False)
    nq = len(ctx.shape(q))
    sq = ctx.shard(q)
    convert = {x: gather(s) for x in (k, v) if (s := ctx.shard(x))}
    if sq is not None and (sq.dim != nq - 2 or sq.inner != 1 or ctx.shape(q)[-2] != ctx.S):
        convert[q] = gather(sq)
        sq = None
    if isinstance(mask, torch.fx.Node):
        sm, ms = ctx.shard(mask), ctx.shape(mask)
        rows = len(ms) - 2
        if sm is not None and (sq is None or sm.dim != rows or sm.inner != 1):
            convert[mask] = gather(sm)
            sm = None
        if sq is not None and sm is None and len(ms) >= 2 and ms[rows] != 1:
            convert[mask] = Conversion("slice", rows, 1)
    rewrite = Rewrite("causal_attention") if sq is not None and args.get("is_causal") else None
    return Decision(out=SeqShard(nq - 2) if sq is not None else None, convert=convert, rewrite=rewrite)


_CLASS_LOSSES = {aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default,
                 aten.nll_loss2d.default}


def loss(node: torch.fx.Node, ctx: Context) -> Decision:
    """Losses with a `reduction`: none keeps the shard; sum and mean reduce over the cp group.
    Class losses (cross entropy, NLL) index targets by sample: input dim 0 ↔ target dim 0,
    input dim j ≥ 2 ↔ target dim j − 1 (dim 1 holds the classes)."""
    args = named_arguments(node)
    x, target = args["self"], args["target"]
    xs, ts = ctx.shape(x), ctx.shape(target)
    reduction = args.get("reduction", 1)
    others = [a for a in ctx.tensors(node) if a not in (x, target)]
    probabilities = node.target in _CLASS_LOSSES and ts is not None and ts == xs
    if node.target in _CLASS_LOSSES and not probabilities:
        if any(ctx.shard(a) for a in others):
            return gather_all(node, ctx)
        to_target = lambda d: d if d == 0 else (None if d == 1 else d - 1)   # noqa: E731
        sx, st = ctx.shard(x), ctx.shard(target)
        frame = {SeqShard(to_target(sx.dim), sx.inner)} if sx is not None and to_target(sx.dim) is not None else set()
        if sx is not None and not frame:
            return gather_all(node, ctx)
        frame |= {st} if st is not None else set()
        if len(frame) != 1:
            return gather_all(node, ctx) if frame else Decision(out=None)
        s = frame.pop()
        convert = {}
        if sx is None and len(xs) > 1:
            convert[x] = Conversion("slice", s.dim if s.dim == 0 else s.dim + 1, s.inner)
        if st is None:
            convert[target] = Conversion("slice", s.dim, s.inner)
        out = s
    else:
        decision = broadcast(node, ctx, ctx.tensors(node), tuple(torch.broadcast_shapes(xs, ts)))
        if decision is None:
            return gather_all(node, ctx)
        if decision.out is None:
            return decision
        convert, out = decision.convert, decision.out
        count = prod(torch.broadcast_shapes(xs, ts))
        if probabilities:
            count //= xs[1] if len(xs) > 1 else xs[0]
    if reduction == 0:
        return Decision(out=out, convert=convert)
    if reduction == 2:
        return Decision(out=None, convert=convert, rewrite=Rewrite("sum"))
    if node.target in _CLASS_LOSSES and not probabilities:
        return Decision(out=None, convert=convert, rewrite=Rewrite("class_mean"))
    return Decision(out=None, convert=convert, rewrite=Rewrite("mean", count=count))


def getitem(node, ctx):
    layout = ctx.layouts.get(node.args[0].name)
    return Decision(out=layout[node.args[1]] if isinstance(layout, tuple) else None)


def whole(node, ctx):
    """Ops whose output does not depend on their inputs' values (new_zeros: only the dtype)."""
    return Decision(out=None)


def like(node, ctx):
    """zeros_like, rand_like, ...: the shape of the input, so its layout."""
    s = ctx.shard(node.args[0])
    return Decision(out=s)


RULES: dict[Any, Callable[[torch.fx.Node, Context], Decision]] = {
    operator.getitem: getitem,
    aten.view.default: reshape, aten.reshape.default: reshape, aten._unsafe_view.default: reshape,
    aten.view_copy.default: reshape, aten.flatten.using_ints: reshape, aten.unflatten.int: reshape,
    aten.squeeze.default: reshape, aten.squeeze.dim: reshape, aten.squeeze.dims: reshape,
    aten.unsqueeze.default: reshape, aten.alias.default: reshape,
    aten.transpose.int: transpose, aten.permute.default: permute, aten.t.default: t, aten.expand.default: expand,
    aten.slice.Tensor: along, aten.narrow.default: along, aten.index_select.default: along,
    aten.split.Tensor: along, aten.split_with_sizes.default: along, aten.chunk.default: along,
    aten.select.int: lambda n, c: along(n, c, removes=True), aten.unbind.int: lambda n, c: along(n, c, removes=True),
    aten.softmax.int: along, aten._softmax.default: along, aten.log_softmax.int: along,
    aten._log_softmax.default: along, aten.cumsum.default: along, aten.cumprod.default: along,
    aten.logcumsumexp.default: along,
    aten.cat.default: lambda n, c: concatenate(n, c, stack=False),
    aten.stack.default: lambda n, c: concatenate(n, c, stack=True),
    aten.linear.default: linear, aten.mm.default: plain_matmul, aten.bmm.default: plain_matmul,
    aten.matmul.default: plain_matmul, aten.addmm.default: addmm, aten.baddbmm.default: baddbmm,
    aten.embedding.default: embedding,
    aten.native_layer_norm.default: norm, aten.layer_norm.default: norm, aten.rms_norm.default: norm,
    aten.scaled_dot_product_attention.default: attention,
    aten.new_zeros.default: whole, aten.new_ones.default: whole, aten.new_full.default: whole,
    aten.new_empty.default: whole, aten.new_empty_strided.default: whole,
    aten._assert_tensor_metadata.default: whole,
    **{op: like for op in (aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                           aten.full_like.default, aten.rand_like.default, aten.randn_like.default,
                           aten.randint_like.default)},
    **{op: reduction for op in (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim,
                                aten.amax.default, aten.amin.default, aten.max.dim, aten.min.dim,
                                aten.argmax.default, aten.argmin.default, aten.var.correction,
                                aten.std.correction, aten.var_mean.correction, aten.logsumexp.default,
                                aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.linalg_vector_norm.default)},
    **{op: loss for op in (*_CLASS_LOSSES, aten.mse_loss.default, aten.l1_loss.default, aten.smooth_l1_loss.default,
                           aten.huber_loss.default, aten.binary_cross_entropy_with_logits.default,
                           aten.binary_cross_entropy.default, aten.kl_div.default, aten.soft_margin_loss.default)},
}

ELEMENTWISE = {
    aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor, aten.to.dtype, aten.to.device,
    aten.to.dtype_layout, aten.to.other, aten._to_copy.default, aten.contiguous.default, aten.detach.default,
    aten.type_as.default, aten.lift_fresh_copy.default, aten.masked_fill.Tensor, aten.masked_fill.Scalar,
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.native_dropout.default,
    aten.bernoulli.default, aten.bernoulli.p, aten.clone.default, aten.copy.default,
}
"""Elementwise ops PyTorch does not tag `pointwise` (casts, copies, dropout)."""


def rule_of(node: torch.fx.Node) -> Callable[[torch.fx.Node, Context], Decision]:
    target = node.target
    if target in RULES:
        return RULES[target]
    if target in ELEMENTWISE or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
        return pointwise
    return gather_all
