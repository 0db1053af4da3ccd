"""Cost models: devices and links, FLOPs, memory, communication and op time.

Pure functions of shapes and specs; nothing here walks a graph. Units:
FLOPs, bytes, bytes/s, FLOP/s, seconds. `calibrate` (imported on its own)
measures the machine at hand for `autopart.calibrate()`.
"""

from __future__ import annotations

from autopart.cost_models.comm import (
    all_gather_seconds,
    all_reduce_seconds,
    all_to_all_seconds,
    p2p_seconds,
    reduce_scatter_seconds,
)
from autopart.cost_models.devices import PRESETS, Cluster, DeviceSpec, get_preset
from autopart.cost_models.flops import (
    conv_flops,
    einsum_flops,
    matmul_flops,
    op_flops,
    register_missing_flop_formulas,
    sdpa_backward_flops,
    sdpa_flops,
)
from autopart.cost_models.links import LINK_PRESETS, Link
from autopart.cost_models.memory import gradient_bytes, optimizer_state_bytes, optimizer_step_bytes, tensor_bytes
from autopart.cost_models.roofline import op_seconds, weight_read_seconds

__all__ = [
    "LINK_PRESETS",
    "PRESETS",
    "Cluster",
    "DeviceSpec",
    "Link",
    "all_gather_seconds",
    "all_reduce_seconds",
    "all_to_all_seconds",
    "conv_flops",
    "einsum_flops",
    "get_preset",
    "gradient_bytes",
    "matmul_flops",
    "op_flops",
    "op_seconds",
    "optimizer_state_bytes",
    "optimizer_step_bytes",
    "p2p_seconds",
    "reduce_scatter_seconds",
    "register_missing_flop_formulas",
    "sdpa_backward_flops",
    "sdpa_flops",
    "tensor_bytes",
    "weight_read_seconds",
]
