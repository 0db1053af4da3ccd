"""Reading a GraphModule's attributes by their dotted get_attr targets."""

from __future__ import annotations

from typing import Any

import torch


def fetch_attr(module: torch.nn.Module, target: str) -> Any:
    """The object at dotted path `target` ('blocks.0.mlp_fc.weight') under `module`."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def is_parameter(module: torch.nn.Module, target: str) -> bool:
    """Whether `target` names an nn.Parameter (not a buffer or constant) of `module`."""
    try:
        module.get_parameter(target)
        return True
    except AttributeError:
        return False
