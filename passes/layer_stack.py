"""The model's stack of identical layers, and a copy of the model with only a few of them.

Planning cost should follow a model's distinct structure, not its depth: an
80-layer Llama has one layer 80 times. `find_layer_stack` finds the longest
`nn.ModuleList` / `nn.Sequential` whose elements are structurally identical
(same classes, configuration, parameter and buffer shapes, plain attributes; an
attribute equal to the layer's own index, such as transformers' `layer_idx`, is
the only allowed difference). `shortened` returns a shallow copy of the model
whose stack holds its first `keep` layers: the same parameter objects under the
same names, nothing copied, so a model on the meta device stays free.

Tracing, annotating and choosing tp splits on the copy and restating the block
costs for the full depth (passes/stack_blocks.py) gives the full model's
blocks, because the layers are identical and the first `keep` = 3 layers
contain every context a layer can be traced in: the first (after the model's
prologue), an inner one (between two layers), the last (before the epilogue).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KEEP_LAYERS = 3
"""Layers the analysed copy keeps: the first, one inner layer (the template of all inner ones), the last."""


@dataclass(frozen=True, kw_only=True)
class LayerStack:
    """A run of structurally identical layers in one container module."""

    path: str
    """Module path of the container, e.g. 'model.layers' ('' for a Sequential model itself)."""
    num_layers: int
    """Layers in the model."""
    keep: int = KEEP_LAYERS
    """Layers in the analysed copy."""

    def layer_prefix(self, index: int) -> str:
        """Module path of layer `index` ('model.layers.7')."""
        return f"{self.path}.{index}" if self.path else str(index)


def find_layer_stack(model: nn.Module, keep: int = KEEP_LAYERS) -> LayerStack | None:
    """The longest container of more than `keep` identical layers, or None."""
    shared = _parameters_outside_layers(model)
    best: LayerStack | None = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) <= keep:
            continue
        if best is not None and len(module) <= best.num_layers:
            continue
        layers = list(module)
        if _identical(layers) and not _shares_parameters(layers, shared):
            best = LayerStack(path=path, num_layers=len(layers), keep=keep)
    return best


def shortened(model: nn.Module, stack: LayerStack) -> nn.Module:
    """A shallow copy of `model` whose stack holds its first `stack.keep` layers.

    Modules on the path to the stack are copied (their child dicts too); everything
    else, parameters included, is shared with `model`.
    """
    root = _copy_module(model)
    parent = root
    parts = stack.path.split(".") if stack.path else []
    for part in parts:
        child = _copy_module(parent._modules[part])
        parent._modules[part] = child
        parent = child
    kept = list(parent._modules.items())[:stack.keep]
    parent._modules = dict(kept)
    return root


def _copy_module(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


# ----------------------------------------------------------------------------- identity


def _identical(layers: list[nn.Module]) -> bool:
    """Equal fingerprints, where an integer attribute may differ only by being each layer's index
    (0 in the first layer, i in layer i)."""
    prints = [_fingerprint(layer) for layer in layers]
    first = prints[0]
    for i, other in enumerate(prints[1:], start=1):
        if other[1:] != first[1:] or len(other[0]) != len(first[0]):
            return False
        for a, b in zip(first[0], other[0]):
            if a[:-1] != b[:-1] or a[-1].keys() != b[-1].keys():
                return False
            for key, value in a[-1].items():
                if b[-1][key] != value and not (value == 0 and type(b[-1][key]) is int and b[-1][key] == i):
                    return False
    return True


def _fingerprint(layer: nn.Module) -> tuple:
    """What the trace of a layer depends on, less its parameter values: per module its name,
    class, configuration, hooks and plain attributes (a dict, compared key by key)."""
    modules = []
    for name, module in layer.named_modules():
        attributes = {key: _plain(value) for key, value in vars(module).items()
                      if not key.startswith("_") and key != "training"}
        hooks = tuple(id(h) for hooks in (module._forward_hooks, module._forward_pre_hooks,
                                          module._backward_hooks) for h in hooks.values())
        modules.append((name, type(module), module.extra_repr(), module.training, hooks, attributes))
    params = tuple((name, tuple(p.shape), p.dtype, p.requires_grad)
                   for name, p in layer.named_parameters(remove_duplicate=False))
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in layer.named_buffers(remove_duplicate=False))
    return tuple(modules), params, buffers


def _plain(value: Any) -> Any:
    """A comparable stand-in: plain values as they are, tensors by shape and dtype, other objects
    by identity (a config object shared by every layer compares equal; per-layer copies do not)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_plain(v) for v in value)
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape), value.dtype
    return "object", type(value).__qualname__, id(value)


def _parameters_outside_layers(model: nn.Module) -> dict[int, int]:
    """id(tensor) -> number of paths reaching it, over every parameter and buffer of the model."""
    count: dict[int, int] = {}
    for _, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        count[id(tensor)] = count.get(id(tensor), 0) + 1
    return count


def _shares_parameters(layers: list[nn.Module], paths_of: dict[int, int]) -> bool:
    """True when a layer's parameter or buffer is reachable by another path too (tied across
    layers or with a module outside the stack): renaming layer by layer would then misname it."""
    for layer in layers:
        tensors = [*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False)]
        for _, tensor in tensors:
            if paths_of.get(id(tensor), 0) > 1:
                return True
    return False
