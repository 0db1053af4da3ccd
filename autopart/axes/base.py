"""What every parallel axis declares, in one place each (autopart/axes/<axis>.py).

An axis is a way to spread the model over devices: data parallelism (replicas),
pipeline parallelism (stages), tensor parallelism (op splits), and those to come
(sequence, context, expert). Each axis module builds one `Axis` and registers it;
the planner, the runtime and the report reach the axis only through the registry
(`autopart.axes.AXES`):

- its degree: the `Mesh` field and the `Layout` fields it owns (core/plan.py,
  core/setting.py), and the degrees the search tries (`degrees`);
- its price: the seconds it adds to a step besides the pipeline's stages
  (`step_seconds`, after the cut is solved) and a lower bound on them before
  (`step_bound`); an axis whose cost lives in the blocks (tp: the strategy ILP)
  adds none here;
- its process groups in the runtime (`groups`: every group's ranks, in the
  order every rank creates them);
- its part of the report's mesh line (`describe`).

Adding an axis: a module here that builds its `Axis` and calls `register`, its
field on `Mesh` and `Layout`, and its mechanics (a pass that rewrites the rank
modules, a runtime wrapper) where those live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from autopart.core.plan import Mesh, Plan

GroupRanks = dict[str, list[list[int]]]
"""Process group name -> the ranks of each group of that name (every group of the mesh, in the
order all ranks create them: `torch.distributed.new_group` is collective)."""


@dataclass(frozen=True, kw_only=True)
class SearchShape:
    """What the search knows when it asks an axis for its degrees: the degrees already chosen
    (by axis name) and the model's block count."""

    degrees: dict[str, int] = field(default_factory=dict)
    num_blocks: int = 1
    num_experts: int = 0
    """Experts per mixture-of-experts layer (their gcd over the layers; 0: the model has none)."""
    sequence_length: int = 0
    """Tokens per sample that context parallelism may split (0: no attention over a sequence)."""

    def with_degree(self, name: str, degree: int) -> "SearchShape":
        return SearchShape(degrees={**self.degrees, name: degree}, num_blocks=self.num_blocks,
                           num_experts=self.num_experts, sequence_length=self.sequence_length)


@dataclass(frozen=True, kw_only=True)
class Axis:
    """One parallel axis: what the search, the runtime and the report need of it."""

    name: str
    """Short name: the `Mesh` field holding its degree and its process group's name ('dp', 'pp', 'tp')."""
    title: str
    """For people: 'data parallel'."""
    degrees: Callable[[Any, Any, SearchShape], list[int]]
    """(request, cluster, shape so far) -> the degrees the search tries, in tie-break order; the one the
    user fixed, checked against the devices and the batch (InputError naming the argument otherwise).
    `cluster` is the one the search places blocks on (one device per tp group)."""
    groups: Callable[["Mesh"], GroupRanks]
    """The ranks of every process group of this axis on a mesh (empty where the axis has size 1 and
    needs no group)."""
    describe: Callable[["Plan"], str]
    """Its part of the report's mesh line, e.g. 'dp=4 zero3'."""
    step_seconds: Callable[..., float] | None = None
    """(graph, cluster, request, problem, solution, setting) -> exposed seconds it adds to a step."""
    step_bound: Callable[..., float] | None = None
    """(graph, cluster, request, problem, setting) -> a lower bound on `step_seconds` before solving."""


_REGISTRY: dict[str, Axis] = {}


def register(axis: Axis) -> Axis:
    """Add `axis` to the registry (its module calls this once, at import)."""
    if axis.name in _REGISTRY and _REGISTRY[axis.name] is not axis:
        raise ValueError(f"an axis named {axis.name!r} is registered already")
    _REGISTRY[axis.name] = axis
    return axis


def registered() -> dict[str, Axis]:
    """Every registered axis by name, in the order registered (the rank layout's, slowest first)."""
    return dict(_REGISTRY)
