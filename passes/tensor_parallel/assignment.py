"""What the strategy choice decided for a graph: a placement per node, and the collectives it implies.

`TPAssignment` is the only thing shard.py reads, and the form the Plan keeps
(`Plan.tensor_parallel` is `TensorParallelPlan.of(assignment)`; `from_dict` reads its dict back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from autopart.core.plan import PlannedCollective
from autopart.passes.tensor_parallel.placements import Placement, R, parse_placement
from autopart.passes.tensor_parallel.strategy import Strategy

Collective = PlannedCollective
"""One collective the assignment needs (the Plan keeps it as it is)."""


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
    sequence_parallel: bool = False
    """Whether activations between the split regions run on sequence shards (norms, residual adds,
    dropout on 1/tp of the tokens: passes/tensor_parallel/sequence.py)."""
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
            "collectives": [dataclasses.asdict(c) for c in self.collectives],
            "param_bytes_per_device": self.param_bytes_per_device,
            "status": self.status, "solve_seconds": self.solve_seconds,
            "sequence_parallel": self.sequence_parallel,
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
                   solve_seconds=d.get("solve_seconds", 0.0), sequence_parallel=d.get("sequence_parallel", False))
