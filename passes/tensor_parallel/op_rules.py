"""Sharding rules: for one ATen op, the ways it can run on a tensor-parallel axis.

Why our own rules and not DTensor's (REFERENCES.md, "Reusing PyTorch's SPMD
machinery"): DTensor's registry (`DTensor._op_dispatcher.sharding_propagator`)
is private, its names differ between torch 2.11 and 2.13, and on export's
non-decomposed graph it has no rule for `aten.linear`, `layer_norm` or the CPU
SDPA op. It also has no notion of Megatron's f operator (which Replicate inputs
need a backward all-reduce) or of a bias added once to a Partial sum. The rules
here are small and follow DTensor's semantics where both exist.

Anchor ops (linear, mm/addmm/matmul/bmm, SDPA, embedding, norms, the grouped expert
matmuls: expert_rules.py) enumerate
their strategies from their own shapes; follower ops (elementwise, views,
split/getitem, softmax, reductions) propagate the placements their inputs can
arrive in (`cands`). Ops without a rule run replicated.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx

from autopart.passes.attrs import named_arguments
from autopart.passes.expert_parallel import is_expert_matmul
from autopart.passes.tensor_parallel.expert_rules import grouped_matmul_rule
from autopart.passes.tensor_parallel.placements import P, Placement, R, Shard, can_shard
from autopart.passes.tensor_parallel.sequence import sequence_candidates
from autopart.passes.tensor_parallel.strategy import Strategy, dim_arg, make_strategy, replicate, shape_of
from autopart.passes.tensor_parallel.view_rules import (
    cat_rule, dims_perm_rule, getitem_rule, slice_rule, split_rule, view_rule,
)

aten = torch.ops.aten
Candidates = Callable[[torch.fx.Node], list[Placement]]


# ----------------------------------------------------------------------------- matmuls


def _matmul(node: torch.fx.Node, x: torch.fx.Node, w: torch.fx.Node, bias: torch.fx.Node | None,
            w_transposed: bool, tp: int, groups: set[int], cands: Candidates) -> list[Strategy]:
    """x[..., n, k] @ W[..., k, m] (+ bias[m]); `w_transposed`: W is stored [m, k] (aten.linear)."""
    xs, ws, out = shape_of(x.meta["val"]), shape_of(w.meta["val"]), shape_of(node.meta["val"])
    if xs is None or ws is None or out is None or len(ws) < 1:
        return []
    o_last = len(out) - 1
    w_m = len(ws) - 2 if w_transposed else len(ws) - 1   # W's output-feature dim
    w_k = len(ws) - 1 if w_transposed else len(ws) - 2   # W's reduction dim
    strategies = []
    # Column-parallel: W split on its output features, x replicated → output Shard(-1).
    # Megatron's ColumnParallelLinear; `groups` > 1 keeps a fused [q; k; v] split per chunk.
    for g in sorted(groups):
        if len(ws) >= 2 and can_shard(ws, w_m, g, tp) and can_shard(out, o_last, g, tp):
            places = {w: Shard(w_m, g)}
            if bias is not None:
                places[bias] = Shard(0, g)
            strategies.append(make_strategy(node, "colwise", Shard(o_last, g), places, 1 / tp))
    # Row-parallel: W split on its reduction dim, x Shard(-1) → Partial sum. The bias is
    # added as bias/tp on every rank with an identity backward (rank_ops.ScaledBias):
    # the forward sum is x·W + bias and every rank's bias gradient is the full one.
    if len(ws) >= 2 and len(xs) >= 1 and can_shard(ws, w_k, 1, tp) and can_shard(xs, len(xs) - 1, 1, tp):
        places = {w: Shard(w_k), x: Shard(len(xs) - 1)}
        if bias is not None:
            places[bias] = R
        strategies.append(make_strategy(node, "rowwise", P, places, 1 / tp,
                                no_sync=[bias] if bias is not None else [], scaled_bias=bias))
    # Batch / rows of x: x sharded on a leading dim that W does not have; W replicated.
    for p in cands(x):
        if isinstance(p, Shard) and p.dim < len(xs) - 1 and (len(ws) == 2 or w_transposed):
            out_dim = p.dim + len(out) - len(xs)
            if can_shard(out, out_dim, p.groups, tp):
                strategies.append(make_strategy(node, "rows", Shard(out_dim, p.groups), {x: p}, 1 / tp))
    return strategies


def linear_rule(node: torch.fx.Node, tp: int, groups: set[int], cands: Candidates) -> list[Strategy]:
    """aten.linear(x, W[out, in], bias): colwise, rowwise, or split rows of x."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return _matmul(node, x, w, bias, True, tp, groups, cands)


def addmm_rule(node: torch.fx.Node, tp: int, groups: set[int], cands: Candidates) -> list[Strategy]:
    """aten.addmm(bias, x, W[in, out]) (GPT-2's Conv1D): as linear, W stored transposed."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return []
    bias, x, w = node.args[:3]
    if shape_of(bias.meta["val"]) != shape_of(node.meta["val"])[-1:]:
        return []
    return _matmul(node, x, w, bias, False, tp, groups, cands)


def mm_rule(node: torch.fx.Node, tp: int, groups: set[int], cands: Candidates) -> list[Strategy]:
    """mm / matmul with a 2-D W (as linear), or bmm / batched matmul (batch, rows, columns, or inner dim)."""
    x, w = node.args[:2]
    xs, ws = shape_of(x.meta["val"]), shape_of(w.meta["val"])
    if len(ws) == 2 and len(xs) >= 2:
        return _matmul(node, x, w, None, False, tp, groups, cands)
    if len(xs) == len(ws) >= 3:  # bmm / batched matmul: batch dims, n of x, m of w, k of both
        out = shape_of(node.meta["val"])
        strategies = []
        for d in range(len(xs) - 2):
            if can_shard(xs, d, 1, tp) and can_shard(ws, d, 1, tp):
                strategies.append(make_strategy(node, "batch", Shard(d), {x: Shard(d), w: Shard(d)}, 1 / tp))
        n, k, m = len(xs) - 2, len(xs) - 1, len(ws) - 1
        if can_shard(xs, n, 1, tp):
            strategies.append(make_strategy(node, "rows", Shard(n), {x: Shard(n)}, 1 / tp))
        if can_shard(ws, m, 1, tp):
            strategies.append(make_strategy(node, "cols", Shard(len(out) - 1), {w: Shard(m)}, 1 / tp))
        if can_shard(xs, k, 1, tp) and can_shard(ws, k - 1 + len(ws) - len(xs), 1, tp):
            strategies.append(make_strategy(node, "inner", P, {x: Shard(k), w: Shard(len(ws) - 2)}, 1 / tp))
        return strategies
    return []


# ----------------------------------------------------------------------------- attention, embedding, norms


def _sdpa_mask_and_dropout(node: torch.fx.Node) -> tuple[Any, Any]:
    """(attn_mask, dropout_p) of either SDPA overload (their argument orders differ)."""
    args = named_arguments(node)
    return args.get("attn_mask"), args.get("dropout_p", 0.0)


def sdpa_rule(node, tp, groups, cands):
    """Attention split by heads (dim 1 of [b, h, s, d]) or by batch; the mask follows if it has the dim."""
    q, k, v = node.args[:3]
    mask, dropout = _sdpa_mask_and_dropout(node)
    if dropout not in (0, 0.0):
        return []  # dropout inside attention draws per rank: not split
    shapes = [shape_of(t.meta["val"]) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        return []
    strategies = []
    for name, d in (("heads", 1), ("batch", 0)):
        if not all(can_shard(s, d, 1, tp) for s in shapes):
            continue
        places = {q: Shard(d), k: Shard(d), v: Shard(d)}
        if isinstance(mask, torch.fx.Node):
            ms = shape_of(mask.meta["val"])
            md = d - (4 - len(ms))
            if md >= 0 and ms[md] != 1:
                if not can_shard(ms, md, 1, tp):
                    continue
                places[mask] = Shard(md)
        strategies.append(make_strategy(node, name, Shard(d), places, 1 / tp))
    return strategies


def embedding_rule(node: torch.fx.Node, tp: int, groups: set[int], cands: Candidates) -> list[Strategy]:
    """aten.embedding(table[V, D], ids): vocabulary-parallel, split embedding dim, or split ids."""
    weight, ids = node.args[:2]
    ws, out = shape_of(weight.meta["val"]), shape_of(node.meta["val"])
    strategies = []
    # Vocabulary-parallel (Megatron's VocabParallelEmbedding): rows of the table split;
    # ids outside a rank's range read zeros; the ranks' outputs sum to the lookup.
    if can_shard(ws, 0, 1, tp):
        strategies.append(make_strategy(node, "vocab", P, {weight: Shard(0)}, 1.0))
    if can_shard(ws, 1, 1, tp):
        strategies.append(make_strategy(node, "colwise", Shard(len(out) - 1), {weight: Shard(1)}, 1 / tp))
    for p in cands(ids):
        if isinstance(p, Shard):
            strategies.append(make_strategy(node, "rows", p, {ids: p}, 1 / tp))
    return strategies


def norm_rule(node, tp, groups, cands):
    """layer_norm / rms_norm: the normalised (trailing) dims stay whole; leading dims may be split."""
    x, normalized = node.args[0], node.args[1]
    xs = shape_of(x.meta["val"])
    out = node.meta["val"]
    strategies = []
    for p in cands(x):
        if isinstance(p, Shard) and p.dim < len(xs) - len(normalized):
            strategies.append(make_strategy(node, "rows", p, {x: p}, 1 / tp))
    return strategies if isinstance(out, (torch.Tensor, tuple, list)) else []


# ----------------------------------------------------------------------------- followers


# Ops linear in their (single) Partial operand: a Partial input gives a Partial output.
_LINEAR_UNARY = {
    aten.neg.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device,
    aten.lift_fresh_copy.default,
}
_LINEAR_PRODUCT = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_LINEAR_SUM = {aten.add.Tensor, aten.sub.Tensor}
UNARY_ELEMENTWISE = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar,
    aten.sin.default, aten.cos.default, aten.abs.default, aten.erf.default, aten.square.default,
    aten.dropout.default, aten.native_dropout.default, aten.reciprocal.default,
    aten.ne.Scalar, aten.eq.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.le.Scalar, aten.lt.Scalar,
} | _LINEAR_UNARY
BINARY_ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Tensor,
    aten.maximum.default, aten.minimum.default, aten.where.self, aten.eq.Tensor, aten.ne.Tensor,
    aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.logical_and.default, aten.logical_or.default, aten.masked_fill.Scalar,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
}


def elementwise_rule(node, tp, groups, cands):
    """Same placement on every operand, mapped through broadcasting; size-1 operand dims stay Replicate.

    Dropout follows its input too: on a shard it draws from the tp rank's own stream, on a
    replicated or partial value from the generator all ranks hold alike (passes/random_ops.py)."""
    out = shape_of(node.meta["val"] if not isinstance(node.meta["val"], tuple) else node.meta["val"][0])
    if out is None:
        return []
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
    shapes = {t: shape_of(t.meta["val"]) for t in tensors}
    proposals: set[Placement] = set()
    for t in tensors:
        for p in cands(t):
            if isinstance(p, Shard):
                proposals.add(Shard(p.dim + len(out) - len(shapes[t]), p.groups))
            elif p == P:
                proposals.add(P)
    strategies = []
    for p in sorted(proposals, key=str):
        if isinstance(p, Shard):
            if not can_shard(out, p.dim, p.groups, tp):
                continue
            places = {}
            for t in tensors:
                d = p.dim - (len(out) - len(shapes[t]))
                places[t] = Shard(d, p.groups) if d >= 0 and shapes[t][d] != 1 else R
            strategies.append(make_strategy(node, "follow", p, places, 1 / tp))
        elif node.target in _LINEAR_UNARY or node.target in (aten.dropout.default,):
            strategies.append(make_strategy(node, "follow", P, {t: P for t in tensors}, 1.0))
        elif node.target in _LINEAR_SUM and len(tensors) == len(node.args[:2]) and node.kwargs.get("alpha", 1) == 1:
            if len({shapes[t] for t in tensors}) == 1:  # a broadcast addend would be summed tp times
                strategies.append(make_strategy(node, "follow", P, {t: P for t in tensors}, 1.0))
        elif node.target in _LINEAR_PRODUCT and tensors and tensors[0] is node.args[0]:
            # Partial numerator times (or over) a Replicate factor.
            places = {t: (P if i == 0 else R) for i, t in enumerate(tensors)}
            if len(set(tensors)) == len(tensors):
                strategies.append(make_strategy(node, "follow", P, places, 1.0))
    return strategies


def along_dim_rule(node, tp, groups, cands):
    """softmax / log_softmax / cumsum: any dim but the one the op works along may be split."""
    x = node.args[0]
    xs = shape_of(x.meta["val"])
    d = dim_arg(node, 1, -1, len(xs))
    return [make_strategy(node, "follow", p, {x: p}, 1 / tp)
            for p in cands(x) if isinstance(p, Shard) and p.dim != d]


def reduce_rule(node, tp, groups, cands):
    """sum/mean over dims: a split kept dim stays split; a sum over the split dim is Partial."""
    x = node.args[0]
    xs = shape_of(x.meta["val"])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return []
    dims = {d % len(xs) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keep = len(node.args) > 2 and node.args[2] or node.kwargs.get("keepdim", False)
    strategies = []
    for p in cands(x):
        if isinstance(p, Shard) and p.dim not in dims:
            d = p.dim if keep else p.dim - sum(1 for r in dims if r < p.dim)
            strategies.append(make_strategy(node, "follow", Shard(d, p.groups), {x: p}, 1 / tp))
        elif isinstance(p, Shard) and node.target == aten.sum.dim_IntList and p.groups == 1:
            strategies.append(make_strategy(node, "follow", P, {x: p}, 1 / tp))
        elif p == P and node.target == aten.sum.dim_IntList:
            strategies.append(make_strategy(node, "follow", P, {x: P}, 1.0))
    return strategies


RULES: dict[Any, Callable[..., list[Strategy]]] = {
    aten.linear.default: linear_rule,
    aten.addmm.default: addmm_rule,
    aten.mm.default: mm_rule, aten.bmm.default: mm_rule, aten.matmul.default: mm_rule,
    aten.scaled_dot_product_attention.default: sdpa_rule,
    aten._scaled_dot_product_flash_attention_for_cpu.default: sdpa_rule,
    aten.embedding.default: embedding_rule,
    aten.layer_norm.default: norm_rule, aten.native_layer_norm.default: norm_rule,
    aten._softmax.default: along_dim_rule, aten.softmax.int: along_dim_rule,
    aten._log_softmax.default: along_dim_rule, aten.log_softmax.int: along_dim_rule,
    aten.cumsum.default: along_dim_rule,
    aten.sum.dim_IntList: reduce_rule, aten.mean.dim: reduce_rule,
    aten.view.default: view_rule, aten.reshape.default: view_rule, aten._unsafe_view.default: view_rule,
    aten.transpose.int: dims_perm_rule, aten.permute.default: dims_perm_rule, aten.t.default: dims_perm_rule,
    aten.unsqueeze.default: dims_perm_rule, aten.squeeze.dim: dims_perm_rule, aten.squeeze.dims: dims_perm_rule,
    aten.expand.default: dims_perm_rule,
    aten.split.Tensor: split_rule, aten.split_with_sizes.default: split_rule, aten.chunk.default: split_rule,
    operator.getitem: getitem_rule,
    aten.slice.Tensor: slice_rule, aten.select.int: slice_rule,
    aten.cat.default: cat_rule,
}
if hasattr(aten, "rms_norm"):
    RULES[aten.rms_norm.default] = norm_rule
for _op in UNARY_ELEMENTWISE | BINARY_ELEMENTWISE:
    RULES.setdefault(_op, elementwise_rule)


def op_strategies(node: torch.fx.Node, tp: int, groups: set[int], cands: Candidates,
                  sequence: bool = False) -> list[Strategy]:
    """Every strategy of a call_function node: replicated first, then the op's own rules (deduplicated).

    `sequence`: elementwise ops and norms may also run on their operands' sequence shards
    (sequence parallelism, sequence.py)."""
    strategies = [replicate(node)]
    rule = RULES.get(node.target) or (grouped_matmul_rule if is_expert_matmul(node) else None)
    if sequence and rule in (elementwise_rule, norm_rule):
        cands = sequence_candidates(cands, tp)
    if rule is not None:
        seen = {strategies[0].key()}
        for s in rule(node, tp, groups, cands):
            if s.key() not in seen:
                seen.add(s.key())
                strategies.append(s)
    return strategies
