"""Nest the blocks of a stage module into region submodules (recomputation, FSDP units).

A transform pass (GraphModule → GraphModule, policy as an argument): each
block the plan recomputes, or that must be an FSDP unit of its own (ZeRO-3,
HSDP), becomes one submodule call. Its nodes move into a parameter-less
`body` GraphModule, and the region calls it through
`autopart.core.recompute.run_region(body, mode, ...)`, so recomputation is PyTorch's
non-reentrant checkpoint around exactly the block's nodes.

Parameters keep their paths. When every tensor under one module path P of
the stage (e.g. ``blocks.3``) is read by this block alone, the region replaces
the container at P and holds those tensors at their own relative paths, so
``stage.get_parameter("blocks.3.mlp_fc.weight")`` still finds them (state
dicts, tensor-parallel slices and gradients keyed by path are untouched) and
`fully_shard(stage.get_submodule(P))` makes the block one FSDP unit. Other
tensors (tied weights, attributes at the stage's root) stay with the stage
and come in as arguments; such a region is registered as
``autopart_region_<k>`` and owns nothing.

Region membership: the plan's node names per block; nodes a later pass added
(tensor-parallel collectives, pipeline relays) join the block of the node
before them. Each maximal run of one block's nodes (in graph order, counting
only calls) is one region.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx

from autopart.core.errors import PlanError
from autopart.core.interfaces import REGION_META_KEY, RegionInfo
from autopart.passes.attrs import fetch_attr
from autopart.core.recompute import run_region
from autopart.core.modes import RECOMPUTE_MODES

_CALLS = ("call_function", "call_method", "call_module")


def nest_regions(gm: torch.fx.GraphModule, blocks: Sequence[tuple[str, Sequence[str], str]], *,
                 units: bool = False) -> torch.fx.GraphModule:
    """Rewrite `gm` in place so that every block to recompute (or, with `units`, every block)
    runs as one region submodule; returns `gm`.

    `blocks`: (block name, its node names, recompute mode) in stage order.
    """
    for name, _, mode in blocks:
        if mode not in RECOMPUTE_MODES:
            raise PlanError(f"block {name}: recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")
    if not units and all(mode == "none" for _, _, mode in blocks):
        return gm
    runs = _runs(gm, blocks)
    count = 0
    for index, nodes in runs:
        name, _, mode = blocks[index]
        if mode == "none" and not units:
            continue
        _extract(gm, nodes, name, mode, count, want_owner=units)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return gm


def _runs(gm: torch.fx.GraphModule, blocks: Sequence[tuple[str, Sequence[str], str]]
          ) -> list[tuple[int, list[torch.fx.Node]]]:
    """Maximal runs of calls of one block, in graph order."""
    label_of = {node: i for i, (_, names, _) in enumerate(blocks) for node in names}
    calls = [n for n in gm.graph.nodes if n.op in _CALLS]
    labels: list[int | None] = [label_of.get(n.name) for n in calls]
    first = next((label for label in labels if label is not None), None)
    if first is None:
        return []
    current = first
    for i, label in enumerate(labels):  # added nodes join the block before them
        if label is None:
            labels[i] = current
        else:
            current = label
    runs: list[tuple[int, list[torch.fx.Node]]] = []
    for node, label in zip(calls, labels):
        if runs and runs[-1][0] == label:
            runs[-1][1].append(node)
        else:
            runs.append((label, [node]))
    return runs


def _extract(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], block: str, mode: str, k: int,
             want_owner: bool) -> None:
    """Move `nodes` (a run) into a region submodule and call it in their place."""
    members = set(nodes)
    inputs: list[torch.fx.Node] = []
    attrs: list[torch.fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in members:
                continue
            target = attrs if arg.op == "get_attr" else inputs
            if arg not in target:
                target.append(arg)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    tensor_attrs = [a for a in attrs if isinstance(fetch_attr(gm, a.target), torch.Tensor)]
    module_attrs = [a for a in attrs if a not in tensor_attrs]
    owner = _owner_path(gm, members, tensor_attrs) if want_owner else None
    owned = [a for a in tensor_attrs if owner is not None and a.target.startswith(owner + ".")]
    passed = [a for a in tensor_attrs if a not in owned]

    body = _body(gm, nodes, inputs, tensor_attrs, module_attrs, outputs)
    region = _region(gm, body, inputs, tensor_attrs, owned, owner, mode)
    region.meta[REGION_META_KEY] = RegionInfo(block=block, recompute=mode, owns_parameters=owner is not None)
    path = owner if owner is not None else f"autopart_region_{k}"
    _install(gm, path, region)

    graph = gm.graph
    with graph.inserting_after(nodes[-1]):
        call = graph.call_module(path, tuple(inputs) + tuple(passed))
    call.meta["autopart_region"] = block
    results = {}
    anchor = call
    for i, out in enumerate(outputs):
        with graph.inserting_after(anchor):
            results[out] = anchor = graph.call_function(operator.getitem, (call, i))
        anchor.meta = dict(out.meta)
    for out, new in results.items():
        for user in list(out.users):
            if user not in members:
                user.replace_input_with(out, new)
    for node in reversed(nodes):
        graph.erase_node(node)
    for attr in owned:
        if not attr.users:
            graph.erase_node(attr)


def _owner_path(gm: torch.fx.GraphModule, members: set[torch.fx.Node],
                tensor_attrs: list[torch.fx.Node]) -> str | None:
    """The module path P whose every tensor only this run reads, covering the run's attributes
    that nothing else reads; None when there is none (tied weights, attributes at the root)."""
    readers: dict[str, set[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, set()).update(node.users)
    private = {a.target for a in tensor_attrs if readers.get(a.target, set()) <= members and "." in a.target}
    if not private:
        return None
    parts = [t.split(".")[:-1] for t in sorted(private)]
    prefix: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        prefix.append(level[0])
    if not prefix:
        return None
    path = ".".join(prefix)
    try:
        container = gm.get_submodule(path)
    except AttributeError:
        return None
    if any(isinstance(m, torch.fx.GraphModule) for m in container.modules()):
        return None  # a region (or a submodule graph) already lives under P
    below = [f"{path}.{name}" for name, _ in [*container.named_parameters(remove_duplicate=False),
                                                *container.named_buffers(remove_duplicate=False)]]
    if any(t not in private for t in below):
        return None  # something under P is read elsewhere, or not by this run
    if any(not (readers.get(t, set()) <= members) for t in readers if t.startswith(path + ".")):
        return None
    return path


def _body(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], inputs: list[torch.fx.Node],
          tensor_attrs: list[torch.fx.Node], module_attrs: list[torch.fx.Node],
          outputs: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """The block's nodes as a GraphModule that owns no tensor: inputs, then tensors, as arguments."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in [*inputs, *tensor_attrs]:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    root: dict[str, Any] = {}
    for node in module_attrs:
        env[node] = graph.get_attr(node.target)
        root[node.target] = fetch_attr(gm, node.target)
    for node in nodes:
        if node.op == "call_module":
            root[node.target] = gm.get_submodule(node.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    body = torch.fx.GraphModule(root, graph, class_name="RegionBody")
    return body


def _region(gm: torch.fx.GraphModule, body: torch.fx.GraphModule, inputs: list[torch.fx.Node],
            tensor_attrs: list[torch.fx.Node], owned: list[torch.fx.Node], owner: str | None,
            mode: str) -> torch.fx.GraphModule:
    """The submodule the stage calls: takes the inputs and the tensors it does not own (in that
    order), binds the tensors it owns, and runs the body as `mode` says."""
    graph = torch.fx.Graph()
    passed = [a for a in tensor_attrs if a not in owned]
    arguments = {node: graph.placeholder(node.name) for node in [*inputs, *passed]}
    root: dict[str, Any] = {"body": body}
    for node in owned:
        relative = node.target[len(owner) + 1:]
        root[relative] = fetch_attr(gm, node.target)
        arguments[node] = graph.get_attr(relative)
    ordered = [arguments[n] for n in [*inputs, *tensor_attrs]]  # the body's placeholders' order
    call = graph.call_function(run_region, (graph.get_attr("body"), mode, *ordered))
    graph.output(call)
    return torch.fx.GraphModule(root, graph, class_name="Region")


def _install(gm: torch.fx.GraphModule, path: str, region: torch.fx.GraphModule) -> None:
    """Register `region` at `path`, replacing the container of the tensors it now holds."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if leaf in parent._modules:
        parent._modules[leaf] = region
    else:
        parent.add_module(leaf, region)
