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


def wrap_data_parallel(adapter: nn.Module, groups: MeshGroups, device: torch.device, plan,
                       ignored: set[nn.Parameter] | None = None) -> nn.Module:
    """The stage replicated over its dp group as the plan says (see the module docstring).

    `ignored`: parameters the wrappers leave alone (expert blocks under expert parallelism, whose
    gradients the runner sums over their own group; they stay whole and float32 on their rank)."""
    ignored = ignored or set()
    mode = data_parallel_mode(plan)
    if shards_state(mode):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=autocast_dtype(plan.mixed_precision), reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
                  if plan.mixed_precision else MixedPrecisionPolicy())
        mesh = device_mesh(groups, device, plan)
        reshard = reshards_parameters(mode)
        if reshard:
            for _, region in regions(getattr(adapter, "module", adapter)):
                if region_info(region).owns_parameters:
                    fully_shard(region, mesh=mesh, reshard_after_forward=True, mp_policy=policy,
                                ignored_params=ignored or None)
        return fully_shard(adapter, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy,
                           ignored_params=ignored or None)
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
