"""Cut a graph into pipeline stages with `torch.fx.passes.split_module`.

The policy comes in as an argument (the stage of every call node, from the
Plan); this pass only makes the graph cuttable the way a pipeline runs:

- stages talk to their neighbours only, so a value read k stages after the one
  that computes it (a skip connection, or a model input read late) is passed
  along by a relay node (`aten.alias`) in every stage in between;
- model inputs enter at stage 0 and model outputs leave from the last stage;
- a parameter read by several stages (tied embeddings) gets one `get_attr` per
  stage, so every stage owns a copy (codegen sums their gradients).

The result is split_module's GraphModule: submodules ``submod_0`` …
``submod_{S-1}`` called in order, each reading only model inputs or the
previous stage's outputs.
"""

from __future__ import annotations

import inspect
import operator
from typing import Mapping

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from autopart.core.errors import PlanError

RELAY = torch.ops.aten.alias.default
STAGE_OF_NODE_META_KEY = "autopart_stage_of_node"
SOURCE_META_KEY = "autopart_source_node"
RELAY_OF_META_KEY = "autopart_relay_of"
"""Node meta of a relay (and of the stage input it becomes): the name of the node whose value it carries,
under which per-node decisions (tp placements of its readers) name it."""


def split_stages(gm: torch.fx.GraphModule, stage_of_node: Mapping[str, int], num_stages: int) -> torch.fx.GraphModule:
    """A GraphModule calling `num_stages` stage submodules in order; `gm` is not modified."""
    work = _copy(gm)
    stage = _assign(work, stage_of_node, num_stages)
    _duplicate_shared_attrs(work, stage)
    _insert_relays(work, stage, num_stages)
    work.graph.lint()
    work.recompile()
    for node in work.graph.nodes:
        if node.op == "call_function":
            node.meta[STAGE_OF_NODE_META_KEY] = stage[node]
    if _HAS_TUPLE_RETURN:
        return split_module(work, gm, lambda node: stage[node], keep_original_order=True,
                            keep_original_node_name=True, tuple_return=True)
    split = split_module(work, gm, lambda node: stage[node], keep_original_order=True,
                         keep_original_node_name=True)
    _tuple_returns(split)
    return split


# torch 2.11's split_module has no tuple_return: a stage with one output returns it bare.
_HAS_TUPLE_RETURN = "tuple_return" in inspect.signature(split_module).parameters


def _tuple_returns(split: torch.fx.GraphModule) -> None:
    """Make every stage return a tuple, as tuple_return=True does on newer torch."""
    for call in [n for n in split.graph.nodes if n.op == "call_module" and n.target.startswith("submod_")]:
        sub: torch.fx.GraphModule = getattr(split, call.target)
        output = next(n for n in sub.graph.nodes if n.op == "output")
        if isinstance(output.args[0], (tuple, list)):
            continue
        output.args = ((output.args[0],),)
        sub.recompile()
        users = list(call.users)
        with split.graph.inserting_after(call):
            first = split.graph.call_function(operator.getitem, (call, 0))
        for user in users:
            user.replace_input_with(call, first)
    split.recompile()


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, values)
    graph.output(output)
    copied = torch.fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    return copied


def _assign(gm: torch.fx.GraphModule, stage_of_node: Mapping[str, int], num_stages: int) -> dict[torch.fx.Node, int]:
    stage: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.name not in stage_of_node:
            raise PlanError(
                f"the plan gives no stage for node {node.name} ({node.target}); the graph differs from "
                "the one planned: re-plan with the same model and input shapes"
            )
        s = stage_of_node[node.name]
        if not 0 <= s < num_stages:
            raise PlanError(f"node {node.name} is planned on stage {s}, outside 0..{num_stages - 1}")
        stage[node] = s
    for node in gm.graph.nodes:
        if node.op == "call_function":
            for arg in node.all_input_nodes:
                if arg.op == "call_function" and stage[arg] > stage[node]:
                    raise PlanError(
                        f"the plan runs {node.name} on stage {stage[node]} before its input {arg.name} "
                        f"on stage {stage[arg]}; stages must follow the data flow"
                    )
    return stage


def _duplicate_shared_attrs(gm: torch.fx.GraphModule, stage: dict[torch.fx.Node, int]) -> None:
    """One get_attr node per (attribute, stage) so each stage holds its own copy."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        by_stage: dict[int, list[torch.fx.Node]] = {}
        for user in node.users:
            by_stage.setdefault(stage.get(user, -1), []).append(user)
        for s, users in sorted(by_stage.items())[1:]:
            with graph.inserting_after(node):
                copy = graph.get_attr(node.target)
            copy.meta = dict(node.meta)
            copy.meta[SOURCE_META_KEY] = node.name  # codegen names the stage's copy like the original
            for user in users:
                user.replace_input_with(node, copy)


def _insert_relays(gm: torch.fx.GraphModule, stage: dict[torch.fx.Node, int], num_stages: int) -> None:
    graph = gm.graph
    # The model's outputs leave from the last stage: the output node reads as if it
    # were one stage further, so a value computed earlier is relayed through the last.
    after_last = num_stages
    for node in list(graph.nodes):
        if node.op not in ("placeholder", "call_function"):
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        home = stage[node] if node.op == "call_function" else -1  # inputs arrive before stage 0
        reads = [(stage[u] if u.op == "call_function" else after_last, u) for u in node.users
                 if u.op in ("call_function", "output")]
        farthest = max((s for s, _ in reads), default=home)
        if farthest <= home + 1:
            continue
        # relay[b]: the value as stage b holds it, for b in home+1 .. farthest-1
        relay: dict[int, torch.fx.Node] = {}
        source = node
        anchor = node if node.op == "call_function" else _last_placeholder(graph)
        for b in range(home + 1, farthest):
            with graph.inserting_after(anchor):
                source = graph.call_function(RELAY, (source,))
            source._rename(f"relay_{node.name}_s{b}")
            source.meta = {"val": node.meta["val"], "nn_module_stack": {}, RELAY_OF_META_KEY: node.name}
            stage[source] = b
            relay[b] = source
            anchor = source
        for s, user in reads:
            if s - 1 in relay:
                user.replace_input_with(node, relay[s - 1])


def _last_placeholder(graph: torch.fx.Graph) -> torch.fx.Node:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return placeholders[-1]
