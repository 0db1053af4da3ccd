"""All tensor-parallel ranks in one process: the rank modules run node by node in lock step.

Why not `torch.distributed._local_tensor.LocalTensorMode`: it runs *one*
program on tensors that hold every rank's value, while tensor-parallel rank
modules (passes/tensor_parallel/shard.py) are different programs (each holds
other parameter slices and its own rank number), and their collectives are
Megatron's autograd pairs, not the functional collectives LocalTensorMode
intercepts. It is also private and
differs between torch releases. Running the ranks in lock step is small and
exact: the modules share one graph structure, ordinary nodes run on each rank
with `torch.fx.Interpreter`, and each collective node (listed in the module's
`TPRankInfo`, autopart/interfaces.py) runs across all ranks' values at once
through its `across_ranks`, whose forward and backward compute what the
distributed one computes.

Training: every rank computes the loss on its (replicated) outputs and seeds
its own backward, as on a real process group; full gradients are rebuilt from
the slices, and a replicated parameter's gradient must be identical on every
rank.

Context parallelism (`run_mesh_ranks`): the cp ranks of a group run in the same
lock step, cp groups of tp ranks, each cp op (passes/context_parallel/ops.py)
across the ranks of its cp group, each tp collective across its tp group. A
random op draws what the ranks would: alike within a tp group, afresh per cp
rank on split values, alike over the cp group from the `_cp_random` stream on
whole ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx

from autopart.core.context_chunks import CP_RANDOM_ATTR, context_parallel_info
from autopart.core.errors import PlanError
from autopart.core.interfaces import TPRankInfo, region_info, tp_rank_info
from autopart.core.recompute import run_region
from autopart.core.sequence_saves import gathers_sequence, keep_gathered_as_shards
from autopart.core.tp_random import draws_random, sharded_random, streams_of


def _info(module: torch.fx.GraphModule) -> TPRankInfo:
    info = tp_rank_info(module)
    if info is None:
        raise PlanError("module is not a tensor-parallel rank module: build it with passes.tensor_parallel.shard_graph")
    return info


def _check_lock_step(modules: Sequence[torch.fx.GraphModule]) -> list[list[torch.fx.Node]]:
    nodes = [list(m.graph.nodes) for m in modules]
    for r, rank_nodes in enumerate(nodes[1:], start=1):
        if [(n.op, n.name) for n in rank_nodes] != [(n.op, n.name) for n in nodes[0]]:
            raise PlanError(f"rank module {r} has a different graph from rank 0; build all ranks with shard_graph")
    return nodes


def run_ranks(rank_modules: Sequence[torch.fx.GraphModule], flat_inputs: Sequence[Any],
              per_rank_inputs: Sequence[Sequence[Any]] | None = None) -> list[list[Any]]:
    """Every rank's flat outputs (autograd recorded if enabled).

    `per_rank_inputs` gives each rank its own input tensors (as separate
    processes would have), so gradients of replicated inputs are not summed
    over ranks; otherwise every rank reads `flat_inputs`.
    """
    modules = list(rank_modules)
    if [_info(m).rank for m in modules] != list(range(len(modules))):
        raise PlanError("give the rank modules in rank order 0..tp-1, all of them")
    inputs = per_rank_inputs if per_rank_inputs is not None else [flat_inputs] * len(modules)
    with keep_gathered_as_shards(gathers_sequence(modules[0])):   # gathered sequence shards kept as shards
        return _lockstep(modules, inputs, _Mesh(tp=len(modules), tp_ops=frozenset(_info(modules[0]).collectives)))


def run_mesh_ranks(stage_modules: Sequence[torch.fx.GraphModule], per_rank_inputs: Sequence[Sequence[Any]],
                   cp: int) -> list[list[Any]]:
    """Every rank's flat outputs of one stage over a cp × tp mesh, in lock step.

    `stage_modules` are the stage's tp rank modules (tp rank order); every rank of a cp group runs
    the same module (its ops take the rank from their place in the group: `across_ranks`), so the
    cp ranks of one tp index share its parameters and their gradients add up there. Ranks are
    ordered cp index first: rank c·tp + t, and `per_rank_inputs` gives each its inputs.
    """
    tp = len(stage_modules)
    modules = [stage_modules[t] for _ in range(cp) for t in range(tp)]
    info = context_parallel_info(stage_modules[0])
    mesh = _Mesh(tp=tp, cp=cp, tp_ops=frozenset(_info(stage_modules[0]).collectives) if tp > 1 else frozenset(),
                 cp_ops=frozenset(info.modules) if info is not None else frozenset())
    with keep_gathered_as_shards(gathers_sequence(modules[0])):
        return _lockstep(modules, per_rank_inputs, mesh)


@dataclass(frozen=True)
class _Mesh:
    """The ranks run in lock step: cp groups of tp groups, rank c·tp + t; the call_module targets of
    the collectives of each axis."""

    tp: int
    cp: int = 1
    tp_ops: frozenset[str] = frozenset()
    cp_ops: frozenset[str] = frozenset()

    def tp_groups(self) -> list[list[int]]:
        return [[c * self.tp + t for t in range(self.tp)] for c in range(self.cp)]

    def cp_groups(self) -> list[list[int]]:
        return [[c * self.tp + t for c in range(self.cp)] for t in range(self.tp)]


def _lockstep(modules: list[torch.fx.GraphModule], per_rank_inputs: Sequence[Sequence[Any]],
              mesh: _Mesh) -> list[list[Any]]:
    """Run `modules` (one per rank, one graph structure) node by node.

    Region submodules (passes/regions.py) are entered in lock step too, and a
    region that recomputes runs every rank's body under one checkpoint
    (`autopart.core.recompute.run_region`): its replay in backward then runs the
    ranks' collectives together, as the forward did.
    """
    interps = [torch.fx.Interpreter(m) for m in modules]
    for r, interp in enumerate(interps):
        interp.args_iter = iter(per_rank_inputs[r])
        interp.env = {}
    outputs: list[list[Any]] = []
    for step in zip(*_check_lock_step(modules)):
        head = step[0]
        if head.op == "call_module" and head.target in mesh.tp_ops:
            for group in mesh.tp_groups():
                xs = [interps[r].env[step[r].args[0]] for r in group]
                for r, y in zip(group, modules[group[0]].get_submodule(head.target).across_ranks(xs)):
                    interps[r].env[step[r]] = y
        elif head.op == "call_module" and head.target in mesh.cp_ops:
            for group in mesh.cp_groups():
                args = [interps[r].fetch_args_kwargs_from_env(step[r])[0] for r in group]
                for r, y in zip(group, modules[group[0]].get_submodule(head.target).across_ranks(args)):
                    interps[r].env[step[r]] = y
        elif head.op == "call_module" and region_info(modules[0].get_submodule(head.target)) is not None:
            subs = [m.get_submodule(head.target) for m in modules]
            args = [interp.fetch_args_kwargs_from_env(node)[0] for interp, node in zip(interps, step)]
            for interp, node, out in zip(interps, step, _lockstep(subs, args, mesh)):
                interp.env[node] = tuple(out)  # a region returns a tuple
        elif head.op == "call_function" and head.target is run_region:
            values = [interp.fetch_args_kwargs_from_env(node)[0] for interp, node in zip(interps, step)]
            for interp, node, out in zip(interps, step, _region_in_lock_step(values, mesh)):
                interp.env[node] = out
        elif head.op == "output":
            for interp, node in zip(interps, step):
                outputs.append(list(interp.fetch_args_kwargs_from_env(node)[0][0]))
        elif draws_random(head):  # a replicated random op: every rank draws what separate processes,
            for group in mesh.tp_groups():   # seeded alike within the tp group, would (autopart/tp_random.py);
                state = _rng_state()         # each rank of a cp group holds other positions: its own draws
                for r in group:
                    _set_rng_state(state)
                    interps[r].env[step[r]] = interps[r].run_node(step[r])
        elif _draws_alike_over_cp(head):   # a random op on a value whole over cp: every rank draws alike
            streams = [interps[r].env[step[r].args[0]] for r in range(len(step))]
            states = {id(stream): stream.snapshot() for stream in streams}
            for interp, node, stream in zip(interps, step, streams):
                stream.restore(states[id(stream)])
                interp.env[node] = interp.run_node(node)
        else:
            for interp, node in zip(interps, step):
                interp.env[node] = interp.run_node(node)
    return outputs


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


def _draws_alike_over_cp(node: torch.fx.Node) -> bool:
    stream = node.args[0] if node.op == "call_function" and node.target is sharded_random else None
    return isinstance(stream, torch.fx.Node) and stream.op == "get_attr" and stream.target == CP_RANDOM_ATTR


def _region_in_lock_step(values: list[tuple], mesh: _Mesh) -> list[tuple]:
    """`run_region(body, mode, *args)` of every rank as one call: one checkpoint around all bodies."""
    bodies = [v[0] for v in values]
    mode = values[0][1]
    per_rank = [list(v[2:]) for v in values]
    width = len(per_rank[0])

    def all_ranks(*flat: Any) -> tuple:
        outs = _lockstep(bodies, [flat[r * width:(r + 1) * width] for r in range(len(bodies))], mesh)
        return tuple(x for out in outs for x in out)

    all_ranks.sharded_streams = [stream for body in bodies for stream in streams_of(body)]  # rewound on replay
    flat = run_region(all_ranks, mode, *[a for args in per_rank for a in args])
    size = len(flat) // len(bodies)
    return [tuple(flat[r * size:(r + 1) * size]) for r in range(len(bodies))]


def simulate_tp(rank_modules: Sequence[torch.fx.GraphModule], flat_inputs: Sequence[Any]) -> list[Any]:
    """The flat outputs of the sharded model (rank 0's; every rank's must be identical)."""
    with torch.no_grad():
        outputs = run_ranks(rank_modules, flat_inputs)
    for r, outs in enumerate(outputs[1:], start=1):
        for i, (a, b) in enumerate(zip(outputs[0], outs)):
            if isinstance(a, torch.Tensor) and not torch.equal(a, b):
                raise PlanError(f"output {i} differs between rank 0 and rank {r}: outputs must be replicated")
    return outputs[0]


def gather_gradients(rank_modules: Sequence[torch.fx.GraphModule]) -> dict[str, torch.Tensor]:
    """Full gradient per original parameter: shards concatenated, replicas checked identical."""
    infos = [_info(m) for m in rank_modules]
    grads: dict[str, torch.Tensor] = {}
    for i, piece in enumerate(infos[0].params):
        per_rank = [m.get_parameter(info.params[i].name).grad for m, info in zip(rank_modules, infos)]
        if any(g is None for g in per_rank):
            if all(g is None for g in per_rank):
                continue
            raise PlanError(f"parameter {piece.name} got a gradient on some ranks only")
        if piece.dim is None:
            for r, g in enumerate(per_rank[1:], start=1):
                if not torch.equal(g, per_rank[0]):
                    worst = (g - per_rank[0]).abs().max().item()
                    raise PlanError(f"replicated parameter {piece.name}: rank {r}'s gradient differs from "
                                    f"rank 0's by up to {worst:.3g}; replicas must get identical gradients")
            grads[piece.name] = per_rank[0].detach().clone()
        else:
            grads[piece.name] = piece.merge([g.detach() for g in per_rank])
    return grads
