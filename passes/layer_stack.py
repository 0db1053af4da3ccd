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
import functools
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
    kept: tuple[int, ...] = ()
    """Layers of several kinds (`find_layer_stack`): the model's layer indices the copy keeps, in
    order, under their own names; () for identical layers (the copy keeps layers 0 .. keep − 1)."""
    representatives: tuple[int, ...] = ()
    """Layers of several kinds: per model layer, the position in `kept` of the layer standing for it."""
    kinds: tuple[int, ...] = ()
    """Layers of several kinds: per model layer, its kind (0, 1, ...; () for identical layers)."""

    def kind_of_position(self, position: int) -> int:
        """The kind of the copy's layer at `position` (0 for identical layers)."""
        return self.kinds[self.kept_index(position)] if self.kinds else 0

    def layer_prefix(self, index: int) -> str:
        """Module path of layer `index` ('model.layers.7')."""
        return f"{self.path}.{index}" if self.path else str(index)

    def kept_index(self, position: int) -> int:
        """The model's index of the copy's layer at `position`."""
        return self.kept[position] if self.kept else position

    def kept_prefix(self, position: int) -> str:
        """Module path of the copy's layer at `position` (its name in the model)."""
        return self.layer_prefix(self.kept_index(position))

    def position_of(self, index: int) -> int | None:
        """The copy's position of the model's layer `index` (None: the copy does not keep it)."""
        if not self.kept:
            return index if index < self.keep else None
        return self.kept.index(index) if index in self.kept else None

    def representative(self, i: int) -> int:
        """The kept position standing for model layer i: with identical layers the first and last
        as themselves, inner ones by layer 1; with several kinds, an inner layer of i's kind."""
        if self.representatives:
            return self.representatives[i]
        if i == 0:
            return 0
        if i == self.num_layers - 1:
            return self.keep - 1
        return 1

    @property
    def num_kinds(self) -> int:
        return len(set(self.kinds)) if self.kinds else 1


MAX_KINDS = 4
"""Kinds of layer a stack may mix (dense and MoE, sliding-window and global attention) and still
be analysed through a copy: one inner layer of each kind, plus the first and the last."""


def find_layer_stack(model: nn.Module, keep: int = KEEP_LAYERS) -> LayerStack | None:
    """The longest container of more than `keep` identical layers, or None.

    Without one, the longest container of layers of a few kinds (at most `MAX_KINDS`, each a run
    of identical layers, such as DeepSeek-V3's 3 dense then 58 MoE layers or Gemma 3's five
    sliding-window layers to one global) whose copy keeps fewer layers than the model has."""
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
    if best is not None:
        return best
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) <= keep:
            continue
        layers = list(module)
        mixed = _mixed_stack(path, layers)
        if mixed is not None and not _shares_parameters(layers, shared) and (
                best is None or mixed.num_layers > best.num_layers):
            best = mixed
    return best


def _mixed_stack(path: str, layers: list[nn.Module]) -> LayerStack | None:
    """A stack of layers of a few kinds: the copy keeps the model's first n layers, n the fewest that
    hold a template (an inner layer after the kind's first) of every kind and end with a layer of the
    last layer's kind, which stands for the last. The copy's other layers stand for themselves, and
    each kind's template for the model's later inner layers of that kind. A prefix, because models may pick a layer's mask or rotary table by its position in
    the loop (Gemma 3: config.layer_types[i]): the copy's layer i is the model's layer i."""
    kinds: list[int] = []
    templates: list[int] = []  # the first layer of each kind
    for i, layer in enumerate(layers):
        kind = next((k for k, t in enumerate(templates) if _identical_pair(layers[t], t, layer, i)), None)
        if kind is None:
            if len(templates) == MAX_KINDS:
                return None
            templates.append(i)
            kind = len(templates) - 1
        kinds.append(kind)
    if len(templates) == 1:
        return None
    last = len(layers) - 1
    occurrences: dict[int, list[int]] = {}
    for i in range(last):
        occurrences.setdefault(kinds[i], []).append(i)
    # a kind's template: an inner layer after its first occurrence, which already saved what the
    # kind's layers share (one rotary table for all global layers): autograd counts it once
    inner = {kind: (seen[1] if len(seen) > 1 else seen[0]) for kind, seen in occurrences.items() if seen[-1] > 0}
    n = max(inner.values(), default=0) + 2
    while n <= last and kinds[n - 1] != kinds[last]:
        n += 1
    if n > last:
        return None  # the copy would hold (nearly) every layer
    kept = list(range(n))
    representatives = tuple(i if i < n - 1 else n - 1 if i == last else inner[kinds[i]] for i in range(len(layers)))
    return LayerStack(path=path, num_layers=len(layers), keep=len(kept), kept=tuple(kept),
                      representatives=representatives, kinds=tuple(kinds))


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
    items = list(parent._modules.items())
    kept = [items[i] for i in stack.kept] if stack.kept else items[:stack.keep]
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


def _identical_pair(a: nn.Module, i: int, b: nn.Module, j: int) -> bool:
    """Whether layer a (index i) and layer b (index j) are alike: equal fingerprints, where an integer
    attribute may differ only by being each one's own index."""
    pa, pb = _fingerprint(a), _fingerprint(b)
    if pa[1:] != pb[1:] or len(pa[0]) != len(pb[0]):
        return False
    for x, y in zip(pa[0], pb[0]):
        if x[:-1] != y[:-1] or x[-1].keys() != y[-1].keys():
            return False
        for key, value in x[-1].items():
            other = y[-1][key]
            if other != value and not (type(value) is int and type(other) is int and value == i and other == j):
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
    if isinstance(value, functools.partial):  # made per layer (transformers' GELUTanh.act): by what it calls
        return ("partial", id(value.func), tuple(_plain(v) for v in value.args),
                tuple(sorted((k, _plain(v)) for k, v in value.keywords.items())))
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
