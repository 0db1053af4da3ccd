"""Checkpoints of a distributed run, keyed by the model's own parameter names.

`state_dict()` holds this rank's tensors (its stage's parameters and buffers);
a full state dict can be gathered on rank 0 and a full state dict can be loaded
(each rank takes its own names). On disk, each rank writes one file of plain
tensors (`torch.save`) and rank 0 a JSON manifest; everything is read back with
`torch.load(weights_only=True)`. (torch.distributed.checkpoint was not used:
its metadata file is read with pickle.)
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

from autopart.errors import InputError
from autopart.passes.codegen import StageInterface

MANIFEST = "autopart_checkpoint.json"


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective over its mesh), else itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _entries(interface: StageInterface) -> list[tuple[str, str, bool]]:
    """(attribute path, original name, is parameter) of a stage's tensors."""
    return [(p, n, True) for p, n in interface.parameters] + [(p, n, False) for p, n in interface.buffers]


def load_into(module: torch.nn.Module, interface: StageInterface, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy this stage's tensors out of a full (or partial, covering it) state dict, checking names and shapes."""
    with torch.no_grad():
        for path, name, is_param in _entries(interface):
            if name not in state_dict:
                raise InputError(f"state dict has no entry {name!r}, which stage {interface.stage} holds; "
                                 "load a checkpoint of this model (names as model.named_parameters() gives them)")
            target = module.get_parameter(path) if is_param else module.get_buffer(path)
            value = state_dict[name]
            if tuple(value.shape) != tuple(target.shape):
                raise InputError(f"state dict entry {name!r} has shape {tuple(value.shape)} but the plan's "
                                 f"stage {interface.stage} holds {tuple(target.shape)}; the checkpoint is of "
                                 "another model or configuration")
            value = value.to(device=local_tensor(target).device, dtype=target.dtype)
            if target is not local_tensor(target):  # a DTensor: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, target.device_mesh, target.placements).to_local()
            local_tensor(target).copy_(value)


class StateMixin:
    """Checkpoint methods of DistributedRunner (needs .module, .interface, .rank, .coords)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's tensors under their original names."""
        out: dict[str, torch.Tensor] = {}
        for path, name, is_param in _entries(self.interface):
            tensor = self.module.get_parameter(path) if is_param else self.module.get_buffer(path)
            out[name] = full_tensor(tensor.detach())
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (CPU tensors); None on other ranks."""
        state = self.state_dict()  # every rank: gathering FSDP shards is a collective
        local = {k: v.cpu() for k, v in state.items()} if self.coords.dp_index == 0 else {}
        gathered: list[Any] = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if self.rank != 0:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in gathered:
            full.update(part)
        return full

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (the same on every rank); each rank takes its own tensors."""
        load_into(self.module, self.interface, state_dict)

    def save(self, directory: str) -> None:
        """Write this rank's tensors to `directory` (one file per pipeline stage, plus a manifest)."""
        os.makedirs(directory, exist_ok=True)
        state = {k: v.cpu() for k, v in self.state_dict().items()}  # collective under FSDP
        if self.coords.dp_index == 0:
            torch.save(state, os.path.join(directory, f"stage{self.interface.stage:03d}.pt"))
        if self.rank == 0:
            manifest = {"format": 1, "num_stages": self.interface.num_stages,
                        "model_class": self.plan.model_class}
            with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
        dist.barrier()

    def load(self, directory: str) -> None:
        """Read back what `save` wrote (weights_only=True) and load this rank's tensors."""
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise InputError(f"{directory!r} holds no autopart checkpoint ({MANIFEST} missing)")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        state: dict[str, torch.Tensor] = {}
        for stage in range(manifest["num_stages"]):
            state.update(torch.load(os.path.join(directory, f"stage{stage:03d}.pt"), weights_only=True,
                                    map_location="cpu"))
        load_into(self.module, self.interface, state)
