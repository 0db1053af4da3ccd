"""Time of one op on one device from its FLOPs and bytes moved (roofline). Units: seconds."""

from __future__ import annotations

import torch

from autopart.cost_models.devices import DeviceSpec

# Fraction of datasheet peak a large matmul reaches. meta-pytorch/autoparallel
# prices compute at 70% of peak (REFERENCES.md); on two H200s a bf16 GEMM
# measured about 750 of 989 TFLOP/s, 76% (REFERENCES.md). 0.7 keeps the
# conservative figure until `autopart.calibrate()` measures it.
MATMUL_EFFICIENCY = 0.7

# Fraction of datasheet memory bandwidth a streaming (elementwise) kernel
# reaches. Rule of thumb: STREAM-style copy kernels reach 80–90% of the
# datasheet bandwidth on HBM GPUs; 0.8 is the conservative end until
# `autopart.calibrate()` measures it.
MEMORY_EFFICIENCY = 0.8

# The per-op floor is per device: DeviceSpec.launch_overhead_s (5 µs for the
# GPU presets, 2 µs for the CPU; autoparallel uses 7 µs).


def op_seconds(flops: float, bytes_moved: float, device: DeviceSpec, dtype: torch.dtype) -> float:
    """max(compute time, memory time) + the device's launch floor, for a non-empty op.

    compute = flops / (peak FLOP/s for `dtype` · MATMUL_EFFICIENCY);
    memory = bytes_moved / (memory bandwidth · MEMORY_EFFICIENCY). The launch
    floor (DeviceSpec.launch_overhead_s; autoparallel uses a 7 µs floor) is
    added only when the op does some work.
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"op_seconds(flops={flops}, bytes_moved={bytes_moved}): both must be >= 0")
    if flops == 0 and bytes_moved == 0:
        return 0.0
    compute_s = flops / (device.peak_flops(dtype) * MATMUL_EFFICIENCY)
    memory_s = bytes_moved / (device.memory_bandwidth * MEMORY_EFFICIENCY)
    return max(compute_s, memory_s) + device.launch_overhead_s
