"""Mixed precision at run time: the plan's autocast around every stage's forward and the loss.

The runtimes run the stage modules under `torch.autocast(device_type,
Plan.mixed_precision's dtype)`, PyTorch's own mechanism, so a stage computes
exactly what the eager model computes in `torch.autocast`. Parameters stay in
the dtype they have (float32 master weights), and so do their gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from autopart.core.errors import InputError
from autopart.core.plan import autocast_dtype


def stage_autocast(device_type: str, mixed_precision: str | None) -> ContextManager[Any]:
    """The context a stage's forward (and the loss) runs in: autocast, or nothing in full precision."""
    dtype = autocast_dtype(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def check_caller_autocast(device_type: str, mixed_precision: str | None) -> None:
    """Refuse a caller's own `torch.autocast` that disagrees with the plan: the plan priced and
    shaped its stages for its own precision (stages exchange tensors of the planned dtypes)."""
    if not torch.is_autocast_enabled(device_type):
        return
    theirs = torch.get_autocast_dtype(device_type)
    ours = autocast_dtype(mixed_precision)
    if ours is None:
        raise InputError(
            f"the step runs inside torch.autocast({device_type!r}, dtype={theirs}) but the plan has "
            "mixed_precision=None; compile with mixed_precision='bf16' (the runner then enables autocast "
            "itself) and call the runner outside your autocast"
        )
    if theirs != ours:
        raise InputError(
            f"the step runs inside torch.autocast({device_type!r}, dtype={theirs}) but the plan has "
            f"mixed_precision={mixed_precision!r} ({ours}); drop your autocast (the runner enables the "
            "plan's) or re-compile with the precision you want"
        )


def cast_like(x: Any, planned: Any) -> Any:
    """A floating tensor `x` in the floating dtype of its planned value (unchanged otherwise):
    stages exchange the dtypes the plan declared, whatever the device's autocast policy made."""
    if (isinstance(x, torch.Tensor) and isinstance(planned, torch.Tensor) and x.is_floating_point()
            and planned.is_floating_point() and x.dtype != planned.dtype):
        return x.to(planned.dtype)
    return x
