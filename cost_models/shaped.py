"""Rates measured on kernels shaped like the ones a plan runs, not on peak-like ones.

`autopart.calibrate()` fits a device's achieved matmul rate and memory bandwidth, which the
roofline (roofline.py) then applies to every op of every plan. Measured on kernels chosen for
their speed (one large square-ish GEMM family at d 4096, a streaming copy of one float32 buffer),
those rates exceed what a model's own kernels reach, and a calibrated plan comes out faster than
it runs: on an H100 a Llama 16 × 2048 training step went from 0.92 of the measured step
(preset) to 0.88 (calibrated), as the copy reached 88% of the datasheet bandwidth and the d 4096
GEMMs 78% of the bf16 peak. So:

- matmuls: every GEMM of training a transformer layer, not its forward alone: for each weight
  matmul (m, k, n) over m tokens its forward, its input gradient (m, n, k) and its weight gradient
  (k, m, n), whose long inner dimension and transposed operands run slower; the shapes are the
  model's own where `autopart.calibrate(model=...)` is given one;
- memory-bound ops: the elementwise kernels eager PyTorch runs between those matmuls over a
  [tokens, d] activation, each counted as node_costs.py counts an op's bytes (every input read,
  the output written): autocast's conversions both ways, a residual add, a norm's square, mean,
  and broadcast multiply by its weight, an activation and the gated product in bf16.

Units: FLOP/s, bytes/s, seconds. Pure torch; the timing helper is measure.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from autopart.cost_models.measure import Shape, _median_seconds, _torch_dtype, measure_matmul_flops

__all__ = ["measure_elementwise_bandwidth", "training_matmul_shapes", "ELEMENTWISE_OPS"]


def training_matmul_shapes(forward: Sequence[Shape]) -> tuple[Shape, ...]:
    """Every GEMM a training step runs for the forward weight matmuls `forward` ((m, k, n) each:
    m rows of width k times a k × n weight): the forward (m, k, n), the input gradient
    dY·Wᵀ (m, n, k) and the weight gradient Xᵀ·dY (k, m, n)."""
    shapes: list[Shape] = []
    for m, k, n in forward:
        if min(m, k, n) < 1:
            raise ValueError(f"training_matmul_shapes: ({m}, {k}, {n}) has a non-positive size")
        shapes += [(m, k, n), (m, n, k), (k, m, n)]
    return tuple(shapes)


def measure_training_matmul_flops(device: torch.device | str, dtype: torch.dtype | str,
                                  forward: Sequence[Shape], *, repeats: int = 10, budget_s: float = 2.0) -> float:
    """FLOP/s over every GEMM of training with the forward matmuls `forward`: Σ FLOPs / Σ seconds,
    so each shape weighs as much as a step spends in it (`measure.measure_matmul_flops`)."""
    return measure_matmul_flops(device, dtype, training_matmul_shapes(forward), repeats=repeats, budget_s=budget_s)


def _ops(rows: int, width: int, device: torch.device) -> list[tuple[str, Callable[[], object], int]]:
    """(name, call, bytes moved) of each elementwise kernel the mix times (see the module docstring)."""
    bf16, f32 = torch.bfloat16, torch.float32
    x16 = torch.randn(rows, width, device=device, dtype=bf16)
    x32 = torch.randn(rows, width, device=device, dtype=f32)
    y32 = torch.randn(rows, width, device=device, dtype=f32)
    y16 = torch.randn(rows, width, device=device, dtype=bf16)
    weight = torch.randn(width, device=device, dtype=f32)
    element = rows * width
    return [
        ("bf16 -> float32", lambda: x16.to(f32), element * (2 + 4)),
        ("float32 -> bf16", lambda: x32.to(bf16), element * (4 + 2)),
        ("residual add", lambda: x32 + y32, element * 12),
        ("square", lambda: x32.pow(2), element * 8),
        ("mean over d", lambda: x32.mean(-1, keepdim=True), element * 4 + rows * 4),
        ("norm weight", lambda: x32 * weight, element * 8 + width * 4),
        ("activation (bf16)", lambda: torch.nn.functional.silu(x16), element * 4),
        ("gated product (bf16)", lambda: x16 * y16, element * 6),
    ]


ELEMENTWISE_OPS = ("bf16 -> float32", "float32 -> bf16", "residual add", "square", "mean over d", "norm weight",
                   "activation (bf16)", "gated product (bf16)")
"""The kernels `measure_elementwise_bandwidth` times, in order."""


def measure_elementwise_bandwidth(device: torch.device | str, rows: int, width: int, *,
                                  repeats: int = 10) -> tuple[float, dict[str, float]]:
    """(bytes/s, {kernel: bytes/s}) of the elementwise kernels eager PyTorch runs over a [rows, width]
    activation: Σ bytes / Σ median seconds over `ELEMENTWISE_OPS`, each op's bytes as the roofline
    counts them (inputs read + output written)."""
    device = torch.device(device)
    if rows < 1 or width < 1:
        raise ValueError(f"measure_elementwise_bandwidth(rows={rows}, width={width}): both must be >= 1")
    total_bytes = total_seconds = 0.0
    each: dict[str, float] = {}
    for name, call, moved in _ops(rows, width, device):
        seconds = _median_seconds(call, device, repeats=repeats, warmup=2)
        each[name] = moved / seconds
        total_bytes += moved
        total_seconds += seconds
    return total_bytes / total_seconds, each
