"""Apply a TPAssignment: one GraphModule per tensor-parallel rank, collectives as graph nodes.

Each rank module
- takes the same flat inputs as the traced graph and returns the same flat,
  replicated outputs;
- holds only its slices of the parameters (cloned, registered under the
  original names), listed with their slice in ``gm.meta["autopart_tp_rank"]``
  (a `TPRankInfo`, autopart/interfaces.py) so gradients can be reassembled;
- runs each op on local shards, with shape arguments (view, reshape, expand,
  split sizes) made local, vocabulary-parallel embeddings and row-parallel
  biases rewritten (rank_ops.py; the bias as a `ScaledBias` call_module ``tp_bias_<k>``);
- converts placements where a reader needs another one with `TPCollective`
  call_module nodes named ``tp_comm_<k>``: slice, all_gather, all_reduce,
  reduce_scatter, and Megatron's f (grad_all_reduce) once per value that
  rank-dependent work reads replicated; a Shard value that such work reads
  replicated (sequence parallelism's gather before a column-parallel linear)
  gets one `seq_all_gather` instead: all-gather forward, reduce-scatter backward.

A value that a pipeline relays through a stage (passes/split.py: a skip read two or more stages
after it is made) arrives whole under the relay's name; its readers' decisions name the original
value, so the relay is looked up under that name (`_planned_name`) and resharded as they ask.

All ranks' graphs have the same nodes in the same order (only parameter values
and rank numbers differ), which the one-process simulation relies on.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from autopart.core.errors import PlanError
from autopart.core.interfaces import TP_RANK_META_KEY, ParamSlice, TPRankInfo, take_shard
from autopart.passes.attrs import fetch_attr, is_parameter
from autopart.passes.node_costs import COST_META_KEY
from autopart.passes.split import RELAY_OF_META_KEY
from autopart.passes.tensor_parallel.assignment import TPAssignment
from autopart.passes.tensor_parallel.collectives import TPCollective
from autopart.passes.tensor_parallel.placements import P, Placement, R, Replicate, Shard, local_shape
from autopart.passes.tensor_parallel.rank_ops import ScaledBias, vocab_parallel_embedding

aten = torch.ops.aten
_MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default, aten.bmm.default}
PLACEMENT_META_KEY = "autopart_tp_placement"
"""Node meta of a rank module: the placement ('R', 'S(1)', 'P') of the node's value."""


def shard_stages(stages: Sequence[torch.fx.GraphModule],
                 assignment: TPAssignment | None) -> list[list[torch.fx.GraphModule]]:
    """Every stage's tensor-parallel rank modules, [stage][tp rank]; each stage alone when there is
    no assignment (tp = 1)."""
    if assignment is None:
        return [[stage] for stage in stages]
    return [shard_graph(stage, assignment, assignment.tp) for stage in stages]


def shard_graph(gm: torch.fx.GraphModule, assignment: TPAssignment, tp: int) -> list[torch.fx.GraphModule]:
    """One GraphModule per rank 0..tp−1 that together compute what `gm` computes."""
    if assignment.tp != tp:
        raise PlanError(f"assignment was made for tp={assignment.tp}, asked to shard for tp={tp}")
    return [_RankBuilder(gm, assignment, tp, rank).build() for rank in range(tp)]


class _RankBuilder:
    def __init__(self, gm: torch.fx.GraphModule, assignment: TPAssignment, tp: int, rank: int) -> None:
        self.gm, self.a, self.tp, self.rank = gm, assignment, tp, rank
        self.graph = torch.fx.Graph()
        self.root: dict[str, Any] = {}
        self.local: dict[str, torch.fx.Node] = {}
        self.cache: dict[tuple[str, str], torch.fx.Node] = {}
        self.params: list[ParamSlice] = []
        self.collectives: list[str] = []
        self.num_biases = 0

    def build(self) -> torch.fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
                new.meta = dict(node.meta)
            elif node.op == "get_attr":
                new = self._attr(node)
            elif node.op == "call_function":
                new = self._call(node)
            elif node.op == "output":
                outs = torch.fx.map_arg(node.args[0], lambda a: self._fetch(a, R, sync=False))
                self.graph.output(outs)
                continue
            else:
                raise PlanError(f"node {node.name}: op {node.op} is not supported by tensor-parallel sharding")
            self.local[node.name] = new
        self.graph.lint()
        module = torch.fx.GraphModule(self.root, self.graph, class_name=f"TPRank{self.rank}")
        module.meta[TP_RANK_META_KEY] = TPRankInfo(rank=self.rank, tp=self.tp, params=tuple(self.params),
                                                   collectives=tuple(self.collectives))
        for key, value in self.gm.meta.items():
            module.meta.setdefault(key, value)
        return module

    # ------------------------------------------------------------------ values

    def placement(self, node: torch.fx.Node) -> Placement:
        # Inputs arrive whole: model inputs are, and a pipeline stage's outputs are made
        # Replicate by the output rule below, whatever the value's placement inside the graph.
        # A relay inside a stage aliases such an input, so it is whole too.
        if node.op == "placeholder" or _is_relay(node):
            return R
        return self.a.output_placement(node.name)

    def _attr(self, node: torch.fx.Node) -> torch.fx.Node:
        value = self.gm.get_parameter(node.target) if is_parameter(self.gm, node.target) else fetch_attr(self.gm, node.target)
        place = self.placement(node)
        if isinstance(value, torch.Tensor):
            data = value.detach()
            if isinstance(place, Shard):
                data = take_shard(data, place.dim, place.groups, self.tp, self.rank)
            data = data.clone()
            if isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(data, requires_grad=value.requires_grad)
                self.params.append(ParamSlice(
                    name=node.target, dim=place.dim if isinstance(place, Shard) else None,
                    groups=place.groups if isinstance(place, Shard) else 1,
                    index=self.rank if isinstance(place, Shard) else 0, tp=self.tp))
            else:
                value = data
        self.root[node.target] = value
        new = self.graph.get_attr(node.target)
        new.meta = self._meta(node, place)
        return new

    def _meta(self, node: torch.fx.Node, place: Placement) -> dict[str, Any]:
        meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", COST_META_KEY)}
        val = node.meta.get("val")
        local = lambda v: torch.empty(local_shape(tuple(v.shape), place, self.tp), dtype=v.dtype, device="meta")  # noqa: E731
        if isinstance(val, torch.Tensor):
            meta["val"] = local(val)
        elif isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
            meta["val"] = type(val)(local(v) for v in val)
        meta[PLACEMENT_META_KEY] = str(place)
        return meta

    def _only_matmuls_read(self, node: torch.fx.Node) -> bool:
        """Whether every op that reads `node` replicated with f (what seq_all_gather feeds) is a matmul."""
        readers = [u for u in node.users if u.name in self.a.nodes and node.name in self.a.nodes[u.name].grad_sync]
        return bool(readers) and all(u.target in _MATMULS for u in readers)

    def _comm(self, kind: str, x: torch.fx.Node, place: Placement, like: torch.fx.Node,
              dim: int = 0, groups: int = 1, to_compute_dtype: bool = False) -> torch.fx.Node:
        name = f"tp_comm_{len(self.collectives)}"
        self.collectives.append(name)
        self.root[name] = TPCollective(kind, dim=dim, groups=groups, tp=self.tp, rank=self.rank,
                                       value=like.name, to_compute_dtype=to_compute_dtype)
        new = self.graph.call_module(name, (x,))
        new.meta = self._meta(like, place)
        return new

    def _fetch(self, node: torch.fx.Node, want: Placement, sync: bool) -> torch.fx.Node:
        """`node`'s local value in placement `want` (inserting collectives), f-wrapped if `sync`."""
        if node.name not in self.a.nodes and not _is_relay(node):   # not a tensor value (or not placed): use as is
            return self.local[node.name]
        key = (node.name, str(want) + ("+f" if sync else ""))
        if key in self.cache:
            return self.cache[key]
        src = self.placement(node)
        if sync and isinstance(src, Shard) and want == R and node.op == "call_function":
            # Megatron-SP: gather a sequence shard for split work; the gradient's addends are
            # reduce-scattered back to shards in one collective (not f's all-reduce, then a slice)
            cur = self._comm("seq_all_gather", self.local[node.name], R, node, src.dim, src.groups,
                             to_compute_dtype=self._only_matmuls_read(node))
            self.cache[key] = cur
            return cur
        cur = self.local[node.name] if src == want else self.cache.get((node.name, str(want)))
        if cur is None:
            cur = self._reshard(node, src, want)
            self.cache[(node.name, str(want))] = cur
        if sync:
            cur = self._comm("grad_all_reduce", cur, want, node)
        self.cache[key] = cur
        return cur

    def _reshard(self, node: torch.fx.Node, src: Placement, want: Placement) -> torch.fx.Node:
        x = self.local[node.name]
        if want == P:
            raise PlanError(f"value {node.name} cannot become Partial from {src}")
        if isinstance(src, Replicate):
            return self._comm("slice", x, want, node, want.dim, want.groups)
        if src == P:
            if want == R:
                return self._comm("all_reduce", x, R, node)
            return self._comm("reduce_scatter", x, want, node, want.dim, want.groups)
        gathered = self._comm("all_gather", x, R, node, src.dim, src.groups)
        if want == R:
            return gathered
        return self._comm("slice", gathered, want, node, want.dim, want.groups)

    # ------------------------------------------------------------------ ops

    def _call(self, node: torch.fx.Node) -> torch.fx.Node:
        decision = self.a.nodes.get(node.name)
        if decision is None:   # e.g. _assert_tensor_metadata: runs on the local values as they are
            args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda a: self.local[a.name])
            new = self.graph.create_node("call_function", node.target, args, kwargs, name=node.name)
            new.meta = {k: v for k, v in node.meta.items() if k != "val"}
            return new
        sync = set(decision.grad_sync)

        def arg(a: torch.fx.Node) -> torch.fx.Node:
            want = decision.input_placement(_planned_name(a))
            return self._fetch(a, want if want is not None else self.placement(a), sync=_planned_name(a) in sync)

        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), arg)
        target, args = self._localize(node, decision, list(args), kwargs)
        new = self.graph.create_node("call_function", target, tuple(args), kwargs, name=node.name)  # plan's names
        new.meta = self._meta(node, decision.output)
        if decision.scaled_bias is not None:
            bias = self._fetch(_arg_node(node, decision.scaled_bias), R, sync=False)
            name = f"tp_bias_{self.num_biases}"
            self.num_biases += 1
            self.root[name] = ScaledBias(self.tp)
            out = self.graph.call_module(name, (new, bias))
            out.meta = self._meta(node, decision.output)
            return out
        return new

    def _localize(self, node: torch.fx.Node, decision, args: list, kwargs: dict) -> tuple[Any, list]:
        t, tp, out = node.target, self.tp, decision.output
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
            args[1] = list(local_shape(tuple(node.meta["val"].shape), out, tp))
        elif t in (aten.split.Tensor, aten.split_with_sizes.default):
            src = decision.input_placement(_planned_name(node.args[0]))
            nd = node.args[0].meta["val"].dim()
            d = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % nd
            if isinstance(src, Shard) and src.dim == d:
                args[1] = args[1] // tp if isinstance(args[1], int) else [s // tp for s in args[1]]
        elif t == aten.embedding.default and decision.strategy == "vocab":
            rows = node.args[0].meta["val"].shape[0] // tp
            pad = args[2] if len(args) > 2 else -1
            return vocab_parallel_embedding, [args[0], args[1], self.rank * rows, pad]
        if decision.scaled_bias is not None:
            if t == aten.linear.default:
                return aten.linear.default, args[:2]
            if t == aten.addmm.default:
                return aten.mm.default, args[1:3]
            raise PlanError(f"node {node.name}: no scaled-bias form of {t}")
        return t, args


def _arg_node(node: torch.fx.Node, name: str) -> torch.fx.Node:
    return next(a for a in node.all_input_nodes if _planned_name(a) == name)


def _is_relay(node: torch.fx.Node) -> bool:
    """Whether `node` carries another node's value across a pipeline stage (passes/split.py)."""
    return RELAY_OF_META_KEY in node.meta


def _planned_name(node: torch.fx.Node) -> str:
    """The name the tensor-parallel decisions give `node`'s value: a relay's is its original's."""
    return node.meta.get(RELAY_OF_META_KEY, node.name)
