"""Reading a GraphModule's attributes by their dotted get_attr targets, and a call's arguments by name."""

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


def named_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """A call_function node's arguments by their schema's names, defaults filled in (ATen ops;
    overloads of one op may order them differently)."""
    schema = node.target._schema
    values = {a.name: a.default_value if a.has_default_value() else None for a in schema.arguments}
    values.update(zip([a.name for a in schema.arguments], node.args))
    values.update(node.kwargs)
    return values
