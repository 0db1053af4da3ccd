"""Time of one op on one device from its FLOPs and bytes moved (roofline). Units: seconds."""

from __future__ import annotations

import torch

from autopart.cost_models.devices import MATMUL_EFFICIENCY, MEMORY_EFFICIENCY, DeviceSpec

__all__ = ["MATMUL_EFFICIENCY", "MEMORY_EFFICIENCY", "op_seconds", "weight_read_seconds"]

# The efficiencies are per device (DeviceSpec.matmul_efficiency,
# matmul_efficiency_by_dtype, memory_efficiency); these defaults, with their
# sources, live in devices.py and are re-exported here.

# The per-op floor is per device: DeviceSpec.launch_overhead_s (5 µs for the
# GPU presets, 2 µs for the CPU; autoparallel uses 7 µs).


def op_seconds(flops: float, bytes_moved: float, device: DeviceSpec, dtype: torch.dtype) -> float:
    """max(compute time, memory time) + the device's launch floor, for a non-empty op.

    compute = flops / device.achieved_flops(dtype) (peak FLOP/s for `dtype` ×
    the device's matmul efficiency, 0.7 unless calibrated);
    memory = bytes_moved / device.achieved_bandwidth (memory bandwidth × the
    device's memory efficiency, 0.8 unless calibrated). The launch floor
    (DeviceSpec.launch_overhead_s; autoparallel uses a 7 µs floor) is added
    only when the op does some work.
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"op_seconds(flops={flops}, bytes_moved={bytes_moved}): both must be >= 0")
    if flops == 0 and bytes_moved == 0:
        return 0.0
    compute_s = flops / device.achieved_flops(dtype)
    memory_s = bytes_moved / device.achieved_bandwidth
    return max(compute_s, memory_s) + device.launch_overhead_s


def weight_read_seconds(flops: float, bytes_moved: float, weight_bytes: float, device: DeviceSpec,
                        dtype: torch.dtype) -> float:
    """Of `op_seconds(flops, bytes_moved, ...)`, what reading `weight_bytes` of it adds (s):
    max(compute, memory) − max(compute, memory without the weights). An op reads its weights once
    per call whatever its batch, so this part does not grow with the batch: a matmul that is
    memory-bound on its weights at one sample (M = one sequence) is compute-bound at sixteen.
    Pricing a larger batch as fixed + batch × (the rest) is then exact where the op is memory-bound
    or compute-bound at the traced batch, and over by less than this part in between."""
    if weight_bytes <= 0 or (flops == 0 and bytes_moved == 0):
        return 0.0
    compute_s = flops / device.achieved_flops(dtype)
    return (max(compute_s, bytes_moved / device.achieved_bandwidth)
            - max(compute_s, max(bytes_moved - weight_bytes, 0.0) / device.achieved_bandwidth))
