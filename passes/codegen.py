"""One GraphModule per rank from the split graph.

Each stage submodule of `split_stages` becomes a self-contained GraphModule:
it owns copies of its parameters and buffers (registered under their original
names, e.g. ``model.layers.3.mlp.up_proj.weight``), takes as placeholders the
model inputs (stage 0) or the previous stage's outputs, and returns a flat
tuple. Its `StageInterface` (autopart/interfaces.py, in
``gm.meta["autopart_stage_interface"]``) says where each input comes from,
which model outputs it returns, and which original parameter each of its
attributes copies, so runtimes can route tensors and sum gradients of a
parameter held by several stages.
"""

from __future__ import annotations

import operator
from typing import Mapping

import torch
import torch.fx

from autopart.core.errors import PlanError
from autopart.core.interfaces import STAGE_INTERFACE_META_KEY, InputSource, StageInterface
from autopart.passes.attrs import fetch_attr
from autopart.passes.split import SOURCE_META_KEY


def stage_modules(
    split: torch.fx.GraphModule, canonical_name: Mapping[str, str] | None = None
) -> list[torch.fx.GraphModule]:
    """Self-contained stage GraphModules, stage 0 first.

    `canonical_name` maps an attribute path to the name the user's model reports
    for that parameter (tied weights have several paths, one name).
    """
    canonical_name = dict(canonical_name or {})
    top = split.graph
    calls = [n for n in top.nodes if n.op == "call_module" and n.target.startswith("submod_")]
    num_stages = len(calls)
    placeholders = [n for n in top.nodes if n.op == "placeholder"]
    produced: dict[torch.fx.Node, tuple[int, int]] = {}  # getitem node -> (stage, output index)
    for stage, call in enumerate(calls):
        for user in call.users:
            if user.op == "call_function" and user.target is operator.getitem:
                produced[user] = (stage, user.args[1])

    output = next(n for n in top.nodes if n.op == "output")
    modules = []
    for stage, call in enumerate(calls):
        sub: torch.fx.GraphModule = getattr(split, call.target)
        sources, owned = _classify_inputs(split, call, stage, placeholders, produced)
        module, params, buffers = _own_attributes(split, sub, owned, canonical_name)
        output_names = tuple(_output_names(sub))
        model_outputs: tuple[int, ...] = ()
        if stage == num_stages - 1:
            model_outputs = _model_outputs(output, produced, stage)
        module.meta[STAGE_INTERFACE_META_KEY] = StageInterface(
            stage=stage, num_stages=num_stages, inputs=tuple(sources), output_names=output_names,
            model_outputs=model_outputs, parameters=params, buffers=buffers,
        )
        modules.append(module)
    return modules


def _classify_inputs(split, call, stage, placeholders, produced):
    """InputSource per data input of the stage call, and {placeholder position: attr target} for attributes."""
    sources: list[InputSource] = []
    owned: dict[int, str] = {}
    for position, arg in enumerate(call.args):
        if arg.op == "get_attr":
            owned[position] = arg.target
        elif arg.op == "placeholder":
            if stage != 0 and isinstance(arg.meta.get("val"), torch.Tensor):
                raise PlanError(f"stage {stage} reads model input {arg.name} directly; run passes.split first")
            sources.append(InputSource(kind="model_input", index=placeholders.index(arg)))
        elif arg in produced:
            from_stage, index = produced[arg]
            if from_stage != stage - 1:
                raise PlanError(f"stage {stage} reads stage {from_stage}'s output; run passes.split first")
            sources.append(InputSource(kind="previous_stage", index=index))
        else:
            raise PlanError(f"stage {stage} input {arg.name} ({arg.op}) has no known source")
    return sources, owned


def _own_attributes(split: torch.fx.GraphModule, sub: torch.fx.GraphModule, owned: dict[int, str],
                    canonical_name: Mapping[str, str]):
    """Turn attribute placeholders into get_attr of cloned tensors owned by the stage.

    split_module passes tensor attributes into a submodule as inputs; a stage
    of a pipeline must own them instead.
    """
    graph = sub.graph
    root = torch.nn.Module()
    params: list[tuple[str, str]] = []
    buffers: list[tuple[str, str]] = []
    sub_placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for position, placeholder in enumerate(sub_placeholders):
        if position not in owned:
            continue
        target = owned[position]
        copy = _clone(fetch_attr(split, target))
        _set_nested(root, target, copy)
        name = canonical_name.get(target, target)
        (params if isinstance(copy, torch.nn.Parameter) else buffers).append((target, name))
        # The placeholder becomes the get_attr: same node, same users, and (below) the
        # whole graph's node name, so per-node decisions (tp placements) still apply.
        placeholder.op, placeholder.target = "get_attr", target
        source = placeholder.meta.get(SOURCE_META_KEY)
        if source is not None and source != placeholder.name:
            placeholder._rename(source)
    # attributes split_module already reads with get_attr (submodules, constants)
    for node in graph.nodes:
        if node.op == "get_attr" and not _has_nested(root, node.target):
            _set_nested(root, node.target, _clone(fetch_attr(sub, node.target)))
    module = torch.fx.GraphModule(root, graph, class_name=f"Stage{type(sub).__name__}")
    module.meta.update(sub.meta)
    return module, tuple(params), tuple(buffers)


def _has_nested(module: torch.nn.Module, target: str) -> bool:
    try:
        fetch_attr(module, target)
        return True
    except AttributeError:
        return False


def _set_nested(root: torch.nn.Module, target: str, value) -> None:
    *path, leaf = target.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        module.register_buffer(leaf, value)
    else:
        setattr(module, leaf, value)


def _clone(value):
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def _output_names(sub: torch.fx.GraphModule) -> list[str]:
    output = next(n for n in sub.graph.nodes if n.op == "output")
    values = output.args[0]
    return [v.name if isinstance(v, torch.fx.Node) else repr(v) for v in values]


def _model_outputs(output: torch.fx.Node, produced, last: int) -> tuple[int, ...]:
    indices = []
    for value in output.args[0]:
        if value not in produced or produced[value][0] != last:
            raise PlanError(f"model output {value} does not come from the last stage; run passes.split first")
        indices.append(produced[value][1])
    return tuple(indices)
