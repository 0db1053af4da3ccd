"""FLOPs of the ATen ops that do matmul (tensor-core) work, from shapes alone.

Convention, as in `torch.utils.flop_counter`: one multiply-add is 2 FLOPs;
bias adds, scaling and softmax are not counted. Every other op — elementwise,
norms, reductions, views — is 0 FLOPs here: the roofline prices it by bytes
moved. Units of every function: FLOPs (not FLOP/s).

Why our own functions rather than FlopCounterMode alone: the planner needs the
forward *and* backward cost of each forward op of an exported graph, on fake
tensors, without running autograd; FlopCounterMode counts what actually runs.
The formulas below match FlopCounterMode's (tests check it op by op).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from autopart.cost_models.experts import expert_matmul_flops

aten = torch.ops.aten
Shape = Sequence[int]

# Backward of a matmul-like op y = x·W: grad_x = grad_y·Wᵀ and grad_W = xᵀ·grad_y,
# two products of the forward's size, so backward = 2 × forward (the "6N FLOPs
# per token per parameter" rule, Kaplan et al. 2020, §2.1; flop_counter's
# mm/bmm formulas applied to the transposed operands). Convolutions likewise
# (flop_counter.conv_backward_flop: grad_input as a transposed conv, grad_weight
# as a conv). Counted even where an input needs no gradient (first layer).
MATMUL_BACKWARD_FACTOR = 2


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of a tensor (real or fake) or a sequence of ints, as plain ints."""
    if isinstance(x, torch.Tensor):
        return tuple(int(s) for s in x.shape)
    return tuple(int(s) for s in x)


def matmul_flops(m: int, k: int, n: int, batch: int = 1) -> int:
    """[batch, m, k] @ [batch, k, n]: 2·batch·m·k·n FLOPs."""
    # batch·m·n outputs, k multiply-adds each (flop_counter.mm_flop / bmm_flop).
    return 2 * batch * m * k * n


def broadcast_matmul_flops(a_shape: Shape, b_shape: Shape) -> int:
    """FLOPs of torch.matmul(a, b) for any ranks (1-D operands, broadcast batch dims)."""
    a, b = _shape(a_shape), _shape(b_shape)
    if not a or not b:
        raise ValueError(f"matmul: operands need rank >= 1, got shapes {a} and {b}")
    # torch.matmul semantics: a 1-D left operand is a row [1, k], a 1-D right one
    # a column [k, 1]; leading dims broadcast (torch.broadcast_shapes).
    m, k = (1, a[0]) if len(a) == 1 else a[-2:]
    k2, n = (b[0], 1) if len(b) == 1 else b[-2:]
    if k != k2:
        raise ValueError(f"matmul: inner dims differ: {a} @ {b} (k = {k} vs {k2})")
    batch = math.prod(torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2])))
    return matmul_flops(m, k, n, batch)


def conv_flops(x_shape: Shape, w_shape: Shape, out_shape: Shape | None, transposed: bool = False) -> int:
    """FLOPs of a (transposed) convolution; bias ignored.

    x: [batch, c_in, *spatial]; w: [c_out, c_in / groups, *kernel] (transposed:
    [c_in, c_out / groups, *kernel]); out: [batch, c_out, *spatial_out].
    """
    # flop_counter.conv_flop_count: every output position (input position when
    # transposed) meets prod(kernel)·w[0]·w[1] weights — w[1] is already divided
    # by groups — with one multiply-add each: 2·batch·prod(positions)·prod(kernel)·w[0]·w[1].
    x, w = _shape(x_shape), _shape(w_shape)
    if transposed:
        positions = x[2:]
    elif out_shape is None:
        raise ValueError("conv_flops(out_shape=None): a non-transposed conv needs the output shape")
    else:
        positions = _shape(out_shape)[2:]
    return 2 * x[0] * math.prod(positions) * math.prod(w[2:]) * w[0] * w[1]


def _attention_dims(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> tuple[int, int, int, int, int]:
    """(batch·heads, s_q, s_k, d_qk, d_v) for q [..., s_q, d_qk], k [..., s_k, d_qk], v [..., s_k, d_v]."""
    q, k, v = _shape(q_shape), _shape(k_shape), _shape(v_shape)
    if min(len(q), len(k), len(v)) < 2 or q[-1] != k[-1] or k[-2] != v[-2]:
        raise ValueError(f"attention: incompatible q {q}, k {k}, v {v}; want [..., s, d] with matching d_qk and s_k")
    # Leading dims (batch, heads) line up from the right; k/v may have fewer
    # heads than q (GQA: each k/v head serves h_q / h_kv query heads) or
    # broadcast, so the work is done over the larger of each pair.
    lead_q, lead_k = q[:-2], k[:-2]
    rank = max(len(lead_q), len(lead_k))
    lead_q = (1,) * (rank - len(lead_q)) + lead_q
    lead_k = (1,) * (rank - len(lead_k)) + lead_k
    bh = math.prod(max(a, b) for a, b in zip(lead_q, lead_k))
    return bh, q[-2], k[-2], q[-1], v[-1]


def sdpa_flops(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> int:
    """Forward FLOPs of scaled-dot-product attention (no causal discount)."""
    # flop_counter.sdpa_flop_count: scores = Q·Kᵀ (2·bh·s_q·s_k·d_qk) and
    # out = P·V (2·bh·s_q·s_k·d_v); softmax and scaling not counted; causal
    # masking not discounted (flop_counter does not either).
    bh, s_q, s_k, d_qk, d_v = _attention_dims(q_shape, k_shape, v_shape)
    return 2 * bh * s_q * s_k * d_qk + 2 * bh * s_q * s_k * d_v


def sdpa_backward_flops(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> int:
    """Backward FLOPs of fused (flash / memory-efficient) attention."""
    # flop_counter.sdpa_backward_flop_count, five matmuls: recompute Q·Kᵀ
    # (d_qk), dP = dO·Vᵀ (d_v), dV = Pᵀ·dO (d_v), dQ = dS·K (d_qk),
    # dK = dSᵀ·Q (d_qk): 2·bh·s_q·s_k·(3·d_qk + 2·d_v) = 2.5 × forward when d_qk = d_v.
    bh, s_q, s_k, d_qk, d_v = _attention_dims(q_shape, k_shape, v_shape)
    return 2 * bh * s_q * s_k * (3 * d_qk + 2 * d_v)


def einsum_flops(equation: str, shapes: Sequence[Shape]) -> int:
    """Forward FLOPs of torch.einsum, contracting operands left to right.

    torch.einsum contracts pairwise left to right (with opt_einsum installed
    it may pick another order; this estimate keeps left to right). Each
    pairwise contraction is one bmm of 2·prod(sizes of its letters) FLOPs;
    letters found in one operand only are summed first (no FLOPs); a pair with
    nothing to contract is an elementwise/outer product, priced as bytes.
    """
    shapes = [_shape(s) for s in shapes]
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum({equation!r}): {len(terms)} operands in the equation, {len(shapes)} shapes given")
    # "..." becomes placeholder letters (Greek capitals never appear in an
    # equation), right-aligned so broadcast dims share a letter.
    ell_rank = max((len(s) - len(t) + 3 for t, s in zip(terms, shapes) if "..." in t), default=0)
    ell = "".join(chr(0x391 + i) for i in range(ell_rank))
    ops = [t.replace("...", ell[ell_rank - (len(s) - len(t) + 3):]) for t, s in zip(terms, shapes)]
    sizes: dict[str, int] = {}
    for term, shape in zip(ops, shapes):
        if len(term) != len(shape):
            raise ValueError(f"einsum({equation!r}): term {term!r} does not match shape {shape}")
        for c, size in zip(term, shape):
            sizes[c] = max(sizes.get(c, 1), size)
    if arrow:
        output = rhs.replace("...", ell)
    else:  # implicit output: ellipsis dims, then letters used exactly once, sorted
        output = ell + "".join(sorted(c for c in sizes if c not in ell and sum(t.count(c) for t in ops) == 1))
    total, cur = 0, set(ops[0])
    for i in range(1, len(ops)):
        later = set(output).union(*ops[i + 1:])
        nxt = set(ops[i])
        a = {c for c in cur if c in nxt or c in later}
        b = {c for c in nxt if c in cur or c in later}
        if (a & b) - later:
            total += 2 * math.prod(sizes[c] for c in a | b)
        cur = (a | b) & later
    return total


def _bind(op: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Argument name -> value for one call of `op`, from its schema."""
    schema = op._schema
    bound = {a.name: v for a, v in zip(schema.arguments, args)}
    bound.update(kwargs)
    return bound


def _conv(bound: dict[str, Any], out: Any, transposed: bool) -> int:
    x = _shape(bound["input"] if "input" in bound else bound["self"])
    w = _shape(bound["weight"])
    transposed = transposed or bool(bound.get("transposed", False))
    out_shape = None if out is None else _shape(out[0] if isinstance(out, (tuple, list)) else out)
    if len(x) == len(w) - 1:  # unbatched input [c_in, *spatial] (conv1d/2d/3d accept it)
        x = (1, *x)
        out_shape = None if out_shape is None else (1, *out_shape)
    if out_shape is None and not transposed:
        raise ValueError("op_flops(convolution): pass `out` (the output tensor or its shape) to size the output")
    return conv_flops(x, w, out_shape, transposed)


def _sdpa(bound: dict[str, Any]) -> tuple[int, int]:
    # Every SDPA variant takes query, key, value as [batch, heads, seq, head_dim]
    # (the flash/efficient kernels transpose internally).
    q, k, v = bound["query"], bound["key"], bound["value"]
    return sdpa_flops(q, k, v), sdpa_backward_flops(q, k, v)


def _fwd_bwd(flops: int) -> tuple[int, int]:
    return flops, MATMUL_BACKWARD_FACTOR * flops


_Handler = Callable[[dict[str, Any], Any], tuple[int, int]]
_HANDLERS: dict[str, _Handler] = {
    "mm": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["self"], b["mat2"])),
    "addmm": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["mat1"], b["mat2"])),
    "bmm": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["self"], b["mat2"])),
    "baddbmm": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["batch1"], b["batch2"])),
    "addbmm": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["batch1"], b["batch2"])),
    "matmul": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["self"], b["other"])),
    # FlopCounterMode has no formula for mv/addmv/dot (it counts them as 0);
    # they are matmuls of one column and are priced like one here.
    "mv": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["self"], b["vec"])),
    "addmv": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["mat"], b["vec"])),
    "dot": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["self"], b["tensor"])),
    "_scaled_mm": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["self"], b["mat2"])),
    # linear: input [..., in] @ weightᵀ [in, out].
    "linear": lambda b, o: _fwd_bwd(broadcast_matmul_flops(b["input"], _shape(b["weight"])[::-1])),
    "einsum": lambda b, o: _fwd_bwd(einsum_flops(b["equation"], b["tensors"])) if "equation" in b else (0, 0),
}
for _name in ("convolution", "_convolution", "convolution_overrideable", "conv1d", "conv2d", "conv3d",
              "cudnn_convolution", "mkldnn_convolution", "_slow_conv2d_forward"):
    _HANDLERS[_name] = lambda b, o: _fwd_bwd(_conv(b, o, transposed=False))
for _name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
    _HANDLERS[_name] = lambda b, o: _fwd_bwd(_conv(b, o, transposed=True))
for _name in ("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_fused_attention_overrideable"):
    _HANDLERS[_name] = lambda b, o: _sdpa(b)
del _name
# Not covered: _flash_attention_forward / _efficient_attention_forward (the
# [b, s, h, d] kernels below the SDPA ops; they never appear in an exported
# graph) and nested/varlen attention.

# Keyed by OpOverloadPacket; getattr guards ops some builds lack.
_BY_PACKET: dict[Any, _Handler] = {
    getattr(aten, name): fn for name, fn in _HANDLERS.items() if hasattr(aten, name)
}


def op_flops(op: Any, args: Sequence[Any], kwargs: dict[str, Any] | None = None, out: Any = None) -> tuple[int, int]:
    """(forward, backward) FLOPs of one call of the ATen op `op`.

    `op` is a torch._ops.OpOverload (e.g. torch.ops.aten.linear.default) or its
    packet; `args`/`kwargs` are the call's arguments (real or fake tensors:
    only shapes are read); `out` its result (needed for convolutions). Ops
    without matmul work return (0, 0).
    """
    grouped = expert_matmul_flops(op, args)  # MoE: a grouped matmul over the experts (experts.py)
    if grouped is not None:
        return grouped
    packet = getattr(op, "overloadpacket", op)
    handler = _BY_PACKET.get(packet)
    if handler is None:
        return 0, 0
    overload = op if hasattr(op, "_schema") else getattr(op, "default")
    return handler(_bind(overload, args, kwargs or {}), out)


def _cpu_flash_forward_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flops(query_shape, key_shape, value_shape)


def _cpu_flash_backward_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                **kwargs) -> int:
    return sdpa_backward_flops(query_shape, key_shape, value_shape)


def register_missing_flop_formulas() -> None:
    """Teach FlopCounterMode the ops it counts as 0 FLOPs on the CPU. Idempotent.

    Registers the CPU flash-attention forward and backward (REFERENCES.md:
    without them FlopCounterMode reports 0 for attention on the CPU). Ops
    already in the registry (from us or a later torch) are left alone. Call it
    before constructing a FlopCounterMode, which copies the registry.
    """
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": _cpu_flash_forward_formula,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_flash_backward_formula,
    }
    for name, formula in formulas.items():
        packet = getattr(aten, name, None)
        if packet is not None and packet not in flop_registry:
            register_flop_formula(packet)(formula)
