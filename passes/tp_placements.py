"""Placements of a tensor on one tensor-parallel axis, op strategies, and the chosen assignment.

A value of the graph sits on the `tp` ranks of the axis in one of three ways
(DTensor's vocabulary, torch/distributed/tensor/placement_types.py):

- `Replicate()`: every rank holds the whole tensor;
- `Shard(dim, groups)`: dimension `dim` is cut into `groups` equal contiguous
  chunks and each chunk into `tp` equal pieces; rank r holds piece r of every
  chunk, concatenated. ``groups == 1`` is the ordinary even shard. ``groups > 1``
  is what a fused projection needs: the [q; k; v] output of one linear is
  sharded so that every rank holds its heads of q, of k and of v, and
  ``split(d, -1)`` then yields plain shards (DTensor calls this `_StridedShard`);
- `Partial()`: every rank holds a full-size addend; the value is their sum.

Here too: `Strategy` (one way to run an op), the helpers the rules in
tp_rules.py and tp_views.py build strategies with, and `TPAssignment` (what
the chooser decided; JSON round trip), the only thing passes/shard.py reads.

Gradients follow Megatron-LM's convention (Shoeybi et al. 2019, §3): the
gradient of a Replicate value is the full gradient, identical on every rank; of
a Shard value the matching shard; of a Partial value the full gradient (the
gradient of a sum reaches every addend unchanged).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import torch
import torch.fx


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Rank r holds piece r of each of `groups` equal chunks of dimension `dim` (dim >= 0)."""

    dim: int
    groups: int = 1

    def __str__(self) -> str:
        return f"S({self.dim})" if self.groups == 1 else f"S({self.dim},{self.groups})"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a full-size addend; the value is the sum over ranks."""

    def __str__(self) -> str:
        return "P"


Placement = Union[Replicate, Shard, Partial]
R = Replicate()
P = Partial()

_SHARD = re.compile(r"^S\((\d+)(?:,(\d+))?\)$")


def parse_placement(text: str | Placement) -> Placement:
    """'R', 'P', 'S(2)' or 'S(2,3)' (dim 2 in 3 groups) → a Placement; Placements pass through."""
    if isinstance(text, (Replicate, Shard, Partial)):
        return text
    text = text.strip().replace(" ", "")
    if text == "R":
        return R
    if text == "P":
        return P
    match = _SHARD.match(text)
    if match is None:
        raise ValueError(f"placement {text!r}: write 'R', 'P', 'S(dim)' or 'S(dim,groups)'")
    return Shard(int(match.group(1)), int(match.group(2) or 1))


def local_shape(shape: tuple[int, ...], placement: Placement, tp: int) -> tuple[int, ...]:
    """Shape one rank holds of a tensor of `shape` placed as `placement` over `tp` ranks."""
    if not isinstance(placement, Shard):
        return tuple(shape)
    out = list(shape)
    out[placement.dim] //= tp
    return tuple(out)


def can_shard(shape: tuple[int, ...], dim: int, groups: int, tp: int) -> bool:
    """Whether dimension `dim` of `shape` splits evenly into `groups` chunks of `tp` pieces."""
    return 0 <= dim < len(shape) and shape[dim] > 0 and shape[dim] % (groups * tp) == 0


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """One way to run an op on the axis: what it reads, what it writes, what it costs."""

    name: str
    """Short label: 'replicate', 'colwise', 'rowwise', 'heads', 'vocab', 'follow', ..."""
    output: Placement
    """Placement of the op's output (of each element, for ops returning a list or tuple)."""
    inputs: tuple[tuple[str, Placement], ...]
    """(input node name, placement the op needs it in), one per tensor input node."""
    grad_sync: tuple[str, ...] = ()
    """Input nodes whose gradient leaves this op as per-rank addends (a Replicate input
    read by rank-dependent work): their gradient needs Megatron's f (all-reduce in backward)."""
    compute_fraction: float = 1.0
    """Share of the op's single-device work each rank does (1/tp when split, 1 when not)."""
    scaled_bias: str | None = None
    """Input node of a bias added on every rank of a Partial output: added as bias/tp forward,
    with an identity backward (so every rank's bias gradient is the full one)."""

    def input_placement(self, node_name: str) -> Placement | None:
        for name, placement in self.inputs:
            if name == node_name:
                return placement
        return None

    def key(self) -> tuple:
        """What the strategy does, apart from node names and its label (equal for identical layers)."""
        return (str(self.output), tuple(str(p) for _, p in self.inputs),
                len(self.grad_sync), self.compute_fraction, self.scaled_bias is not None)


# ----------------------------------------------------------------------------- building strategies


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of a (fake) tensor as ints, or None for anything else."""
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


def is_float(node: torch.fx.Node) -> bool:
    """Whether the node's (first) tensor value is floating point (so it can carry a gradient)."""
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Input nodes carrying tensors (or lists of tensors), in first-use order."""
    return [n for n in node.all_input_nodes
            if isinstance(n.meta.get("val"), (torch.Tensor, list, tuple))]


def make_strategy(node: torch.fx.Node, name: str, output: Placement, placements: dict[torch.fx.Node, Placement],
                  fraction: float, no_sync: Iterable[torch.fx.Node] = (),
                  scaled_bias: torch.fx.Node | None = None) -> Strategy:
    """A Strategy of `node`: tensor inputs not in `placements` are Replicate.

    Replicate float inputs of rank-dependent work (any input or the output not
    Replicate) get `grad_sync` — their gradient leaves the op as per-rank
    addends — except those in `no_sync`.
    """
    inputs = tuple((n.name, placements.get(n, R)) for n in tensor_inputs(node))
    rank_dependent = output != R or any(p != R for _, p in inputs)
    skip = {n.name for n in no_sync}
    by_name = {n.name: n for n in tensor_inputs(node)}
    sync = tuple(name for name, p in inputs
                 if rank_dependent and p == R and name not in skip and is_float(by_name[name]))
    return Strategy(name=name, output=output, inputs=inputs, grad_sync=sync,
                    compute_fraction=fraction, scaled_bias=scaled_bias.name if scaled_bias is not None else None)


def replicate(node: torch.fx.Node) -> Strategy:
    """Every input and the output whole on every rank: the op runs as on one device."""
    return make_strategy(node, "replicate", R, {}, 1.0)


def dim_arg(node: torch.fx.Node, index: int, default: int, ndim: int) -> int:
    """The op's `dim` argument (positional `index` or keyword), made non-negative."""
    d = node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)
    return d % ndim if ndim else 0


@dataclass(frozen=True, kw_only=True)
class Collective:
    """One collective the assignment needs, priced with cost_models.comm."""

    kind: str
    """'all_reduce', 'all_gather', 'reduce_scatter', or 'grad_all_reduce' (Megatron's f, backward)."""
    value: str
    """Graph node whose value is communicated."""
    phase: str
    """'forward' or 'backward'."""
    num_bytes: int
    """Full (unsharded) size of the buffer in bytes."""
    seconds: float
    """α–β time of the collective on the tp group's link."""


@dataclass(frozen=True, kw_only=True)
class NodePlacement:
    """What the assignment decided for one node."""

    strategy: str
    """Strategy name (see `Strategy.name`)."""
    output: Placement
    inputs: tuple[tuple[str, Placement], ...]
    grad_sync: tuple[str, ...] = ()
    scaled_bias: str | None = None

    @staticmethod
    def of(strategy: Strategy) -> NodePlacement:
        return NodePlacement(strategy=strategy.name, output=strategy.output, inputs=strategy.inputs,
                             grad_sync=strategy.grad_sync, scaled_bias=strategy.scaled_bias)

    def input_placement(self, node_name: str) -> Placement | None:
        for name, placement in self.inputs:
            if name == node_name:
                return placement
        return None


@dataclass(frozen=True, kw_only=True)
class TPAssignment:
    """A tensor-parallel plan for one graph on one axis of `tp` ranks."""

    tp: int
    """Ranks on the axis."""
    nodes: dict[str, NodePlacement]
    """Node name → decision, for every tensor-valued node (placeholders, get_attrs, calls)."""
    predicted_seconds: float
    """Objective: Σ compute (divided where split) + collectives, forward and backward (s)."""
    collectives: tuple[Collective, ...]
    """The collectives the plan needs, in graph order."""
    param_bytes_per_device: int
    """Bytes of parameters each rank holds."""
    status: str = "OPTIMAL"
    """Solver status ('OPTIMAL', 'FEASIBLE', or 'GIVEN' for hand-made plans)."""
    solve_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts for reports (problem size, number of shared variables)."""

    def output_placement(self, node_name: str) -> Placement:
        decision = self.nodes.get(node_name)
        return decision.output if decision is not None else R

    def sharded_params(self) -> dict[str, Placement]:
        """Parameter node name → placement, for every non-replicated get_attr."""
        return {n: d.output for n, d in self.nodes.items() if d.strategy == "param" and d.output != R}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; `TPAssignment.from_dict` inverts it."""
        return {
            "tp": self.tp,
            "nodes": {name: {"strategy": d.strategy, "output": str(d.output),
                             "inputs": [[n, str(p)] for n, p in d.inputs],
                             "grad_sync": list(d.grad_sync), "scaled_bias": d.scaled_bias}
                      for name, d in self.nodes.items()},
            "predicted_seconds": self.predicted_seconds,
            "collectives": [vars(c) for c in self.collectives],
            "param_bytes_per_device": self.param_bytes_per_device,
            "status": self.status, "solve_seconds": self.solve_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TPAssignment:
        nodes = {
            name: NodePlacement(strategy=x["strategy"], output=parse_placement(x["output"]),
                                inputs=tuple((n, parse_placement(p)) for n, p in x["inputs"]),
                                grad_sync=tuple(x["grad_sync"]), scaled_bias=x.get("scaled_bias"))
            for name, x in d["nodes"].items()
        }
        return cls(tp=d["tp"], nodes=nodes, predicted_seconds=d["predicted_seconds"],
                   collectives=tuple(Collective(**c) for c in d["collectives"]),
                   param_bytes_per_device=d["param_bytes_per_device"], status=d.get("status", "OPTIMAL"),
                   solve_seconds=d.get("solve_seconds", 0.0))
