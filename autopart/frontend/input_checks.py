"""Checks of `compile`'s arguments against each other and the model, before anything is traced.

Each raises `InputError` naming the argument, the value and a fix: a mesh whose fixed sizes need
more devices than were given, a `tp_plan` pattern that names no layer of the model.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping

import torch

from autopart.core.errors import InputError


def check_mesh_product(num_devices: int, data_parallel: int | None, tensor_parallel: int | None,
                       pipeline_parallel: int | None) -> None:
    """The fixed mesh sizes' product must not exceed the devices (a plan may leave some idle)."""
    fixed = [(name, size) for name, size in (("data_parallel", data_parallel), ("tensor_parallel", tensor_parallel),
                                             ("pipeline_parallel", pipeline_parallel)) if size is not None]
    if len(fixed) < 2:
        return  # one size alone is checked with its own choices (plan_choices.py, mesh_search.py)
    product = 1
    for _, size in fixed:
        product *= size
    if product > num_devices:
        names = " × ".join(f"{name}={size}" for name, size in fixed)
        sizes = " × ".join(str(size) for _, size in fixed)
        raise InputError(f"{names}: {sizes} = {product} devices, you gave {num_devices}; give {product} devices "
                         "or fix smaller sizes (or leave one to the planner)")


def check_tp_plan(model: torch.nn.Module, tp_plan: Mapping[str, str] | None) -> None:
    """Every pattern of `tp_plan` must match a module of `model` that holds parameters of its own."""
    if not tp_plan:
        return
    if not isinstance(tp_plan, Mapping):
        raise InputError(f"tp_plan must be a dict of module pattern -> style, got {type(tp_plan).__name__}; "
                         "e.g. {'blocks.*.mlp_fc': 'colwise'}")
    weighted = [name for name, module in model.named_modules()
                if name and any(True for _ in module.parameters(recurse=False))]
    for pattern in tp_plan:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in weighted):
            examples = ", ".join(weighted[:6]) + (", …" if len(weighted) > 6 else "")
            raise InputError(f"tp_plan pattern {pattern!r} matches no layer of {type(model).__name__}; patterns "
                             f"match module paths with parameters, such as {examples}")
