"""Apply a `ContextLayout` to a rank module: the graph every rank of a cp group runs.

`shard_context(gm, layout)` rewrites one stage's module (a tensor-parallel rank module, or the
stage itself at tp = 1) in place, finding the whole graph's decisions by node name (stages and
tp ranks keep the traced names; a stage's input relayed from an earlier one is `relay_<name>_s<k>`):

- token inputs (stage 0) pass through `ContextSlice`: the runtimes feed whole samples and each
  rank keeps its positions;
- each conversion becomes a call_module: `ContextSlice` right after the whole value (before any
  tensor-parallel collective on its way, so tp's sequence shards cut the local sequence, as they
  do every other activation), `ContextGather` right before the op that needs the whole value
  (after tp's collectives: what is gathered is the local sequence);
- shape arguments of views, reshapes and expands of split values name the local length;
- reductions over the sequence, losses and causal attention are rewritten (rules.py);
- the model's outputs leave the last stage whole (`ContextGather`), so every rank returns what
  the model returns and computes any loss on it; stage boundaries stay split;
- random ops on whole values draw from one stream every rank of the group holds alike
  (`CP_RANDOM_ATTR`); those on split values draw from the default generator, which differs per
  rank (runtime/distributed.py seeds it per replica), as Megatron's tracker does for shards.

Every rank's module has the same graph; its cp index lives in the ops (`localize`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import torch
import torch.fx

from autopart.core.context_chunks import (
    CONTEXT_PARALLEL_META_KEY, CP_RANDOM_ATTR, CP_RANDOM_SEED_OFFSET, ContextParallelInfo,
)
from autopart.core.errors import PlanError
from autopart.core.interfaces import TP_RANK_META_KEY, tp_rank_info
from autopart.core.tp_random import ShardedStream, draws_random, sharded_random
from autopart.passes.random_ops import route_through_stream
from autopart.passes.attrs import named_arguments
from autopart.passes.context_parallel.layout import ContextLayout
from autopart.passes.context_parallel.ops import (
    ContextAttention, ContextGather, ContextOp, ContextReduce, ContextSlice, context_ops,
)
from autopart.passes.context_parallel.rules import Conversion, SeqShard
from autopart.passes.tensor_parallel.collectives import TPCollective
from autopart.passes.tensor_parallel.rank_ops import ScaledBias
from autopart.passes.tensor_parallel.placements import Shard, parse_placement
from autopart.passes.tensor_parallel.shard import PLACEMENT_META_KEY

aten = torch.ops.aten
_RELAY = re.compile(r"relay_(.+)_s\d+$")
_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default,
          aten.expand.default}
_MEAN_TO_SUM = {aten.mean.dim: aten.sum.dim_IntList, aten.mean.default: aten.sum.default}


def class_loss_count(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """The denominator of a class loss's mean (NLL, cross entropy): the targets not ignored, each
    counted by its class weight (PyTorch's `total_weight`)."""
    counted = target != ignore_index
    if weight is None:
        return counted.sum().to(torch.float32)
    return (weight.index_select(0, target.masked_fill(~counted, 0).reshape(-1)).reshape(target.shape)
            * counted).sum().to(torch.float32)


def divide(total: torch.Tensor, count: Any) -> torch.Tensor:
    """A mean from its all-reduced sum and count."""
    return total / (count.to(total.dtype) if isinstance(count, torch.Tensor) else count)


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule, layout: ContextLayout, model_outputs: tuple[int, ...] | None) -> None:
        self.gm, self.layout, self.graph = gm, layout, gm.graph
        self.model_outputs = model_outputs
        self.layout_of: dict[torch.fx.Node, Any] = {}
        self.whole_vals: dict[torch.fx.Node, Any] = {}
        self.ops: list[str] = []
        self.slices: dict[tuple, torch.fx.Node] = {}
        self.gathers: dict[tuple, torch.fx.Node] = {}
        self.stands_for: dict[torch.fx.Node, str] = {}
        """Token inputs' local slices -> the input's name (what the layout's conversions call them)."""
        self.tp_ops: list[str] = []
        """Tensor-parallel collectives this pass adds (registered in the module's TPRankInfo)."""

    # ------------------------------------------------------------------ layouts in this module

    def _origin_name(self, node: torch.fx.Node) -> str:
        match = _RELAY.match(node.name) if node.op in ("placeholder", "call_function") else None
        return match.group(1) if match else node.name

    def _is_tp_op(self, node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), (TPCollective, ScaledBias))

    def _layout(self, node: torch.fx.Node) -> Any:
        if self._is_tp_op(node):   # tp collectives and the row-parallel bias keep the layout of their input
            return self.layout_of.get(node.args[0])
        name = self._origin_name(node)
        if name in self.layout.layouts:
            return self.layout.layouts[name]
        if node.op == "call_function" and node.target is aten.alias.default:   # a relay inside a stage
            return self.layout_of.get(node.args[0])
        return None

    def _chain(self, node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
        """The value `node` carries as the traced graph knows it, and the tp ops between (first first)."""
        chain = []
        while self._is_tp_op(node):
            chain.append(node)
            node = node.args[0]
        return node, chain[::-1]

    # ------------------------------------------------------------------ new nodes

    def _op(self, module: ContextOp, args: tuple, before: torch.fx.Node | None = None,
            after: torch.fx.Node | None = None, val: Any = None, layout: Any = None) -> torch.fx.Node:
        name = f"cp_op_{len(self.ops)}"
        self.gm.add_submodule(name, module)
        self.ops.append(name)
        context = self.graph.inserting_before(before) if before is not None else self.graph.inserting_after(after)
        with context:
            node = self.graph.call_module(name, args)
        node.meta = {"val": val} if val is not None else {}
        self.layout_of[node] = layout
        return node

    def _kwargs(self) -> dict:
        return dict(cp=self.layout.cp, sequence_length=self.layout.sequence_length)

    def _slice(self, origin: torch.fx.Node, conversion: Conversion) -> torch.fx.Node:
        key = (origin, conversion.dim, conversion.inner)
        if key not in self.slices:
            anchor = origin
            if origin.op == "placeholder":   # after every placeholder: a graph's inputs come first
                anchor = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            shard = SeqShard(conversion.dim, conversion.inner)
            self.slices[key] = self._op(ContextSlice(dim=conversion.dim, inner=conversion.inner, value=origin.name,
                                                     **self._kwargs()),
                                        (origin,), after=anchor, val=_local_val(origin.meta.get("val"), shard,
                                                                                self.layout.cp), layout=shard)
        return self.slices[key]

    def _slice_tp_split(self, origin: torch.fx.Node, conversion: Conversion) -> torch.fx.Node:
        """A whole value that tp splits along the sequence dim where it is made: gathered over tp,
        sliced to the local positions, split over tp again (new tp collectives of this rank)."""
        key = ("tp", origin, conversion.dim, conversion.inner)
        if key in self.slices:
            return self.slices[key]
        info = tp_rank_info(self.gm)
        place = parse_placement(str(origin.meta[PLACEMENT_META_KEY]))

        def tp_op(kind: str, x: torch.fx.Node, placement: str) -> torch.fx.Node:
            name = f"tp_comm_cp_{len(self.tp_ops)}"
            self.gm.add_submodule(name, TPCollective(kind, dim=place.dim, groups=place.groups, tp=info.tp,
                                                     rank=info.rank, value=origin.name))
            self.tp_ops.append(name)
            with self.graph.inserting_after(x):
                node = self.graph.call_module(name, (x,))
            node.meta = {PLACEMENT_META_KEY: placement}
            self.layout_of[node] = self.layout_of.get(x)
            return node

        gathered = tp_op("all_gather", origin, "R")
        local = self._slice(gathered, conversion)
        self.slices[key] = tp_op("slice", local, str(place))
        return self.slices[key]

    def _gather(self, value: torch.fx.Node, conversion: Conversion, before: torch.fx.Node) -> torch.fx.Node:
        key = (value, conversion.dim, conversion.inner)
        if key not in self.gathers:
            if _tp_split_on(value, conversion.dim):
                raise PlanError(f"{before.name} needs {value.name} whole along dim {conversion.dim}, which both "
                                "context and tensor parallelism split there; use sequence_parallel=False")
            self.gathers[key] = self._op(ContextGather(dim=conversion.dim, inner=conversion.inner, value=value.name,
                                                       **self._kwargs()),
                                         (value,), before=before, val=self.whole_vals.get(value), layout=None)
        return self.gathers[key]

    # ------------------------------------------------------------------ the pass

    def run(self) -> None:
        nodes = list(self.graph.nodes)
        for node in nodes:
            self.layout_of[node] = self._layout(node)
            self.whole_vals[node] = node.meta.get("val")
        for node in nodes:
            if node.op == "placeholder" and node.name in self.layout.tokens:
                local = self._slice(node, _as_conversion(self.layout.tokens[node.name]))
                node.replace_all_uses_with(local, delete_user_cb=lambda user: user is not local)
                self.stands_for[local] = node.name   # its readers' conversions name the input
            elif node.op == "call_function":
                self._convert_inputs(node)
                self._rewrite(node)
            elif node.op == "output" and self.model_outputs is not None:
                self._gather_outputs(node)
        self._route_whole_random()
        for node in self.graph.nodes:   # values as this rank holds them (a later stage's inputs)
            layout = self.layout_of.get(node)
            if node.name not in self.ops and layout is not None:
                node.meta["val"] = _local_val(node.meta.get("val"), layout, self.layout.cp)
        self.graph.lint()
        self.gm.recompile()
        if self.tp_ops:
            info = tp_rank_info(self.gm)
            self.gm.meta[TP_RANK_META_KEY] = dataclasses.replace(info, collectives=(*info.collectives, *self.tp_ops))
        self.gm.meta[CONTEXT_PARALLEL_META_KEY] = ContextParallelInfo(
            cp=self.layout.cp, sequence_length=self.layout.sequence_length, modules=tuple(self.ops))

    def _convert_inputs(self, node: torch.fx.Node) -> None:
        for arg in list(node.all_input_nodes):
            origin, chain = self._chain(arg)
            name = self.stands_for.get(origin) or self._origin_name(origin)
            conversion = self.layout.conversions.get((node.name, name))
            if conversion is None:
                continue
            if conversion.kind == "gather":
                node.replace_input_with(arg, self._gather(arg, conversion, before=node))
                continue
            # Slice where the value is whole along the dim on its tp rank too (tp's sequence shards
            # of a whole value are pieces of the whole sequence); tp ops after that point run again
            # on the local positions, so that they cut the local sequence as for every split value.
            points = [origin, *chain]
            whole = [i for i, p in enumerate(points) if not _tp_split_on(p, conversion.dim)]
            if whole:
                local, rest = self._slice(points[whole[0]], conversion), chain[whole[0]:]
            else:
                local, rest = self._slice_tp_split(origin, conversion), chain
            previous = local
            for tp_op in rest:
                with self.graph.inserting_before(node):
                    copy = self.graph.node_copy(tp_op, lambda a: previous if a is tp_op.args[0] else a)
                copy.meta = dict(tp_op.meta)
                self.layout_of[copy] = self.layout_of[local]
                previous = copy
            node.replace_input_with(arg, previous)
            for tp_op in reversed(chain):
                if not tp_op.users:
                    self.graph.erase_node(tp_op)

    def _rewrite(self, node: torch.fx.Node) -> None:
        if node.target is aten._assert_tensor_metadata.default and any(
                isinstance(self.layout_of.get(a), SeqShard) for a in node.all_input_nodes):
            self.graph.erase_node(node)   # trace-time sizes of a value now split
            return
        layout = self.layout_of.get(node)
        if node.target in _SIZED and isinstance(layout, SeqShard):
            shape = list(node.meta["val"].shape)
            shape[layout.dim] //= self.layout.cp
            node.args = (node.args[0], shape, *node.args[2:])
        rewrite = self.layout.rewrites.get(node.name)
        if rewrite is None:
            return
        if rewrite.kind == "causal_attention":
            self._causal_attention(node)
            return
        args = named_arguments(node) if isinstance(node.target, torch._ops.OpOverload) else {}
        count: Any = rewrite.count
        if node.target in _MEAN_TO_SUM:
            node.target = _MEAN_TO_SUM[node.target]
        elif "reduction" in args:
            if rewrite.kind == "class_mean":
                with self.graph.inserting_after(node):
                    count = self.graph.call_function(class_loss_count, (args["target"], args["weight"],
                                                                        args["ignore_index"]))
            _set_argument(node, "reduction", 2)
        anchor = count if isinstance(count, torch.fx.Node) else node
        total = self._op(ContextReduce(value=node.name, **self._kwargs()), (node,), after=anchor,
                         val=node.meta.get("val"))
        result = total
        if isinstance(count, torch.fx.Node):
            count = self._op(ContextReduce(value=f"{node.name} count", **self._kwargs()), (count,), after=total)
        if rewrite.kind != "sum":
            with self.graph.inserting_after(count if isinstance(count, torch.fx.Node) else total):
                result = self.graph.call_function(divide, (total, count))
            result.meta = {"val": node.meta.get("val")}
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user is not total)

    def _causal_attention(self, node: torch.fx.Node) -> None:
        if node.target is sharded_random:
            raise PlanError(f"{node.name}: causal attention with dropout on a tensor-parallel split is not supported "
                            "under context parallelism; set the attention dropout to 0")
        args = named_arguments(node)
        if args.get("attn_mask") is not None:
            raise PlanError(f"{node.name}: scaled_dot_product_attention with both attn_mask and is_causal")
        module = ContextAttention(scale=args.get("scale"), dropout_p=float(args.get("dropout_p") or 0.0),
                                  enable_gqa=bool(args.get("enable_gqa")), value=node.name, **self._kwargs())
        call = self._op(module, (args["query"], args["key"], args["value"]), before=node, val=node.meta.get("val"),
                        layout=self.layout_of.get(node))
        node.replace_all_uses_with(call)
        self.graph.erase_node(node)
        self.layout_of.pop(node, None)
        call.meta["val"] = _local_val(call.meta.get("val"), self.layout_of[call], self.layout.cp)

    def _gather_outputs(self, output: torch.fx.Node) -> None:
        values = list(output.args[0])
        for i in self.model_outputs:
            value = values[i]
            layout = self.layout_of.get(value) if isinstance(value, torch.fx.Node) else None
            if isinstance(layout, SeqShard):
                values[i] = self._gather(value, _as_conversion(layout), before=output)
        output.args = (tuple(values),)

    def _route_whole_random(self) -> None:
        nodes = [n for n in self.graph.nodes if n.op == "call_function"]
        whole = []
        for node in nodes:
            layout = self.layout_of.get(node)
            if node.target is sharded_random and not _holds_shard(layout):
                raise PlanError(f"{node.name}: a random op on a value split over tensor parallelism but whole over "
                                "context parallelism is not supported; drop the dropout or use tensor_parallel=1")
            if draws_random(node) and not _holds_shard(layout):
                whole.append(node)
        if not whole:
            return
        route_through_stream(self.gm, CP_RANDOM_ATTR, ShardedStream(torch.initial_seed() + CP_RANDOM_SEED_OFFSET),
                             whole)


def _tp_split_on(node: torch.fx.Node, dim: int) -> bool:
    """Whether tp splits `node`'s value along `dim` on this rank module."""
    place = parse_placement(str(node.meta.get(PLACEMENT_META_KEY, "R")))
    return isinstance(place, Shard) and place.dim == dim


def _holds_shard(layout: Any) -> bool:
    return isinstance(layout, SeqShard) or (isinstance(layout, tuple) and any(isinstance(x, SeqShard) for x in layout))


def _as_conversion(shard: SeqShard) -> Conversion:
    return Conversion("slice", shard.dim, shard.inner)


def _set_argument(node: torch.fx.Node, name: str, value: Any) -> None:
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _local_val(val: Any, layout: Any, cp: int) -> Any:
    """A (meta) value with its split dims cut to one rank's share."""
    if isinstance(val, (tuple, list)):
        layouts = layout if isinstance(layout, tuple) else (layout,) * len(val)
        return type(val)(_local_val(v, s, cp) for v, s in zip(val, layouts))
    if not isinstance(val, torch.Tensor) or not isinstance(layout, SeqShard):
        return val
    shape = list(val.shape)
    shape[layout.dim] //= cp
    return torch.empty(shape, dtype=val.dtype, device="meta")


def shard_context(gm: torch.fx.GraphModule, layout: ContextLayout, *,
                  model_outputs: tuple[int, ...] | None = None) -> torch.fx.GraphModule:
    """Rewrite `gm` (one stage's rank module) in place for `layout`'s cp group; `model_outputs`: the
    last stage's output positions that are the model's (gathered whole). Returns `gm`."""
    _Rewriter(gm, layout, model_outputs).run()
    return gm


def warn_mixing(layout: ContextLayout) -> None:
    """Say which ops read the whole sequence (their split inputs gathered: correct, not split)."""
    if layout.mixing:
        names = ", ".join(layout.mixing[:6]) + (f" and {len(layout.mixing) - 6} more" if len(layout.mixing) > 6 else "")
        warnings.warn(f"context_parallel={layout.cp}: {len(layout.mixing)} op(s) mix positions along the sequence "
                      f"and run on the whole sequence on every rank (their inputs all-gathered): {names}",
                      stacklevel=3)


def localize(gm: torch.nn.Module, cp_rank: int) -> None:
    """Give every context-parallel op of `gm` (its regions' too) this rank's index in its cp group."""
    for op in context_ops(gm):
        op.cp_rank = cp_rank
    info = getattr(gm, "meta", {}).get(CONTEXT_PARALLEL_META_KEY)
    if info is not None:
        gm.meta[CONTEXT_PARALLEL_META_KEY] = dataclasses.replace(info, cp_rank=cp_rank)


def attach_context_group(gm: torch.nn.Module, group) -> None:
    """Make every context-parallel op of `gm` talk over `group` (its cp group, in chunk order)."""
    import torch.distributed as dist

    for op in context_ops(gm):
        if op.communicates and dist.get_world_size(group) != op.cp:
            raise ValueError(f"process group has {dist.get_world_size(group)} ranks but {op.value} was split for "
                             f"cp={op.cp}")
        op.process_group = group
