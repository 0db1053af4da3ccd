"""Replicate a stage over its data-parallel group the way the plan says, with PyTorch's own wrappers.

- 'ddp' with one stage per replica (pp = 1): DistributedDataParallel, whose
  bucketed all-reduce overlaps the last backward. With several stages: FSDP2's
  `replicate`, the DDP that torch.distributed.pipelining drives (it triggers
  the reduction once per step). DistributedDataParallel is not used there: its
  bucket order is recorded twice when the pipeline's shape inference calls it
  outside `no_sync` (reducer assert), and the zero-bubble weight pass writes
  `.grad` past its hooks, so gradients would silently not be averaged.
- 'zero2': FSDP2 `fully_shard` of the whole stage, parameters kept unsharded
  between forward and backward (reshard_after_forward=False).
- 'zero3': `fully_shard` of every region that owns its block's parameters
  (passes/regions.py), then of the stage, all with reshard_after_forward=True:
  each block's parameters are gathered for its forward and again for its
  backward (FSDP2 prefetches the next block's), and freed in between.
- 'hsdp': 'zero3' on a 2-D DeviceMesh (replicate across hosts, shard within
  one), FSDP2's hybrid sharding.

Under mixed precision FSDP gathers bf16 parameters and reduces float32
gradients (`MixedPrecisionPolicy`); boundary inputs keep their planned dtypes.

Expert parallelism: each rank holds its ep group's block of every expert weight. Under
'zero2'/'zero3'/'hsdp' those blocks are sharded too, over the expert-data-parallel group (edp:
the replicas holding the same experts), by the same `fully_shard` calls: FSDP2's per-parameter
mesh (`shard_placement_fn` returning the edp mesh for an expert block; torchtitan shards its
experts over the same group). Their gradients are reduce-scattered over edp and divided by dp,
not edp: the all-to-alls' backward has already summed the ep group's tokens into them, so the
mean over all replicas' losses is the edp sum over dp. Under 'hsdp' they shard over all of edp.
Under 'ddp' (or an edp of one replica) the wrappers leave them alone and the runner sums their
gradients over edp itself.
"""

from __future__ import annotations

import torch
from torch import nn

from autopart.core.errors import InputError
from autopart.core.interfaces import region_info, regions
from autopart.core.plan import autocast_dtype
from autopart.core.modes import data_parallel_mode_name, reshards_parameters, shards_state
from autopart.runtime.mesh import MeshGroups


def data_parallel_mode(plan) -> str:
    """The plan's mode under its current name ('fsdp' of older plans is 'zero2')."""
    try:
        return data_parallel_mode_name(plan.data_parallel_mode)
    except ValueError as error:
        raise InputError(f"the plan's {error}; re-plan") from error


def experts_sharded_over_edp(plan) -> bool:
    """Whether FSDP shards the expert blocks over edp (module docstring): a sharding mode, ep > 1, and
    more than one replica holding each block."""
    return shards_state(data_parallel_mode(plan)) and plan.mesh.ep > 1 and plan.mesh.dp // plan.mesh.ep > 1


def wrap_data_parallel(adapter: nn.Module, groups: MeshGroups, device: torch.device, plan,
                       experts: set[nn.Parameter] | None = None) -> nn.Module:
    """The stage replicated over its dp group as the plan says (see the module docstring).

    `experts`: this rank's expert blocks (expert parallelism): sharded over edp where
    `experts_sharded_over_edp`, else left alone (whole and float32 on their rank, their gradients
    summed by the runner)."""
    experts = experts or set()
    mode = data_parallel_mode(plan)
    if shards_state(mode):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=autocast_dtype(plan.mixed_precision), reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
                  if plan.mixed_precision else MixedPrecisionPolicy())
        mesh = device_mesh(groups, device, plan)
        reshard = reshards_parameters(mode)
        over_edp = bool(experts) and experts_sharded_over_edp(plan)
        placement = _expert_placement(experts, groups, device) if over_edp else None
        options = dict(mp_policy=policy, ignored_params=None if over_edp or not experts else experts,
                       shard_placement_fn=placement)
        if reshard:
            for _, region in regions(getattr(adapter, "module", adapter)):
                if region_info(region).owns_parameters:
                    fully_shard(region, mesh=mesh, reshard_after_forward=True, **options)
        wrapped = fully_shard(adapter, mesh=mesh, reshard_after_forward=reshard, **options)
        if over_edp:
            _divide_expert_gradients_by(wrapped, placement.mesh_info, plan.mesh.dp)
        return wrapped
    ignored = experts
    if plan.num_stages == 1:
        from torch.nn.parallel import DistributedDataParallel

        if ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                adapter, [name for name, p in adapter.named_parameters() if p in ignored])
        return DistributedDataParallel(adapter, process_group=groups.dp,
                                       device_ids=[device] if device.type == "cuda" else None)
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError as error:
        raise InputError(f"this torch {torch.__version__} lacks FSDP2's replicate, which data parallelism "
                         "of a pipeline needs in 'ddp' mode; re-plan with data_parallel_mode='zero2'") from error
    return replicate(adapter, mesh=_one_dim_mesh(groups.dp, device), ignored_params=ignored or None)


def _expert_placement(experts: set[nn.Parameter], groups: MeshGroups, device: torch.device):
    """FSDP2's `shard_placement_fn`: an expert block on dim 0 of the edp mesh, anything else as the
    stage's mesh says. One FSDPMeshInfo for all expert blocks (FSDP2 groups parameters by it)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, ShardPlacementResult
    from torch.distributed.tensor import Shard

    info = FSDPMeshInfo(mesh=_one_dim_mesh(groups.edp, device), shard_mesh_dim=0)

    def placement(param: nn.Parameter):
        return ShardPlacementResult(placement=Shard(0), mesh_info=info) if param in experts else None

    placement.mesh_info = info
    return placement


def _divide_expert_gradients_by(root: nn.Module, expert_mesh_info, factor: int) -> None:
    """Reduce the expert groups' gradients as a sum over edp divided by `factor` (dp), the others as
    FSDP does (a mean over their mesh). FSDP2 offers the divide factor per module
    (`set_gradient_divide_factor`); an expert group shares its module with dense parameters, so it
    is set on the group (FSDPParamGroup.gradient_divide_factor, which that method sets). A custom factor
    reduces with NCCL's PreMulSum, which gloo lacks: the group reduces with SUM and scales apart
    (`force_sum_reduction_for_comms`, as `set_force_sum_reduction_for_comms` sets it)."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if group.mesh_info is expert_mesh_info:
                    group.gradient_divide_factor = float(factor)
                    group.force_sum_reduction_for_comms = True


def device_mesh(groups: MeshGroups, device: torch.device, plan):
    """The DeviceMesh FSDP shards over: the dp group, or for 'hsdp' (replicate, shard) in 2-D."""
    if data_parallel_mode(plan) != "hsdp":
        return _one_dim_mesh(groups.dp, device)
    from torch.distributed.device_mesh import DeviceMesh

    shard = plan.mesh.dp_shard
    layout = torch.tensor(groups.dp_ranks).view(plan.mesh.dp // shard, shard)
    return DeviceMesh.from_group([groups.dp_replicate, groups.dp_shard], device.type, mesh=layout,
                                 mesh_dim_names=("replicate", "shard"))


def _one_dim_mesh(group, device: torch.device):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device.type)


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether `module` is wrapped by FSDP2's fully_shard."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
