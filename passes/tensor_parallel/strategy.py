"""One way to run an op on a tensor-parallel axis (`Strategy`), and the helpers the rules build them with.

The rules of op_rules.py and view_rules.py return, for one node, the
`Strategy`s it can run in: the placement it needs of each tensor input, the
placement of its output, the share of the work each rank does, and which
inputs' gradients need Megatron's f (an all-reduce in backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx

from autopart.passes.tensor_parallel.placements import Placement, R


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
