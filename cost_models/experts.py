"""Mixture-of-experts kernels: the grouped expert matmuls, from shapes alone.

A mixture-of-experts layer sends each token to its top-k experts. HF's
`grouped_mm` experts (transformers/integrations/moe.py, the default since 5.x)
sort the token-expert pairs by expert and run one grouped matmul per
projection: S = tokens × top-k rows of [S, K] against [E, K, N] expert weights,
row block g (rows offs[g-1]:offs[g]) against expert g. However the routing
falls, every row meets exactly one expert, so the FLOPs are 2·S·K·N whatever
the split: the shapes are static and the traced example's routing prices the
same as any other (a dropless router; no capacity factor).

What runs, and so what is priced:
- `aten._grouped_mm` / `aten.grouped_mm` (torch.nn.functional.grouped_mm): one
  kernel (CUTLASS on SM90 for bf16; a loop of mm inside ATen otherwise);
- `transformers::grouped_mm_fallback`: what an exported graph holds wherever
  torch's kernel was not eligible at trace time (non-bf16 weights under
  compile/export, old torch on CPU). It is a Python loop: one `torch.mm` per
  expert forward (after one device-to-host copy of the offsets), two per expert
  backward plus a zero fill of the whole weight gradient
  (`_grouped_mm_fallback_bwd`). Its dtype is the weights' (the input is cast to
  it), so under bf16 autocast over float32 master weights it computes in float32.

Units: FLOPs (multiply-add = 2) and kernel counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

GROUPED_MM_ATEN = ("_grouped_mm", "grouped_mm")
"""ATen names of torch's grouped matmul (the second from torch 2.10 on)."""

LOOPED_GROUPED_MM = ("transformers::grouped_mm_fallback",)
"""Custom ops that run a grouped matmul as a loop of one mm per expert."""


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape) if isinstance(x, torch.Tensor) else tuple(int(s) for s in x)


def grouped_mm_flops(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """Forward FLOPs of a grouped matmul of `a` by `b` (torch.nn.functional.grouped_mm's cases).

    - a [S, K], b [E, K, N], groups over rows of a (the MoE case): each row meets one group,
      2·S·K·N;
    - a [E, M, K], b [E, K, N] (one matmul per group, a bmm): 2·E·M·K·N;
    - a [E, M, K], b [K, N] (groups over rows of b): 2·E·M·K·N;
    - a [M, K], b [K, N] (groups over K): the K slices add up, 2·M·K·N.
    """
    a, b = _shape(a_shape), _shape(b_shape)
    if len(a) == 2 and len(b) == 3:
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 3 and len(b) == 3:
        return 2 * a[0] * a[1] * a[2] * b[2]
    if len(a) == 3 and len(b) == 2:
        return 2 * a[0] * a[1] * a[2] * b[1]
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * a[1] * b[1]
    raise ValueError(f"grouped_mm: operands of ranks 2 or 3 expected, got shapes {a} and {b}")


def op_name(op: Any) -> str:
    """'namespace::name' of an OpOverload or its packet ('' for anything else)."""
    packet = getattr(op, "overloadpacket", op)
    qualified = getattr(packet, "_qualified_op_name", "")
    return qualified


def expert_matmul_flops(op: Any, args: Sequence[Any]) -> tuple[int, int] | None:
    """(forward, backward) FLOPs of a grouped expert matmul call, or None if `op` is not one.

    Backward computes the input's and the weights' gradients, each a grouped matmul of the
    forward's size: 2 × forward (as for any matmul, flops.MATMUL_BACKWARD_FACTOR)."""
    name = op_name(op)
    if name in LOOPED_GROUPED_MM or name.removeprefix("aten::") in GROUPED_MM_ATEN and name.startswith("aten::"):
        fwd = grouped_mm_flops(args[0], args[1])
        return fwd, 2 * fwd
    return None


def expert_loop_launches(op: Any, args: Sequence[Any]) -> tuple[int, int]:
    """(forward, backward) kernel launches a grouped matmul call makes beyond the one the
    roofline's floor already counts: the looped fallback launches one mm per expert forward
    and two per expert backward, plus the weight gradient's zero fill; torch's kernel is one."""
    if op_name(op) not in LOOPED_GROUPED_MM:
        return 0, 0
    num_experts = _shape(args[1])[0]
    # forward: E mm + the offsets' copy to the host, less the one launch already counted;
    # backward: 2·E mm + two zero fills (grad input, grad weight), less one.
    return num_experts, 2 * num_experts + 1
