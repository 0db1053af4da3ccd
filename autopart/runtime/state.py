"""Checkpoints of a distributed run, keyed by the model's own parameter names.

`state_dict()` holds this rank's tensors (its stage's parameters and buffers);
a full state dict can be gathered on rank 0 and a full state dict can be loaded
(each rank takes its own names). Checkpoints on disk are sharded
(runtime/checkpoint.py); checkpoints of format 1 (rank 0's gathered model.pt
and a JSON manifest) are still read, with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

from autopart.core.errors import InputError
from autopart.core.interfaces import ParamSlice, StageInterface, expert_parallel_info, tp_rank_info

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


def _tp_slices(module: torch.nn.Module) -> dict[str, ParamSlice]:
    """Attribute path -> ParamSlice for a tensor-parallel rank module (empty otherwise)."""
    info = tp_rank_info(module)
    return {piece.name: piece for piece in info.params} if info is not None else {}


def load_into(module: torch.nn.Module, interface: StageInterface, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy this rank's tensors out of a full state dict (its tp slices of it), checking names and shapes."""
    slices = _tp_slices(module)
    with torch.no_grad():
        for path, name, is_param in _entries(interface):
            if name not in state_dict:
                raise InputError(f"state dict has no entry {name!r}, which stage {interface.stage} holds; "
                                 "load a checkpoint of this model (names as model.named_parameters() gives them)")
            target = module.get_parameter(path) if is_param else module.get_buffer(path)
            value = state_dict[name]
            piece = slices.get(path)
            if piece is not None and piece.dim is not None and value.dim() > piece.dim \
                    and value.shape[piece.dim] == target.shape[piece.dim] * piece.tp:
                value = piece.take(value)
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
    """Checkpoint methods of DistributedRunner (needs .local_stages: [(module, interface)], .rank, .coords)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's tensors under their original names (its tp slice of a split parameter)."""
        out: dict[str, torch.Tensor] = {}
        for module, interface in self.local_stages:
            for path, name, is_param in _entries(interface):
                tensor = module.get_parameter(path) if is_param else module.get_buffer(path)
                out[name] = full_tensor(tensor.detach())
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (CPU tensors); None on other ranks."""
        state = self.state_dict()  # every rank: gathering FSDP shards is a collective
        piece_of = {name: _tp_slices(module).get(path) for module, interface in self.local_stages
                    for path, name, _ in _entries(interface)}
        expert_block = {}  # expert parallelism: name -> this rank's index among the ep blocks
        for module, interface in self.local_stages:
            info = expert_parallel_info(module)
            if info is not None and info.ep_rank is not None:
                expert_block.update({name: info.ep_rank for path, name, _ in _entries(interface)
                                     if path in info.weights})
        local = {}
        for name, tensor in state.items():
            if name in expert_block:  # the first ep replicas hold the blocks between them
                if self.coords.dp_index < self.plan.mesh.ep:
                    local[name] = (tensor.cpu(), ("ep", expert_block[name]))
            elif self.coords.dp_index == 0:
                piece = piece_of[name]
                local[name] = (tensor.cpu(), piece if piece is not None and piece.dim is not None else None)
        gathered: list[Any] = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if self.rank != 0:
            return None
        pieces: dict[str, list[tuple[torch.Tensor, Any]]] = {}
        for part in gathered:
            for name, entry in part.items():
                pieces.setdefault(name, []).append(entry)
        full: dict[str, torch.Tensor] = {}
        for name, entries in pieces.items():
            if entries[0][1] is None:  # whole on every holder (replicas, tied copies): any one
                full[name] = entries[0][0]
            elif isinstance(entries[0][1], tuple):  # expert blocks, in ep order along the expert dim
                by_block = {block: tensor for tensor, (_, block) in entries}
                full[name] = torch.cat([by_block[b] for b in sorted(by_block)])
            else:  # tp slices: one per tp index, merged along the split dim
                by_index = {piece.index: tensor for tensor, piece in entries}
                full[name] = entries[0][1].merge([by_index[i] for i in sorted(by_index)])
        return full

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (the same on every rank); each rank takes its own tensors."""
        for module, interface in self.local_stages:
            load_into(module, interface, state_dict)

    def _load_gathered_v1(self, directory: str) -> None:
        """Read a checkpoint of format 1 (the whole model gathered into model.pt, weights_only=True)."""
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise InputError(f"{directory!r} holds no autopart checkpoint ({MANIFEST} missing)")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != 1:
            raise InputError(f"{path}: checkpoint format {manifest.get('format')!r} is not supported")
        state = torch.load(os.path.join(directory, "model.pt"), weights_only=True, map_location="cpu")
        self.load_full_state_dict(state)
