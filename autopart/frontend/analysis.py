"""What `autopart.compile` analyses: the whole model, or a copy with a few of its identical layers.

`analyse` traces and costs the model at one microbatch. When the model has a
stack of identical layers (passes/layer_stack.py) it traces a copy with three
of them instead, and `Analysis.restate` turns the copy's blocks (as analysed, or
as a tp group runs them) into the whole model's: trace, annotation and the tp
strategy problem then cost the same for 8 layers or 126. If the copy cannot
stand for the model (it fails to trace, or its blocks do not repeat layer by
layer), the whole model is analysed as before.

The whole model's graph is traced only when something needs it — rank modules,
a simulation, the distributed runner — (autopart/api.py, through
`ModelSource.planned_graph`), and the tp assignment restated on it
(passes/stack_assignment.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.fx

from autopart import passes
from autopart.core.batch import batch_size_of
from autopart.cost_models import Cluster
from autopart.core.errors import TraceError
from autopart.passes.layer_stack import LayerStack, find_layer_stack, shortened
from autopart.core.blocks import BlockGraph
from autopart.core.plan import QUIET_STRATEGIES
from autopart.passes.coarsen import _stack
from autopart.passes.tensor_parallel import TPAssignment
from autopart.passes.stack_blocks import StackExpansion
from autopart.frontend.source import annotate_graph
from autopart.frontend.tracing import trace


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """The traced, costed graph the planner works on, and how its blocks stand for the model's."""

    gm: torch.fx.GraphModule
    """The analysed graph: the whole model's, or the copy's with `stack.keep` layers."""
    blocks: BlockGraph
    """Blocks of `gm`."""
    stack: LayerStack | None = None
    """The identical layers analysed once (None: the whole model was traced)."""
    expansion: StackExpansion | None = None

    def restate(self, graph: BlockGraph) -> BlockGraph:
        """The whole model's blocks from blocks of `gm` (as traced, or restated for a tp group)."""
        return graph if self.expansion is None else self.expansion.apply(graph)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks.blocks) if self.expansion is None else self.expansion.num_blocks


def analyse(model: torch.nn.Module, args: tuple, kwargs: dict, cluster: Cluster,
            compute_dtype: torch.dtype | None, *, min_blocks: int = 1, reuse_layers: bool = True,
            pinned: Iterable[str] = (), phase: Callable[[str, str], None] | None = None,
            note: Callable[[str], None] | None = None, fused: bool = False) -> Analysis:
    """Trace and cost `model` at the example microbatch (`args`, `kwargs`); `phase(name, message)`
    is told when tracing and annotating start, `note(message)` what was analysed. `pinned` are
    the user's tp_plan patterns: one that names a single layer of the stack ('blocks.7.mlp_fc')
    cannot be restated from the copy, and the whole model is analysed."""
    phase = phase or (lambda name, message: None)
    log = note
    size = batch_size_of(torch.utils._pytree.tree_leaves((args, kwargs)))
    stack = find_layer_stack(model) if reuse_layers else None
    if stack is not None and any(_names_one_layer(pattern, stack) for pattern in pinned):
        _say(log, f"tp_plan names single layers of {stack.path}: tracing every layer")
        stack = None
    if stack is not None:
        try:
            alike = "identical" if not stack.kept else f"({stack.num_kinds} kinds of)"
            phase("trace", f"tracing {stack.keep} of the {stack.num_layers} {alike} layers at microbatch size "
                           f"{size}")
            copy = trace(shortened(model, stack), args, kwargs)
            phase("annotate", "annotating costs")
            gm = annotate_graph(copy, cluster, compute_dtype, fused)
        except TraceError as error:
            _say(log, f"the copy with {stack.keep} of {stack.num_layers} layers does not trace "
                      f"({str(error).splitlines()[0]}); tracing every layer")
        else:
            found = _stack_blocks(gm, cluster, stack, min_blocks) if _layers_called(gm, stack) else None
            if found is not None:
                blocks, expansion = found
                alike = "identical layers" if not stack.kept else f"layers of {stack.num_kinds} kinds"
                _say(log, f"{stack.num_layers} {alike} ({stack.path}): analysed {stack.keep}, restated for all")
                return Analysis(gm=gm, blocks=blocks, stack=stack, expansion=expansion)
            _say(log, f"the {stack.num_layers} layers of {stack.path} do not repeat block by block; "
                      "tracing every layer")
    phase("trace", f"tracing at microbatch size {size}")
    traced = trace(model, args, kwargs)
    phase("annotate", "annotating costs")
    gm = annotate_graph(traced, cluster, compute_dtype, fused)
    return Analysis(gm=gm, blocks=passes.coarsen(gm, cluster, min_blocks=min_blocks))


def _layers_called(gm: torch.fx.GraphModule, stack: LayerStack) -> bool:
    """Whether the model calls each kept layer as a module (its own forward). A model that reaches
    into its layers' parts instead (`self.layers[i].proj`, as its own code decides per layer)
    may treat identical layers differently: only the whole model says how."""
    called = {path for node in gm.graph.nodes if node.op == "call_function" for path in _stack(node)}
    return all(stack.kept_prefix(i) in called for i in range(stack.keep))


def _names_one_layer(pattern: str, stack: LayerStack) -> bool:
    head = re.escape(stack.layer_prefix(0)[:-1])
    return re.search(rf"(^|\.){head}\d+(\.|$)" if stack.path else r"^\d+(\.|$)", pattern) is not None


def _stack_blocks(gm: torch.fx.GraphModule, cluster: Cluster, stack: LayerStack,
                  min_blocks: int) -> tuple[BlockGraph, StackExpansion] | None:
    """Blocks of the copy at the coarsest module depth whose whole-model count reaches `min_blocks`
    (what `coarsen(min_blocks=...)` picks on the whole model), and their expansion."""
    max_depth = max((len(_stack(n)) for n in gm.graph.nodes if n.op == "call_function"), default=0)
    for depth in range(max_depth + 1):  # op-level blocks are named by node: they do not restate
        blocks = passes.coarsen(gm, cluster, depth=depth)
        expansion = StackExpansion.of(blocks, stack)
        if expansion is None:
            return None
        if expansion.num_blocks >= min_blocks:
            return blocks, expansion
    return None


def block_strategies(analysis: Analysis, assignment: TPAssignment) -> dict[str, dict[str, int]]:
    """Per whole-model block, how many of its ops each tp strategy splits (the report's summary
    while the whole model's graph, which the plan's per-node placements need, is not traced)."""
    analysed = [_counts(block.node_names, assignment) for block in analysis.blocks.blocks]
    if analysis.expansion is None:
        return {b.name: counts for b, counts in zip(analysis.blocks.blocks, analysed)}
    whole = analysis.restate(analysis.blocks)
    return {block.name: analysed[analysis.expansion.analysed_block(w)] for w, block in enumerate(whole.blocks)}


def _counts(node_names, assignment: TPAssignment) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in node_names:
        decision = assignment.nodes.get(name)
        if decision is not None and decision.strategy not in QUIET_STRATEGIES:
            counts[decision.strategy] = counts.get(decision.strategy, 0) + 1
    return counts


def _say(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)
