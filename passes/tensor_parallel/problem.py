"""The strategy problem: every op's sharding strategies on one tensor-parallel axis, priced, as arrays.

`graph_strategies` lists, per node, the strategies of op_rules.py (placements
of inputs and output); `build_tp_problem` prices them and turns the graph into
the plain arrays of `autopart.core.problems.TPProblem`, which the driver has the
solver answer (`autopart.solver.solve_tp`); `assignment_from_solution` reads
the answer back as a `TPAssignment`, which shard.py applies.

Costs (seconds; one tp group on `cluster`'s devices 0..tp−1, bound by
`Cluster.link_for_group`):
- compute: the node's roofline time (passes/node_costs.py, forward + backward
  when training) on device 0; a split op keeps the launch floor and does
  `compute_fraction` of the rest: floor + (t − floor)·fraction;
- resharding on an edge (cost_models/comm.py, ring algorithms, n = the full
  tensor's bytes): Partial→Replicate all-reduce 2(t−1)α + 2(t−1)/t·n/β;
  Shard→Replicate all-gather (t−1)α + (t−1)/t·n/β (backward: a local slice);
  Partial→Shard reduce-scatter (backward: all-gather); Replicate→Shard a local
  slice (backward: all-gather of the gradient); Shard→other Shard both
  gathers; nothing becomes Partial;
- Megatron's f: a Replicate value read by rank-dependent work gets one
  backward all-reduce of its gradient, shared by all such readers; when the
  value is gathered from a Shard (sequence parallelism), a reduce-scatter
  instead (collectives.py's `seq_all_gather`);
- memory: each device holds parameter bytes / tp of a sharded parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np
import torch
import torch.fx

from autopart.cost_models import Cluster, Link, all_gather_seconds, all_reduce_seconds, reduce_scatter_seconds
from autopart.core.errors import InputError
from autopart.passes.node_costs import fixed_seconds, node_cost, priced_seconds
from autopart.passes.attrs import is_parameter
from autopart.passes.coarsen import coarsen
from autopart.passes.tensor_parallel.assignment import Collective, NodePlacement, TPAssignment
from autopart.passes.tensor_parallel.op_rules import op_strategies
from autopart.passes.tensor_parallel.placements import P, Placement, R, Replicate, Shard, can_shard, parse_placement
from autopart.passes.tensor_parallel.sequence import sequence_shard
from autopart.passes.tensor_parallel.strategy import Strategy, replicate, shape_of
from autopart.core.problems import SharedCost, TPProblem, TPSolution

INF = float("inf")


@dataclass(frozen=True, kw_only=True)
class GraphStrategies:
    """Strategies of every tensor-valued node of a graph on an axis of `tp` ranks."""

    tp: int
    strategies: dict[str, tuple[Strategy, ...]]
    """Node name → its strategies (index 0 is always the replicated one where it exists)."""
    num_bytes: dict[str, int]
    """Node name → bytes of its (full) value; 0 for lists and tuples."""
    needs_grad: dict[str, bool]
    """Node name → whether a gradient flows into the value in training."""


def _value_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes whose value is a tensor or a list/tuple of tensors: the ones that get a placement."""
    keep = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "output":
            continue
        if isinstance(val, torch.Tensor) or (
            isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val)
        ):
            keep.append(node)
    return keep


def split_groups(gm: torch.fx.GraphModule) -> set[int]:
    """Chunk counts a fused output may be sharded in: 1, and the section count of every even split."""
    groups = {1}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (
            torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default
        ) and isinstance(node.meta.get("val"), (list, tuple)):
            sizes = {tuple(v.shape) for v in node.meta["val"]}
            if len(sizes) == 1 and len(node.meta["val"]) > 1:
                groups.add(len(node.meta["val"]))
    return groups


def _param_strategies(node: torch.fx.Node, gm: torch.fx.GraphModule, tp: int, groups: set[int]) -> list[Strategy]:
    """A parameter is held whole or split on any dim that divides; buffers and constants stay whole."""
    out = [Strategy(name="param", output=R, inputs=())]
    shape = shape_of(node.meta["val"])
    if tp > 1 and is_parameter(gm, node.target):
        for d in range(len(shape)):
            for g in sorted(groups):
                if can_shard(shape, d, g, tp):
                    out.append(Strategy(name="param", output=Shard(d, g), inputs=()))
    return out


def graph_strategies(gm: torch.fx.GraphModule, tp: int,
                     fixed: Mapping[str, Placement | str | frozenset] | None = None,
                     sequence_parallel: bool = False) -> GraphStrategies:
    """Strategies of every tensor-valued node.

    `fixed` pins a node's output placement (keyed by node name, or by parameter
    name for get_attr nodes), e.g. ``{"blocks.0.mlp_fc.weight": "S(0)"}``, or
    limits it to a frozenset of placements (Replicate where the op offers none of them). `sequence_parallel` lets elementwise
    ops and norms run on sequence shards (sequence.py).
    """
    if tp < 1:
        raise InputError(f"tp={tp}: the tensor-parallel axis needs at least one rank")
    fixed = {k: (v if isinstance(v, frozenset) else parse_placement(v)) for k, v in (fixed or {}).items()}
    known = {n.name for n in gm.graph.nodes} | {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    unknown = sorted(set(fixed) - known)
    if unknown:
        raise InputError(f"fixed placements name {unknown[:5]}, which are neither nodes nor parameters of the "
                         "graph; key them by node name (e.g. 'linear_3') or parameter name (e.g. 'fc.weight')")
    groups = split_groups(gm)
    strategies: dict[str, tuple[Strategy, ...]] = {}
    needs_grad: dict[str, bool] = {}
    cands = lambda n: list(dict.fromkeys(s.output for s in strategies.get(n.name, ())))  # noqa: E731
    for node in _value_nodes(gm):
        if node.op == "placeholder":
            options = [Strategy(name="input", output=R, inputs=())]
            needs_grad[node.name] = False
        elif node.op == "get_attr":
            options = _param_strategies(node, gm, tp, groups)
            needs_grad[node.name] = is_parameter(gm, node.target) and gm.get_parameter(node.target).requires_grad
        else:
            options = op_strategies(node, tp, groups, cands, sequence_parallel) if tp > 1 else [replicate(node)]
            float_out = any(getattr(v, "dtype", torch.int64).is_floating_point
                            for v in (node.meta["val"] if isinstance(node.meta["val"], (list, tuple))
                                      else [node.meta["val"]]))
            needs_grad[node.name] = float_out and any(needs_grad.get(a.name, False) for a in node.all_input_nodes)
        pin = fixed.get(node.name) or (fixed.get(node.target) if node.op == "get_attr" else None)
        if pin is not None:
            allowed = pin if isinstance(pin, frozenset) else {pin}
            options = [s for s in options if s.output in allowed] or (
                [s for s in options if s.output == R] if isinstance(pin, frozenset) else [])
            if not options:
                raise InputError(f"fixed placement {pin} for node {node.name} ({node.target}): no strategy of the "
                                 f"op gives it on tp={tp}; check the dim and that its size divides by tp")
        strategies[node.name] = tuple(options)
    num_bytes = {}
    for node in _value_nodes(gm):
        val = node.meta["val"]
        num_bytes[node.name] = val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0
    return GraphStrategies(tp=tp, strategies=strategies, num_bytes=num_bytes, needs_grad=needs_grad)


# ----------------------------------------------------------------------------- costs


def reshard_steps(src: Placement, dst: Placement) -> list[tuple[str, str]] | None:
    """Collectives turning `src` into `dst`, as (kind, phase) pairs; None if impossible.

    Kinds: 'all_reduce', 'all_gather', 'reduce_scatter'; phases 'forward'/'backward'
    (backward steps happen only when a gradient flows)."""
    if src == dst:
        return []
    if dst == P:
        return None
    if isinstance(src, Replicate):
        return [("all_gather", "backward")]                    # slice; gradient all-gathered
    if isinstance(src, Shard) and dst == R:
        return [("all_gather", "forward")]                     # gradient: a local slice
    if src == P and dst == R:
        return [("all_reduce", "forward")]                     # Megatron's g
    if src == P and isinstance(dst, Shard):
        return [("reduce_scatter", "forward"), ("all_gather", "backward")]
    return [("all_gather", "forward"), ("all_gather", "backward")]  # Shard → other Shard via Replicate


def collective_seconds(kind: str, num_bytes: int, tp: int, link: Link) -> float:
    """α–β time of one collective over `tp` ranks (cost_models.comm; n = full buffer bytes)."""
    fn = {"all_reduce": all_reduce_seconds, "grad_all_reduce": all_reduce_seconds,
          "all_gather": all_gather_seconds, "reduce_scatter": reduce_scatter_seconds}[kind]
    return fn(num_bytes, tp, link)


@dataclass(frozen=True)
class _Pricing:
    """Prices collectives on the tp group's link (forward, and backward when training)."""

    tp: int
    link: Link
    training: bool

    def reshard(self, src: Placement, dst: Placement, num_bytes: int, grad: bool, is_list: bool) -> float:
        if src == dst:
            return 0.0
        steps = None if is_list else reshard_steps(src, dst)
        if steps is None:
            return INF
        return sum(collective_seconds(kind, num_bytes, self.tp, self.link) for kind, phase in steps
                   if phase == "forward" or (grad and self.training))


def _compute_seconds(node: torch.fx.Node, device: str, floor: float, fraction: float, training: bool,
                     eager: bool = False) -> float:
    """Roofline seconds (forward + backward; with `eager` op by op) of a node doing `fraction` of its
    work; its launches (`fixed_seconds`: the floor, or its share of a fused kernel's) stay."""
    cost = node_cost(node)
    fixed = fixed_seconds(cost, device, floor, eager=eager)
    fwd, bwd = priced_seconds(cost, device, eager=eager)
    total = 0.0
    for t, launch in ((fwd, fixed[0]), (bwd if training else 0.0, fixed[1])):
        if t > 0:
            total += launch + (t - launch) * fraction
    return total


# ----------------------------------------------------------------------------- the problem


@dataclass(frozen=True, kw_only=True)
class TPProblemIndex:
    """How the arrays of a TPProblem map back to graph nodes."""

    problem: TPProblem
    node_group: dict[str, int]
    """Node name → group index (strategy k of the group is strategy k of the node)."""
    graph: GraphStrategies
    pricing: _Pricing
    node_seconds: dict[str, np.ndarray]
    """Node name → per strategy: its compute (split by compute_fraction) plus, for a model
    output, the collective that makes it Replicate (s). Collectives between ops are in
    `problem.shared` (one per value and target placement) and Megatron's f likewise."""
    node_param_bytes: dict[str, np.ndarray]
    """Node name → per strategy: parameter bytes a device holds (get_attr nodes; 0 elsewhere)."""
    node_eager_seconds: dict[str, np.ndarray] | None = None
    """As `node_seconds`, op by op (NodeCost.op_by_op), for a graph priced as compiled kernels;
    None: the same as `node_seconds`."""


def build_tp_problem(gm: torch.fx.GraphModule, cluster: Cluster, tp: int, memory_budget_bytes: float, *,
                     fixed: Mapping[str, Placement | str | frozenset] | None = None, training: bool = True,
                     share_layers: bool = True, sequence_parallel: bool = False,
                     force_sequence: bool = False, eager_splits: bool = False) -> TPProblemIndex:
    """The ILP's arrays for `gm` (annotated by passes.annotate with `cluster`); `sequence_parallel`
    offers sequence shards to elementwise ops and norms (sequence.py); `force_sequence` also forbids
    gathering a sequence-sharded activation for a replicated op (only split work may gather it),
    which keeps norms and residual adds on the shards wherever their input is one. `eager_splits`
    prices the ops op by op in the objective, where the graph is priced as compiled kernels: the
    splits an eager plan makes (`TPProblemIndex.node_seconds` stay the compiled prices)."""
    if tp > cluster.num_devices:
        raise InputError(f"tp={tp} exceeds the cluster's {cluster.num_devices} devices; use tp <= "
                         f"{cluster.num_devices} or a larger cluster")
    graph = graph_strategies(gm, tp, fixed, sequence_parallel)
    pricing = _Pricing(tp=tp, link=cluster.link_for_group(range(tp)), training=training)
    device = cluster.devices[0]
    nodes = {n.name: n for n in gm.graph.nodes}
    names = list(graph.strategies)
    group_of = _tie_groups(gm, cluster, graph) if share_layers else {n: i for i, n in enumerate(names)}
    num_groups = max(group_of.values()) + 1
    cost = [None] * num_groups
    memory = [None] * num_groups
    first = [""] * num_groups
    node_seconds: dict[str, np.ndarray] = {}
    node_eager_seconds: dict[str, np.ndarray] = {}
    node_param_bytes: dict[str, np.ndarray] = {}
    fused = any(node_cost(n).op_by_op is not None for n in gm.graph.nodes if n.op == "call_function")
    for name in names:
        g, opts, node = group_of[name], graph.strategies[name], nodes[name]
        priced = {eager: np.array([_compute_seconds(node, device.name, device.launch_overhead_s, s.compute_fraction,
                                                    training, eager) if node.op == "call_function" else 0.0
                                   for s in opts]) for eager in ((False, True) if fused else (False,))}
        param = node_cost(node).param_bytes if node.op == "get_attr" else 0
        m = np.array([param / tp if isinstance(s.output, Shard) else param for s in opts], dtype=float)
        for user in node.users:   # model outputs leave replicated
            if user.op == "output":
                gather = np.array([pricing.reshard(s.output, R, graph.num_bytes[name], graph.needs_grad[name],
                                                   False) for s in opts])
                priced = {eager: seconds + gather for eager, seconds in priced.items()}
        node_seconds[name], node_param_bytes[name] = priced[False], m
        node_eager_seconds[name] = priced.get(True, priced[False])
        c = priced.get(eager_splits, priced[False])
        cost[g] = c.copy() if cost[g] is None else cost[g] + c
        memory[g] = m if memory[g] is None else memory[g] + m
        first[g] = first[g] or name
    edges: dict[tuple[int, int], np.ndarray] = {}
    # shared[(key)] = seconds: one collective per (value, source strategy, target placement),
    # paid when any reader needs that placement; key = (source or None, triggers).
    shared: dict[tuple, float] = {}
    for u_name, u_opts in graph.strategies.items():
        gu = group_of[u_name]
        readers = [(v, group_of[v], b, s) for v in _readers(nodes[u_name], graph)
                   for b, s in enumerate(graph.strategies[v]) if s.input_placement(u_name) is not None]
        is_list = isinstance(nodes[u_name].meta["val"], (list, tuple))
        targets: dict[Placement, list[tuple[int, int]]] = {}
        sync: list[tuple[int, int]] = []
        for v, gv, b, s in readers:
            targets.setdefault(s.input_placement(u_name), []).append((gv, b))
            if u_name in s.grad_sync and graph.needs_grad[u_name] and training:
                sync.append((gv, b))
            if gv != gu:   # forbidden pairs live in the edge matrices
                edges.setdefault((gu, gv), np.zeros((len(u_opts), len(graph.strategies[v]))))
        is_output = any(user.op == "output" for user in nodes[u_name].users)
        if force_sequence and not is_output:
            _forbid_gathered_sequence(nodes[u_name], u_opts, readers, tp, edges, gu)
        for want, triggers in targets.items():
            if want == R and is_output:
                continue   # the gather or reduction to Replicate is paid once, in the node cost above
            for a, su in enumerate(u_opts):
                seconds = pricing.reshard(su.output, want, graph.num_bytes[u_name], graph.needs_grad[u_name],
                                          is_list)
                if seconds == 0:
                    continue
                for gv, b in triggers:
                    if not np.isfinite(seconds):
                        if gv == gu:
                            cost[gu][a] = INF if a == b else cost[gu][a]
                        else:
                            edges[(gu, gv)][a, b] = INF
                if np.isfinite(seconds):
                    key = ((gu, a), frozenset(triggers))
                    shared[key] = shared.get(key, 0.0) + seconds
        if sync:   # f: an all-reduce of the gradient; of a gathered Shard, a reduce-scatter (seq_all_gather)
            for a, su in enumerate(u_opts):
                kind = _grad_sync_kind(nodes[u_name], su.output)
                key = ((gu, a), frozenset(sync))
                shared[key] = shared.get(key, 0.0) + collective_seconds(kind, graph.num_bytes[u_name], tp,
                                                                        pricing.link)
    problem = TPProblem(
        group_names=tuple(first), node_seconds=tuple(cost), param_bytes=tuple(memory),
        edges=tuple(edges), edge_seconds=tuple(edges.values()),
        shared=tuple(SharedCost(seconds=sec, source=src, triggers=tuple(sorted(trig)))
                     for (src, trig), sec in shared.items()),
        memory_budget_bytes=float(memory_budget_bytes),
    )
    return TPProblemIndex(problem=problem, node_group=group_of, graph=graph, pricing=pricing,
                          node_seconds=node_seconds, node_param_bytes=node_param_bytes,
                          node_eager_seconds=node_eager_seconds if fused else None)


def _forbid_gathered_sequence(node: torch.fx.Node, options: tuple[Strategy, ...], readers: list, tp: int,
                              edges: dict[tuple[int, int], np.ndarray], group: int) -> None:
    """Forbid (edge cost ∞) every replicated reader of `node`'s sequence shard: such a value is gathered
    only by split work (through seq_all_gather), as Megatron-SP does. A reader with no other way to
    read it (an op that only runs replicated) keeps its gather."""
    shard = sequence_shard(node, tp) if node.op == "call_function" else None
    if shard is None:
        return
    splits = {v for v, _, _, s in readers if s.input_placement(node.name) != R or node.name in s.grad_sync}
    for v, gv, b, s in readers:
        if gv == group or v not in splits or s.input_placement(node.name) != R or node.name in s.grad_sync:
            continue
        for a, su in enumerate(options):
            if su.output == shard:
                edges[(group, gv)][a, b] = INF


def _sequence_sharded(node: torch.fx.Node, chosen: dict[str, Strategy], tp: int) -> bool:
    """Whether `node`'s value, or a reader's copy of it, sits on its sequence shard."""
    shard = sequence_shard(node, tp)
    return shard is not None and (chosen[node.name].output == shard or any(
        chosen[u.name].input_placement(node.name) == shard for u in node.users if u.name in chosen))


def _grad_sync_kind(node: torch.fx.Node, source: Placement) -> str:
    """The backward collective summing a gradient's per-rank addends: f's all-reduce, or for an
    activation gathered from a Shard (sequence parallelism's all-gather) a reduce-scatter onto the
    shards. A split parameter gathered whole keeps f (shard.py): parameters stay as Megatron
    holds them, and a norm's weight is not split just because the two ways cost alike."""
    return "reduce_scatter" if isinstance(source, Shard) and node.op == "call_function" else "grad_all_reduce"


def _readers(node: torch.fx.Node, graph: GraphStrategies) -> list[str]:
    return [u.name for u in node.users if u.name in graph.strategies]


def _tie_groups(gm: torch.fx.GraphModule, cluster: Cluster, graph: GraphStrategies) -> dict[str, int]:
    """One group per node, except that nodes at the same position of identical layers
    (equal `Block.signature`, passes/coarsen.py) with equal strategy lists share one."""
    blocks = coarsen(gm, cluster, depth=0).blocks
    key_of: dict[str, tuple] = {}
    readers: dict[str, set[int]] = {}
    for b, block in enumerate(blocks):
        for pos, name in enumerate(block.node_names):
            key_of[name] = (block.signature, "op", pos)
    attr_nodes = {n.target: n.name for n in gm.graph.nodes if n.op == "get_attr"}
    for b, block in enumerate(blocks):
        for pos, target in enumerate(block.param_names):
            readers.setdefault(target, set()).add(b)
            key_of.setdefault(attr_nodes.get(target, ""), (block.signature, "param", pos))
    for target, bs in readers.items():
        if len(bs) > 1:
            key_of.pop(attr_nodes.get(target, ""), None)   # read by several layers: not tied
    group_of: dict[str, int] = {}
    by_key: dict[tuple, int] = {}
    for name, opts in graph.strategies.items():
        key = (key_of[name], tuple(s.key() for s in opts)) if name in key_of else None
        if key is not None and key in by_key:
            group_of[name] = by_key[key]
            continue
        group_of[name] = len(set(group_of.values()))
        if key is not None:
            by_key[key] = group_of[name]
    return group_of


# ----------------------------------------------------------------------------- the answer


def assignment_from_solution(gm: torch.fx.GraphModule, index: TPProblemIndex, solution: TPSolution) -> TPAssignment:
    """Per-node placements and the collectives they imply, from a solver's choice."""
    graph, pricing = index.graph, index.pricing
    chosen = {name: graph.strategies[name][solution.choice[g]] for name, g in index.node_group.items()}
    collectives: list[Collective] = []
    synced: set[str] = set()
    nodes = {n.name: n for n in gm.graph.nodes}

    def add(kind: str, value: str, phase: str) -> None:
        n = graph.num_bytes[value]
        collectives.append(Collective(kind=kind, value=value, phase=phase, num_bytes=n,
                                      seconds=collective_seconds(kind, n, pricing.tp, pricing.link)))

    seen: set[tuple[str, Placement]] = set()
    for node in gm.graph.nodes:
        wanted = [(u, p) for u, p in chosen[node.name].inputs] if node.name in chosen else []
        if node.op == "output":
            wanted = [(a.name, R) for a in node.all_input_nodes if a.name in chosen]
        for u, want in wanted:
            if u in chosen and (u, want) not in seen:
                seen.add((u, want))
                for kind, phase in reshard_steps(chosen[u].output, want) or []:
                    if phase == "forward" or (graph.needs_grad[u] and pricing.training):
                        add(kind, u, phase)
        for u in chosen[node.name].grad_sync if node.name in chosen else ():
            if u not in synced and graph.needs_grad[u] and pricing.training:
                synced.add(u)
                add(_grad_sync_kind(nodes[u], chosen[u].output), u, "backward")
    # sequence parallelism: an activation's sequence shard is reduce-scattered onto (from a Partial) or
    # gathered from with its gradient reduce-scattered back (seq_all_gather)
    on_sequence = any(c.kind == "reduce_scatter" and nodes[c.value].op == "call_function"
                      and _sequence_sharded(nodes[c.value], chosen, pricing.tp) for c in collectives)
    decisions = {}
    for name, s in chosen.items():   # f only where a gradient flows
        decision = NodePlacement.of(s)
        keep = tuple(u for u in decision.grad_sync if graph.needs_grad[u] and pricing.training)
        decisions[name] = replace(decision, grad_sync=keep)
    return TPAssignment(
        tp=pricing.tp, nodes=decisions,
        predicted_seconds=solution.objective_seconds, collectives=tuple(collectives),
        param_bytes_per_device=int(solution.param_bytes), status=solution.status,
        solve_seconds=solution.solve_seconds, sequence_parallel=on_sequence,
        extra={"num_groups": index.problem.num_groups, "num_nodes": len(chosen),
               "num_edges": len(index.problem.edges)},
    )
