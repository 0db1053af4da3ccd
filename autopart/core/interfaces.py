"""What the runtimes know of a compiled model besides the Plan.

The compiler hands the runtimes rank modules (torch.fx GraphModules) and, on
the `CompiledModel`, the facts needed to run them. Those facts are declared
here, as plain dataclasses, so that the runtimes never import the tracer or
the passes that write them:

- `IOSpec` (written by autopart/tracing.py): how a call's (args, kwargs)
  flatten into the graph's placeholders, how the flat outputs rebuild the
  model's output, and an example (meta) value of every flat input;
- `StageInterface` (passes/codegen.py): where each input of a stage module
  comes from, which model outputs it returns, and which original parameter
  each of its attributes copies;
- `TPRankInfo` and `ParamSlice` (passes/tensor_parallel/shard.py): which slice
  of each parameter a tensor-parallel rank module holds, with the layout that
  cuts and joins slices (`take_shard`, `merge_shards`), and which of its nodes
  are collectives;
- `RegionInfo` (passes/regions.py): a block of a stage nested as a submodule,
  how it recomputes its activations, and whether it owns its parameters (an
  FSDP unit of its own).

Each travels in its module's ``meta`` under one of the keys below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from autopart.core.errors import PlanError, TraceError

IO_META_KEY = "autopart_io"
"""GraphModule meta: the traced graph's `IOSpec`."""
STAGE_INTERFACE_META_KEY = "autopart_stage_interface"
"""GraphModule meta: a stage module's `StageInterface`."""
TP_RANK_META_KEY = "autopart_tp_rank"
"""GraphModule meta: a tensor-parallel rank module's `TPRankInfo`."""
REGION_META_KEY = "autopart_region"
"""GraphModule meta: a region submodule's `RegionInfo`."""


# ----------------------------------------------------------------------------- inputs and outputs


@dataclass(frozen=True, kw_only=True)
class IOSpec:
    """How the flat placeholders and outputs map to the model's own structures."""

    in_spec: pytree.TreeSpec
    """Spec of ((args...), {kwargs}) whose leaves are the placeholders, in order."""
    out_spec: pytree.TreeSpec
    """Spec that rebuilds the model's output from the graph's flat output tuple."""
    tracer: str
    """'export' or 'symbolic_trace'."""
    model_class: str
    """Qualified class name of the traced model."""
    default_kwargs: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments autopart added at trace time (e.g. use_cache=False)."""
    example_inputs: tuple[Any, ...] = ()
    """Per flat input, as traced (one microbatch): a meta-device tensor of its shape and dtype,
    or the constant itself."""

    def flatten(self, args: tuple, kwargs: dict | None) -> list[Any]:
        """A call's (args, kwargs) as the graph's flat placeholders (defaults added, keywords in traced order)."""
        kwargs = {**dict(self.default_kwargs), **dict(kwargs or {})}
        expected = self.in_spec
        traced_keys = expected.child(1).context if expected.num_children == 2 else None
        if traced_keys is not None and set(traced_keys) == set(kwargs):
            kwargs = {key: kwargs[key] for key in traced_keys}
        flat, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != expected:
            raise TraceError(
                f"inputs have structure {spec} but the model was traced with {expected}; "
                "call with the same arguments (positions, keywords, nesting) as example_inputs."
            )
        return flat

    def unflatten(self, flat_outputs: Sequence[Any]) -> Any:
        """The model's own output structure from the graph's flat outputs."""
        return pytree.tree_unflatten(list(flat_outputs), self.out_spec)


def io_spec(gm: torch.fx.GraphModule) -> IOSpec:
    """The `IOSpec` that `autopart.trace` stored on `gm`."""
    spec = gm.meta.get(IO_META_KEY)
    if spec is None:
        raise TraceError("graph has no IO spec: build it with autopart.trace(model, args)")
    return spec


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True, kw_only=True)
class InputSource:
    """Where one placeholder of a stage gets its value."""

    kind: str
    """'model_input' (flat model input `index`) or 'previous_stage' (output `index` of stage - 1)."""
    index: int


@dataclass(frozen=True, kw_only=True)
class StageInterface:
    """How a stage module connects to its neighbours and to the model."""

    stage: int
    num_stages: int
    """Model stages of the plan (pipeline ranks × virtual stages)."""
    inputs: tuple[InputSource, ...]
    """One per placeholder, in order."""
    output_names: tuple[str, ...]
    """Graph value each returned tensor carries, in order."""
    model_outputs: tuple[int, ...]
    """Last stage only: for each flat model output, its index in this stage's outputs."""
    parameters: tuple[tuple[str, str], ...]
    """(attribute path in this module, original parameter name) for each parameter copy."""
    buffers: tuple[tuple[str, str], ...]
    """(attribute path, original buffer name) for each buffer copy."""


def stage_interface(gm: torch.fx.GraphModule) -> StageInterface:
    """The `StageInterface` codegen stored on a stage (or tensor-parallel rank) module."""
    interface = gm.meta.get(STAGE_INTERFACE_META_KEY)
    if interface is None:
        raise PlanError("module has no stage interface: build rank modules with passes.codegen.stage_modules")
    return interface


# ----------------------------------------------------------------------------- tensor-parallel slices


def take_shard(x: torch.Tensor, dim: int, groups: int, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of every one of `groups` equal chunks of `dim`.

    The layout of `Shard(dim, groups)` (passes/tensor_parallel/placements.py):
    dimension `dim` is cut into `groups` chunks and each chunk into `tp` pieces;
    rank r holds piece r of every chunk, concatenated.
    """
    size = x.shape[dim]
    if size % (groups * tp):
        raise ValueError(f"dim {dim} of shape {tuple(x.shape)} does not split into {groups} groups × {tp} ranks")
    pieces = x.unflatten(dim, (groups, tp, size // (groups * tp))).select(dim + 1, rank)
    return pieces.flatten(dim, dim + 1).contiguous()


def merge_shards(pieces: Sequence[torch.Tensor], dim: int, groups: int) -> torch.Tensor:
    """Inverse of `take_shard` over all ranks: the full tensor from every rank's piece, in rank order."""
    size = pieces[0].shape[dim]
    split = [p.unflatten(dim, (groups, size // groups)) for p in pieces]
    return torch.stack(split, dim=dim + 1).flatten(dim, dim + 2)


@dataclass(frozen=True, kw_only=True)
class ParamSlice:
    """Which part of an original parameter a rank module holds."""

    name: str
    """Original parameter name (the get_attr target, e.g. 'blocks.0.mlp_fc.weight')."""
    dim: int | None
    """Sharded dimension, or None when the rank holds the whole parameter."""
    groups: int = 1
    """Chunks of `dim` (see `take_shard`)."""
    index: int = 0
    """This rank's piece."""
    tp: int = 1

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the whole parameter `full`."""
        return full if self.dim is None else take_shard(full, self.dim, self.groups, self.tp, self.index)

    def merge(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole parameter from every tp rank's piece, in rank order (sharded slices only)."""
        if self.dim is None:
            raise ValueError(f"parameter {self.name} is whole on every rank: there is nothing to merge")
        return merge_shards(pieces, self.dim, self.groups)


@dataclass(frozen=True, kw_only=True)
class TPRankInfo:
    """What a tensor-parallel rank module is: its rank, the axis size, its slices and collectives."""

    rank: int
    tp: int
    params: tuple[ParamSlice, ...]
    collectives: tuple[str, ...] = ()
    """call_module targets of its collective nodes; each submodule has `attach(group)` (run on a
    process group) and `across_ranks(values)` (run every rank's values at once, in one process)."""


def tp_rank_info(gm: torch.nn.Module) -> TPRankInfo | None:
    """The `TPRankInfo` of a tensor-parallel rank module, or None for a module that is not one."""
    return getattr(gm, "meta", {}).get(TP_RANK_META_KEY)


# ----------------------------------------------------------------------------- expert parallelism

EXPERT_PARALLEL_META_KEY = "autopart_expert_parallel"


@dataclass(frozen=True, kw_only=True)
class ExpertParallelInfo:
    """A rank module whose experts are split over an ep group (passes/expert_parallel.py)."""

    ep: int
    modules: tuple[str, ...]
    """call_module targets of its expert-parallel matmuls; each has `process_group` (None: the
    one-process simulation, where the weights are whole) and `ep_rank`."""
    weights: tuple[str, ...]
    """Attribute paths of the expert parameters (dim 0 split over the ep group)."""
    ep_rank: int | None = None
    """This module's index in its ep group once it holds only its block of the experts."""


def expert_parallel_info(gm: torch.nn.Module) -> ExpertParallelInfo | None:
    """The `ExpertParallelInfo` of a rank module, or None where no expert is split."""
    return getattr(gm, "meta", {}).get(EXPERT_PARALLEL_META_KEY)


# ----------------------------------------------------------------------------- regions


@dataclass(frozen=True, kw_only=True)
class RegionInfo:
    """A block of a stage module run as one submodule (passes/regions.py)."""

    block: str
    """Name of the planner's block (Plan.stages[i].blocks) the region computes."""
    recompute: str
    """'none', 'selective' or 'full' (autopart/recompute.py)."""
    owns_parameters: bool
    """Whether the region holds the block's parameters under their own paths (it then is an FSDP
    unit of its own under ZeRO-3); False: they stay with the stage and come in as arguments."""


def region_info(module: torch.nn.Module) -> RegionInfo | None:
    """The `RegionInfo` of a region submodule, or None for any other module."""
    return getattr(module, "meta", {}).get(REGION_META_KEY) if isinstance(module, torch.fx.GraphModule) else None


def regions(module: torch.nn.Module) -> list[tuple[str, torch.fx.GraphModule]]:
    """(path, module) of every region submodule of a stage module, in registration order."""
    return [(path, sub) for path, sub in module.named_modules() if region_info(sub) is not None]
