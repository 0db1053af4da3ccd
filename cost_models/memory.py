"""Bytes held by tensors, gradients and optimizer state. Units: bytes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# State tensors torch.optim keeps per parameter, as multiples of the
# parameter's own bytes (torch.optim docs, the "state" each algorithm
# initialises in `_init_group`; every state tensor is created with
# torch.zeros_like(param), so it has the parameter's dtype and shape):
#   SGD without momentum: nothing; with momentum: momentum_buffer (1×).
#   Adam / AdamW: exp_avg and exp_avg_sq (2×), plus max_exp_avg_sq with
#   amsgrad=True (3×). The per-parameter `step` is a scalar tensor, ignored.
#   Adagrad: sum (1×). RMSprop: square_avg (1×, without momentum/centered).
_STATE_MULTIPLIER = {
    "sgd": 0,
    "momentum": 1,
    "sgd_momentum": 1,
    "adam": 2,
    "adamw": 2,
    "adam_amsgrad": 3,
    "adagrad": 1,
    "rmsprop": 1,
}


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor: prod(shape) · element size of `dtype`."""
    dims = [int(s) for s in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"tensor_bytes(shape={tuple(dims)}): dimensions must be >= 0")
    return math.prod(dims) * dtype.itemsize


def gradient_bytes(param_bytes: int) -> int:
    """Bytes of a parameter's gradient: the parameter's own (same shape and dtype)."""
    if param_bytes < 0:
        raise ValueError(f"gradient_bytes(param_bytes={param_bytes}): must be >= 0")
    return int(param_bytes)


def optimizer_state_bytes(param_bytes: int, optimizer: str) -> int:
    """Bytes of optimizer state for parameters of `param_bytes` bytes (see _STATE_MULTIPLIER)."""
    if param_bytes < 0:
        raise ValueError(f"optimizer_state_bytes(param_bytes={param_bytes}): must be >= 0")
    key = optimizer.strip().lower()
    if key not in _STATE_MULTIPLIER:
        raise ValueError(
            f"optimizer_state_bytes(optimizer={optimizer!r}): unknown optimizer; known: "
            f"{', '.join(_STATE_MULTIPLIER)}"
        )
    return _STATE_MULTIPLIER[key] * int(param_bytes)


def optimizer_step_bytes(param_bytes: int, optimizer: str) -> int:
    """Bytes one optimizer step moves through memory for parameters of `param_bytes` bytes.

    The update streams each tensor once (torch.optim's fused and foreach kernels are memory
    bound): the parameter read and written, its gradient read, each state tensor read and
    written: (3 + 2·states) × the parameter's bytes, states as in `optimizer_state_bytes`
    (AdamW: 7×, SGD: 3×).
    """
    states = optimizer_state_bytes(param_bytes, optimizer)
    return 3 * int(param_bytes) + 2 * states
