"""Point every device a graph carries at one device.

`torch.export` bakes the device it traced on into the graph (REFERENCES.md):
`aten.to.device(x, cpu, ...)` in Llama-style rotary embeddings, factory ops
(`arange`, `zeros`, `full`, `new_ones`, ...) with `device=cpu`, and
`_assert_tensor_metadata(..., device=cpu)` checks. A stage traced on the CPU
and run on `cuda:3` must create and move its tensors to `cuda:3`, so this pass
rewrites every `torch.device` literal in the arguments of every node, however
nested, and moves the module's tensors (parameters, buffers, constants) too.

PyTorch ships `torch.export.passes.move_to_device_pass`, but it takes an
`ExportedProgram`; autopart's stage modules are plain GraphModules cut from
the unlifted program, so the same rewrite is done here on the graph itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree


def move_to_device(gm: torch.fx.GraphModule, device: torch.device | str, *,
                   move_state: bool = True) -> torch.fx.GraphModule:
    """Rewrite every device literal in `gm`'s graph to `device` and (with `move_state`) move its
    parameters, buffers and tensor constants there; returns `gm`, changed in place.

    Tensors on the meta device are left where they are (they hold no data to move:
    materialise them with `to_empty`).
    """
    device = torch.device(device)
    for graph_module in _graph_modules(gm):
        changed = False
        for node in graph_module.graph.nodes:
            if any(isinstance(leaf, torch.device) and leaf != device
                   for leaf in pytree.tree_leaves((node.args, node.kwargs))):
                node.args, node.kwargs = _retarget((node.args, node.kwargs), device)
                changed = True
        if changed:
            graph_module.recompile()
    if move_state and not _on_meta(gm):
        gm.to(device)
    return gm


def device_literals(gm: torch.fx.GraphModule) -> list[tuple[str, torch.device]]:
    """(node name, device) of every device literal left in the graph's arguments (nested graphs too)."""
    found = []
    for graph_module in _graph_modules(gm):
        for node in graph_module.graph.nodes:
            for leaf in pytree.tree_leaves((node.args, node.kwargs)):
                if isinstance(leaf, torch.device):
                    found.append((node.name, leaf))
    return found


def _graph_modules(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """`gm` and the GraphModules nested in it (the region bodies of passes/regions.py)."""
    return [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]


def _retarget(value: Any, device: torch.device) -> Any:
    def swap(leaf: Any) -> Any:
        return device if isinstance(leaf, torch.device) and leaf != device else leaf

    return pytree.tree_map(swap, value)


def _on_meta(gm: torch.fx.GraphModule) -> bool:
    return any(t.is_meta for t in [*gm.parameters(), *gm.buffers()])
