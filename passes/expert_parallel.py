"""Expert parallelism: each grouped expert matmul of a rank module runs over an ep group.

A mixture-of-experts layer's expert weights are [E, K, N] tensors (HF 5.x:
`experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F]) read by grouped
matmuls whose rows arrive sorted by expert, `offs[g]` ending group g
(cost_models/experts.py). Under expert parallelism ep ranks, carved out of the
data-parallel ranks (torchtitan's and Megatron's layout: no new devices), each
hold E / ep experts, block r = experts r·E/ep … (r+1)·E/ep - 1 (dim 0 sharded).
Each rank sends the rows of its tokens to the rank owning their expert, that
rank multiplies what it received by its experts, and the products come back:
two all-to-alls with variable split sizes per grouped matmul (dropless: every
row is computed, no capacity factor).

`shard_experts(gm, ep)` replaces every grouped expert matmul node
`op(x, w, offs)` by a call of an `ExpertParallelMatmul` submodule with the same
arguments, so the graph's other nodes (router, sort, gathers, activation) stay
as traced and run on each rank's own tokens. Each matmul is its own dispatch,
so any row-wise code between a layer's matmuls stays where it was; a fused
dispatch per layer would send fewer bytes (the planner prices what this one
sends: `dispatch_bytes`).

Two ways to run the same module:
- one process (the simulation, no process group): the weight is whole and the
  module computes, for each ep rank r, what rank r computes on the rows this
  rank sends it, with r's block of experts — the all-to-all's data movement is
  the identity on one process; the rows and products are exactly the ones the
  ranks exchange;
- a process group (`attach_expert_group`): the weight is this rank's block
  (`localize`), the rows move by `torch.distributed._functional_collectives.all_to_all_single_autograd`
  (its backward sends the gradients back the same way), the received rows are
  regrouped by local expert, multiplied, and returned to their senders.

Gradients: a rank's expert block collects the gradient of every row routed to it
from every rank of its ep group; the other data-parallel ranks holding the same
block (the expert-data-parallel group, dp / ep of them) sum theirs, as the dense
parameters do over dp.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx

from autopart.core.interfaces import EXPERT_PARALLEL_META_KEY, ExpertParallelInfo, expert_parallel_info
from autopart.cost_models.experts import GROUPED_MM_ATEN, LOOPED_GROUPED_MM, op_name

_VIEWS = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.alias.default,
          torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}
"""Ops between an expert parameter and its grouped matmul that keep dim 0 (the experts): views,
and the casts of mixed precision (passes/expert_precision.py)."""


def _kernel(name: str):
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op).default


def is_expert_matmul(node: torch.fx.Node) -> bool:
    """A grouped matmul of 2-D rows by [E, K, N] expert weights with group offsets."""
    if node.op != "call_function":
        return False
    name = op_name(node.target)
    if not (name in LOOPED_GROUPED_MM or name.removeprefix("aten::") in GROUPED_MM_ATEN and name.startswith("aten::")):
        return False
    x, w = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    shapes = [getattr(a.meta.get("val"), "shape", None) if isinstance(a, torch.fx.Node) else None for a in (x, w)]
    return offs is not None and shapes[0] is not None and len(shapes[0]) == 2 and len(shapes[1] or ()) == 3


def expert_weight_of(node: torch.fx.Node) -> str | None:
    """The parameter (get_attr target) behind a grouped matmul's weight, through views that keep
    dim 0 (transpose of the last two dims, alias) and dtype casts; None if the weight is anything else."""
    value = node.args[1]
    while isinstance(value, torch.fx.Node) and value.op == "call_function" and value.target in _VIEWS:
        if value.target is torch.ops.aten.transpose.int and 0 in [d % 3 for d in value.args[1:3]]:
            return None
        if value.target is torch.ops.aten.permute.default and list(value.args[1])[0] % 3 != 0:
            return None
        value = value.args[0]
    return value.target if isinstance(value, torch.fx.Node) and value.op == "get_attr" else None


@dataclass(frozen=True, kw_only=True)
class ExpertLayer:
    """One grouped expert matmul sharded over ep: what the plan and the report say of it."""

    node: str
    """The matmul's node name in the traced graph."""
    weight: str
    """The expert parameter it reads (attribute path of the module it was found in)."""
    num_experts: int
    rows: int
    """Rows per call at the traced microbatch (tokens × top-k)."""
    in_features: int
    out_features: int


def expert_layers(gm: torch.fx.GraphModule) -> list[ExpertLayer]:
    """Every grouped expert matmul of `gm` whose weight is a parameter sharded on dim 0."""
    found = []
    for node in gm.graph.nodes:
        if not is_expert_matmul(node):
            continue
        weight = expert_weight_of(node)
        if weight is None:
            continue
        x, w = node.args[0].meta["val"], node.args[1].meta["val"]
        found.append(ExpertLayer(node=node.name, weight=weight, num_experts=int(w.shape[0]), rows=int(x.shape[0]),
                                 in_features=int(x.shape[1]), out_features=int(w.shape[2])))
    return found


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}


def expert_weight_casts(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The dtype casts of expert parameters among `members` that feed grouped expert matmuls (the
    copies mixed precision makes: passes/expert_precision.py), each once."""
    casts: dict[torch.fx.Node, None] = {}
    for node in members:
        if not is_expert_matmul(node) or expert_weight_of(node) is None:
            continue
        value = node.args[1]
        while isinstance(value, torch.fx.Node) and value.op == "call_function":
            if value.target in _CASTS:
                casts[value] = None
            value = value.args[0]
    return [c for c in casts if c in set(members)]


def expert_bytes(members: list[torch.fx.Node], attrs: list[torch.fx.Node]) -> dict[str, int]:
    """A block's `Block.expert_param_bytes`, `expert_trainable_param_bytes`, `expert_rows_bytes` and
    `expert_cast_bytes` from its nodes (`members`) and the get_attr nodes they read (`attrs`, cost-annotated)."""
    from autopart.passes.node_costs import node_cost

    weights: set[str] = set()
    rows = experts = 0
    for node in members:
        if not is_expert_matmul(node):
            continue
        weight = expert_weight_of(node)
        if weight is None:
            continue
        weights.add(weight)
        experts = math.gcd(experts, int(node.args[1].meta["val"].shape[0]))
        x, out = node.args[0].meta["val"], node.meta["val"]
        rows += x.numel() * x.element_size() + out.numel() * out.element_size()
    held = {a.target: node_cost(a) for a in attrs if a.target in weights}
    copies = sum(c.meta["val"].numel() * c.meta["val"].element_size() for c in expert_weight_casts(members))
    return dict(expert_param_bytes=sum(c.param_bytes for c in held.values()),
                expert_trainable_param_bytes=sum(c.param_bytes for c in held.values() if c.trainable),
                expert_rows_bytes=int(rows), num_experts=experts, expert_cast_bytes=int(copies))


def dispatch_bytes(layer: ExpertLayer, ep: int, element_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes one rank sends to the others for one call, uniform routing.

    Forward: the rows out (rows × in_features) and the products back (rows × out_features), each
    a fraction (ep - 1) / ep leaving the rank; backward the same volumes in reverse."""
    leaving = (ep - 1) / ep
    volume = layer.rows * (layer.in_features + layer.out_features) * element_bytes * leaving
    return volume, volume


class ExpertParallelMatmul(torch.nn.Module):
    """`kernel(x, w, offs)` with w's experts spread over `ep` ranks (module docstring)."""

    def __init__(self, *, kernel: str, num_experts: int, ep: int, weight: str) -> None:
        super().__init__()
        if num_experts % ep:
            raise ValueError(f"expert_parallel={ep} does not divide the {num_experts} experts of {weight}; "
                             f"choose a divisor of {num_experts}")
        self.kernel, self.num_experts, self.ep, self.weight = kernel, num_experts, ep, weight
        self.ep_rank: int | None = None
        """This rank's index in its ep group once localized (None: the one-process simulation)."""
        self.process_group = None

    def extra_repr(self) -> str:
        return f"{self.kernel}, experts={self.num_experts}, ep={self.ep}, rank={self.ep_rank}, weight={self.weight}"

    @property
    def per_rank(self) -> int:
        return self.num_experts // self.ep

    def forward(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if self.ep_rank is None:
            return self._simulated(x, w, offs)
        if self.process_group is None:
            raise RuntimeError(f"expert-parallel matmul on {self.weight} has no process group: call "
                               "attach_expert_group(rank_module, group) before running a localized rank module")
        return self._distributed(x, w, offs)

    def _local(self, rows: torch.Tensor, w_block: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by local expert (counts: rows per local expert) times this block's experts."""
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return _kernel(self.kernel)(rows, w_block, offs)

    def _simulated(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        counts = torch.diff(offs.to(torch.int64), prepend=offs.new_zeros(1, dtype=torch.int64))
        ends = offs.to(torch.int64)[self.per_rank - 1::self.per_rank].tolist()
        pieces, start = [], 0
        for r, end in enumerate(ends):  # rank r receives rows start:end (its experts' rows) and returns them
            block = slice(r * self.per_rank, (r + 1) * self.per_rank)
            pieces.append(self._local(x[start:end], w[block], counts[block]))
            start = end
        if start < x.shape[0]:  # rows past offs[-1] belong to no expert: the kernel leaves them unwritten
            pieces.append(x.new_zeros(x.shape[0] - start, w.shape[-1]))
        return torch.cat(pieces)

    def _distributed(self, x: torch.Tensor, w_block: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        def all_to_all_single(rows: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
            # PyTorch's functional all-to-all with autograd: its backward sends the gradients back
            return wait_tensor(all_to_all_single_autograd(rows, output_splits, input_splits, group))

        group, ep, per_rank = self.process_group, self.ep, self.per_rank
        counts = torch.diff(offs.to(torch.int64), prepend=offs.new_zeros(1, dtype=torch.int64))  # [E]
        # how many rows each rank gets from each other rank, per local expert: [ep source, per_rank]
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts.contiguous(), group=group)
        received_counts = received_counts.view(ep, per_rank)
        send = counts.view(ep, per_rank).sum(dim=1).tolist()
        receive = received_counts.sum(dim=1).tolist()
        routed = int(offs[-1])
        rows = all_to_all_single(x[:routed].contiguous(), receive, send)
        # rows arrive grouped by source, then by local expert: regroup by local expert (stable)
        local_expert = torch.repeat_interleave(torch.arange(per_rank, device=x.device).repeat(ep),
                                               received_counts.reshape(-1))
        order = torch.argsort(local_expert, stable=True)
        products = self._local(rows[order], w_block, received_counts.sum(dim=0))
        back = torch.empty_like(products)
        back = back.index_copy(0, order, products)  # inverse permutation, differentiable
        out = all_to_all_single(back.contiguous(), send, receive)
        if routed < x.shape[0]:
            out = torch.cat([out, out.new_zeros(x.shape[0] - routed, out.shape[1])])
        return out


def shard_experts(gm: torch.fx.GraphModule, ep: int) -> list[str]:
    """Replace every grouped expert matmul of `gm` by an `ExpertParallelMatmul` over `ep` ranks, in place.

    Returns the expert parameters (get_attr targets) now sharded on dim 0. Matmuls whose weight is not
    a parameter (through dim-0-preserving views) are left as they are."""
    weights: list[str] = []
    targets: list[str] = []
    for index, node in enumerate(list(gm.graph.nodes)):
        if not is_expert_matmul(node):
            continue
        weight = expert_weight_of(node)
        if weight is None:
            continue
        w = node.args[1].meta["val"]
        name = f"expert_parallel_{index}"
        gm.add_submodule(name, ExpertParallelMatmul(kernel=op_name(node.target), num_experts=int(w.shape[0]),
                                                    ep=ep, weight=weight))
        offs = node.args[2] if len(node.args) > 2 else node.kwargs["offs"]
        # the node becomes the call in place: blocks and regions know it by its name
        node.op, node.target, node.args, node.kwargs = "call_module", name, (node.args[0], node.args[1], offs), {}
        targets.append(name)
        if weight not in weights:
            weights.append(weight)
    gm.graph.lint()
    gm.recompile()
    if targets:
        gm.meta[EXPERT_PARALLEL_META_KEY] = ExpertParallelInfo(ep=ep, modules=tuple(targets), weights=tuple(weights))
    return weights


def expert_modules(gm: torch.nn.Module) -> list[ExpertParallelMatmul]:
    return [m for m in gm.modules() if isinstance(m, ExpertParallelMatmul)]


def localize(gm: torch.fx.GraphModule, ep_rank: int) -> None:
    """Keep only ep rank `ep_rank`'s block of every expert parameter of `gm` (in place): the module a
    process of that ep index runs."""
    modules = expert_modules(gm)
    for weight in dict.fromkeys(m.weight for m in modules):
        ep = next(m.ep for m in modules if m.weight == weight)
        full = gm.get_parameter(weight)
        per_rank = full.shape[0] // ep
        block = torch.nn.Parameter(full.detach()[ep_rank * per_rank:(ep_rank + 1) * per_rank].clone(),
                                   requires_grad=full.requires_grad)
        owner, _, leaf = weight.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, block)
    for m in modules:
        m.ep_rank = ep_rank
    info = expert_parallel_info(gm)
    if info is not None:
        gm.meta[EXPERT_PARALLEL_META_KEY] = dataclasses.replace(info, ep_rank=ep_rank)


def attach_expert_group(gm: torch.nn.Module, group) -> None:
    """Make every expert-parallel matmul of `gm` talk over `group` (its ep group)."""
    for m in expert_modules(gm):
        if dist.get_world_size(group) != m.ep:
            raise ValueError(f"process group has {dist.get_world_size(group)} ranks but {m.weight} is sharded "
                             f"for ep={m.ep}")
        m.process_group = group


def expert_parameter_names(gm: torch.nn.Module) -> set[str]:
    """Attribute paths of the parameters `gm`'s expert-parallel matmuls shard."""
    return {m.weight for m in expert_modules(gm)}


__all__ = ["ExpertLayer", "ExpertParallelMatmul", "attach_expert_group", "dispatch_bytes", "expert_layers",
           "expert_weight_casts",
           "expert_modules", "expert_parameter_names", "is_expert_matmul", "localize", "shard_experts"]
