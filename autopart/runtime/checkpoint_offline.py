"""Checkpoints in one process: a plain model, consolidation, and Hugging Face safetensors.

- `save_module` / `load_module`: a plain `nn.Module` (and its optimizer)
  written or read in the sharded format, so a checkpoint of a plan resumes
  on one device without torch.distributed, and the other way round;
- `load_compiled`: the same into every rank module of a CompiledModel, for
  `cm.simulate` in one process;
- `read_entries`: every entry of a checkpoint as a whole tensor, by name;
- `export_hf`: the model's weights as `model.safetensors` (sharded with
  `model.safetensors.index.json` past `max_shard_bytes`) under the original
  names, which `from_pretrained` loads (save the config beside them);
- `hf_index`: a Hugging Face safetensors directory seen as a checkpoint index
  (one whole piece per tensor), so `runner.load_hf` reads it with the same
  row-wise reader as a checkpoint: each rank only the rows of its slices.

Reading a tensor whole holds that one tensor; nothing holds the model at once.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from autopart.core.errors import InputError
from autopart.runtime.checkpoint_store import (
    FORMAT, VERSION, PieceReader, _read_json, _write_json_atomic, commit, encode_extra, partial_dir, piece_key,
    rank_file, read_extra, read_index, refuse_to_replace, remove_partials, write_rank,
)
from autopart.runtime.safetensors_file import DTYPES, Deferred, SafetensorsFile, dtype_name, write_file

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def _module_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**{f"model/{n}": p for n, p in model.named_parameters()},
            **{f"model/{n}": b for n, b in model.named_buffers()}}


def save_module(path: str, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                extra: Any = None, step: int | None = None) -> None:
    """Write a plain model (and optimizer) as a checkpoint that any plan of the model loads."""
    refusal = refuse_to_replace(path)
    if refusal:
        raise InputError(refusal)
    token = f"{time.time_ns():x}-{os.getpid()}"
    directory = partial_dir(path, token)
    remove_partials(path, token)
    os.makedirs(directory)
    entries = dict(_module_entries(model))
    kinds, values = {}, {}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names[id(param)]
                for key, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        kinds[key] = "scalar" if value.dim() == 0 else "param"
                        entries[f"optim/{key}/{name}"] = value
                    else:
                        values.setdefault(name, {})[key] = value
    tensors = {key: {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                     "pieces": [{"file": rank_file(0), "key": piece_key(key, [0] * t.dim()),
                                 "offsets": [0] * t.dim(), "sizes": list(t.shape)}]}
               for key, t in entries.items()}
    writes = [(piece_key(key, [0] * t.dim()), t.detach()) for key, t in entries.items()]
    extra_tensors: dict[str, torch.Tensor] = {}
    encoded = encode_extra(extra, extra_tensors) if extra is not None else None
    write_rank(directory, 0, writes + list(extra_tensors.items()),
               {"rng": {"default": None, "streams": {}}, "state_kinds": kinds, "state_values": values})
    marker = _read_json(os.path.join(directory, "rank00000.json"))
    for key, info in tensors.items():
        info["pieces"][0]["crc32"] = marker["crc32"][info["pieces"][0]["key"]]
    index = {"format": FORMAT, "version": VERSION, "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
             "step": step, "saved_at_ns": time.time_ns(), "layout": None, "tensors": tensors, "extra": encoded,
             "files": {marker["file"]: marker["bytes"]}, "rng": {},
             "other_crc32": {marker["file"]: {k: v for k, v in marker["crc32"].items() if k.startswith("extra/")}},
             "optimizer": None if optimizer is None else {
                 "class": type(optimizer).__name__, "state_kinds": kinds, "state_values": values,
                 "param_groups": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
                                  for g in optimizer.param_groups]}}
    commit(directory, path, index, token)


def read_entries(path: str, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """Every entry whose key starts with `prefix`, whole, keyed without the prefix."""
    directory, index = read_index(path)
    with PieceReader(directory, index) as reader:
        return {key[len(prefix):]: reader.whole(key) for key in index["tensors"] if key.startswith(prefix)}


def load_module(path: str, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Load a checkpoint of any plan into a plain model (and optimizer); returns its `extra`."""
    directory, index = read_index(path)
    entries = _module_entries(model)
    saved = {k for k in index["tensors"] if k.startswith("model/")}
    missing, unexpected = sorted(set(entries) - saved), sorted(saved - set(entries))
    shapes = [f"{k[6:]}: saved {tuple(index['tensors'][k]['shape'])}, this model {tuple(t.shape)}"
              for k, t in entries.items() if k in saved and tuple(index["tensors"][k]["shape"]) != tuple(t.shape)]
    if missing or unexpected or shapes:
        raise InputError(f"the checkpoint at {directory} is of another model: missing {[k[6:] for k in missing][:5]}, "
                         f"not in this model {[k[6:] for k in unexpected][:5]}, shapes differ {shapes[:5]}")
    if optimizer is not None and index.get("optimizer") is None:
        raise InputError(f"the checkpoint at {directory} holds no optimizer state; load it with optimizer=None")
    with PieceReader(directory, index) as reader, torch.no_grad():
        for key, tensor in entries.items():
            tensor.copy_(reader.whole(key))
        if optimizer is not None:
            saved_optimizer = index["optimizer"]
            names = {id(p): n for n, p in model.named_parameters()}
            for group, saved_group in zip(optimizer.param_groups, saved_optimizer["param_groups"]):
                for key, value in saved_group.items():
                    group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
                for param in group["params"]:
                    name = names[id(param)]
                    state: dict[str, Any] = {}
                    for key, kind in saved_optimizer["state_kinds"].items():
                        if f"optim/{key}/{name}" in index["tensors"]:
                            value = reader.whole(f"optim/{key}/{name}")
                            state[key] = value if kind == "scalar" else value.to(param.device)
                    state.update(saved_optimizer["state_values"].get(name, {}))
                    if state:
                        optimizer.state[param] = state
    return read_extra(directory, index)


def load_compiled(path: str, compiled) -> Any:
    """Load a checkpoint of any plan into every rank module of a CompiledModel in this process (what
    `cm.simulate` and `cm.simulate_train_step` run); returns its `extra`."""
    from autopart.runtime.checkpoint_layout import boxes_of
    from autopart.runtime.state import _tp_slices

    directory, index = read_index(path)
    targets = []
    for stage, interface in enumerate(compiled.interfaces):
        for tp_index in range(compiled.plan.mesh.tp):
            module = compiled.stage_module(stage, tp_index)
            slices = _tp_slices(module)
            targets += [(f"model/{name}", module.get_parameter(attr), slices.get(attr)) for attr, name in interface.parameters]
            targets += [(f"model/{name}", module.get_buffer(attr), slices.get(attr)) for attr, name in interface.buffers]
    saved = {k for k in index["tensors"] if k.startswith("model/")}
    expected = {key for key, _, _ in targets}
    shapes = sorted({f"{key[6:]}: saved {tuple(index['tensors'][key]['shape'])}, this model {full}"
                     for key, tensor, piece in targets if key in saved
                     for full in [boxes_of(tensor, piece)[0]] if tuple(index["tensors"][key]["shape"]) != full})
    if expected - saved or saved - expected or shapes:
        raise InputError(f"the checkpoint at {directory} is of another model: missing "
                         f"{sorted(k[6:] for k in expected - saved)[:5]}, not in this model "
                         f"{sorted(k[6:] for k in saved - expected)[:5]}, shapes differ {shapes[:5]}")
    with PieceReader(directory, index) as reader, torch.no_grad():
        for key, tensor, piece in targets:
            for box in boxes_of(tensor, piece)[1]:
                reader.fill(key, tensor, box)
    return read_extra(directory, index)


# ----------------------------------------------------------------------------- Hugging Face


def export_hf(path: str, out_dir: str, *, max_shard_bytes: int = 5 << 30, dtype: torch.dtype | None = None) -> list[str]:
    """Write a checkpoint's weights as Hugging Face safetensors in `out_dir`; returns the files written.

    One tensor is read at a time. Weights keep their dtype unless `dtype` is given.
    """
    directory, index = read_index(path)
    names = sorted(k for k in index["tensors"] if k.startswith("model/"))
    os.makedirs(out_dir, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key in names:
        info = index["tensors"][key]
        nbytes = torch.Size(info["shape"]).numel() * (dtype or DTYPES[info["dtype"]]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    files = [HF_WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                   for i in range(len(shards))]
    with PieceReader(directory, index) as reader:
        for file, keys in zip(files, shards):
            def fetch(key=None):
                return reader.whole(key) if dtype is None else reader.whole(key).to(dtype)

            entries = [(key[len("model/"):], Deferred(shape=tuple(index["tensors"][key]["shape"]),
                                                     dtype=dtype or DTYPES[index["tensors"][key]["dtype"]],
                                                     fetch=lambda key=key: fetch(key)))
                       for key in keys]
            write_file(os.path.join(out_dir, file), entries, {"format": "pt"}, checksums=False)
    if len(files) > 1:
        total = sum(torch.Size(index["tensors"][k]["shape"]).numel() * (dtype or DTYPES[index["tensors"][k]["dtype"]]).itemsize
                    for k in names)
        _write_json_atomic(os.path.join(out_dir, HF_INDEX), {
            "metadata": {"total_size": total},
            "weight_map": {key[len("model/"):]: file for file, keys in zip(files, shards) for key in keys}})
    return files


def hf_index(directory: str) -> dict:
    """A directory of Hugging Face safetensors as a checkpoint index of whole pieces (names as in the files)."""
    index_path = os.path.join(directory, HF_INDEX)
    if os.path.exists(index_path):
        files = sorted(set(_read_json(index_path)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, HF_WEIGHTS)):
        files = [HF_WEIGHTS]
    else:
        raise InputError(f"{directory!r} holds no Hugging Face safetensors weights ({HF_WEIGHTS} or {HF_INDEX})")
    tensors: dict[str, dict] = {}
    for file in files:
        with SafetensorsFile(os.path.join(directory, file)) as reader:
            for key, entry in reader.entries.items():
                tensors[f"model/{key}"] = {"shape": list(entry.shape), "dtype": dtype_name(entry.dtype),
                                           "pieces": [{"file": file, "key": key, "offsets": [0] * len(entry.shape),
                                                       "sizes": list(entry.shape)}]}
    return {"format": "huggingface-safetensors", "tensors": tensors}

