"""Sharded, resumable, crash-safe checkpoints of a DistributedRunner.

`runner.save(path, optimizer=opt, extra={...}, step=n, keep=N, async_save=False)`:
every rank writes only what it holds (its stages' parameters and buffers, its
tp slices and FSDP shards of them, the optimizer's state of those, its RNG
states), keyed by the model's original parameter names; a tensor held by
several ranks (dp replicas, tp-replicated parameters, tied copies) is written
once, by the lowest such rank. No rank holds more than its share plus the
piece being written (runtime/checkpoint_store.py has the format and the
commit protocol; runtime/checkpoint_layout.py how slices become boxes).

`runner.load(path, optimizer=opt) -> extra`: every rank reads only the rows of
the pieces that intersect its own boxes, so a checkpoint of any plan loads
into any other plan of the same model (mesh, dp mode, pipeline cuts, tp
degree, one process). RNG states (the default generator and each stage's
tensor-parallel stream, autopart/tp_random.py) are restored when the plan has
the saving plan's layout (same mesh and stages), which makes a resumed run
bit-identical to an uninterrupted one; under another layout the masks of
random ops cannot correspond and the runner keeps its fresh seeds.

Before touching anything, a load checks the index, every file's size and the
names and shapes against the plan, on every rank, and all ranks raise the
same error (the first mismatches listed). Coordination crosses a gloo group
of its own as JSON bytes (`all_gather_json`); nothing is pickled.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autopart.core.errors import AutopartError, InputError
from autopart.core.interfaces import ParamSlice
from autopart.runtime.checkpoint_layout import all_gather_json, boxes_of, local_part, tiles
from autopart.runtime.checkpoint_store import (
    FORMAT, VERSION, PieceReader, commit, encode_extra, is_gathered_v1, partial_dir, piece_key, prune, rank_file,
    read_extra, read_index, refuse_to_replace, remove_partials, resolve, wait_for_markers, write_rank,
)
from autopart.runtime.safetensors_file import DTYPES, SafetensorsFile, dtype_name
from autopart.runtime.state import _tp_slices
from autopart.core.tp_random import STREAM_ATTR

_MISMATCHES_SHOWN = 5


@dataclass(frozen=True)
class _Entry:
    """One tensor this rank holds under a checkpoint key."""

    key: str
    """'model/<name>' or 'optim/<state key>/<name>'."""
    tensor: torch.Tensor
    piece: ParamSlice | None
    writes: bool
    """Whether this copy may be written (its stage is the first holding the name)."""


@dataclass
class _PendingSave:
    thread: threading.Thread
    errors: list[str]
    path: str


class CheckpointMixin:
    """Checkpoint methods of DistributedRunner (see the module docstring)."""

    _pending_save: _PendingSave | None = None
    _ckpt_group: Any = None
    loaded_step: int | None = None
    """The `step` the last `load` read (None before a load, or when the save passed none)."""

    # ------------------------------------------------------------------ what this rank holds

    def _writer_stage(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for interface in self.compiled.interfaces:
            for _, name in [*interface.parameters, *interface.buffers]:
                first[name] = min(first.get(name, interface.stage), interface.stage)
        return first

    def _param_names(self) -> dict[int, tuple[str, ParamSlice | None, bool]]:
        """id(parameter) -> (original name, its tp slice, whether this copy writes)."""
        writer = self._writer_stage()
        names = {}
        for module, interface in self.local_stages:
            slices = _tp_slices(module)
            for path, name in interface.parameters:
                names[id(module.get_parameter(path))] = (name, slices.get(path),
                                                         writer[name] == interface.stage)
        return names

    def _model_entries(self) -> list[_Entry]:
        writer = self._writer_stage()
        entries = []
        for module, interface in self.local_stages:
            slices = _tp_slices(module)
            for path, name in interface.parameters:
                entries.append(_Entry(f"model/{name}", module.get_parameter(path), slices.get(path),
                                      writer[name] == interface.stage))
            for path, name in interface.buffers:
                entries.append(_Entry(f"model/{name}", module.get_buffer(path), slices.get(path),
                                      writer[name] == interface.stage))
        return entries

    def _optimizer_entries(self, optimizer) -> tuple[list[_Entry], dict[str, str], dict[str, dict]]:
        """(tensor entries, state key -> 'param' or 'scalar', name -> non-tensor state values)."""
        names = self._param_names()
        entries, kinds, values = [], {}, {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in names:
                    raise InputError(f"the optimizer holds a parameter of shape {tuple(param.shape)} that is not "
                                     "this runner's; build it from runner.parameters()")
                name, piece, writes = names[id(param)]
                for key, value in optimizer.state.get(param, {}).items():
                    if not isinstance(value, torch.Tensor):
                        if writes:
                            values.setdefault(name, {})[key] = _jsonable(value, f"optimizer state {key!r} of {name}")
                        continue
                    if value.dim() == 0:
                        kinds[key] = "scalar"
                        entries.append(_Entry(f"optim/{key}/{name}", value, None, writes))
                    elif tuple(value.shape) == tuple(param.shape):
                        kinds[key] = "param"
                        entries.append(_Entry(f"optim/{key}/{name}", value, piece, writes))
                    else:
                        raise InputError(f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, neither "
                                         f"the parameter's {tuple(param.shape)} nor a scalar; autopart checkpoints "
                                         "optimizers whose state is per element (SGD, Adam, AdamW, ...)")
        return entries, kinds, values

    def _layout(self) -> dict[str, Any]:
        """What must match for saved RNG states to mean the same thing in the loading run."""
        mesh = self.plan.mesh
        return {"world_size": self.world_size, "mesh": [mesh.dp, mesh.pp, mesh.tp, mesh.dp_shard],
                "num_stages": self.plan.num_stages}

    def _checkpoint_group(self):
        """A gloo group for checkpoint coordination, with room for the writes of a large model
        (a dead peer still fails it at once: gloo sees the closed connection)."""
        if self._ckpt_group is None:
            seconds = max(3 * self.timeout_s, 900.0)
            self._ckpt_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
        return self._ckpt_group

    def _gather(self, value: Any) -> list:
        return all_gather_json(value, torch.device("cpu"), self._checkpoint_group())

    # ------------------------------------------------------------------ save

    def save(self, path: str, *, optimizer: torch.optim.Optimizer | None = None, extra: Any = None,
             step: int | None = None, keep: int | None = None, async_save: bool = False) -> None:
        """Write a sharded checkpoint to the directory `path` (collective: every rank calls it).

        optimizer: its state and hyperparameters are saved under the parameters' original names.
        extra: JSON values and tensors (scheduler / grad scaler state, data position), rank 0's.
        step: the training step, read back as `runner.loaded_step`.
        keep: afterwards keep only the newest `keep` checkpoints of this model in `path`'s parent.
        async_save: return once the state is copied to host memory; the files are written in the
        background; the next save or load (or `wait_for_save()`) waits for it and raises its error.
        """
        self.wait_for_save()
        mine: dict[str, Any] = {"candidates": [], "problem": None}
        try:  # what could be refused is found before the first collective, and told to every rank
            model = self._model_entries()
            optim_entries, kinds, values = (self._optimizer_entries(optimizer) if optimizer is not None
                                            else ([], {}, {}))
            entries = model + optim_entries
            boxes = {}
            for i, entry in enumerate(entries):
                full, entry_boxes = boxes_of(entry.tensor, entry.piece)
                boxes[i] = (full, entry_boxes)
                if entry.writes:
                    for box in entry_boxes:
                        mine["candidates"].append([entry.key, list(box.offsets), list(box.sizes), list(full),
                                                   dtype_name(entry.tensor.dtype)])
            if self.rank == 0:
                mine.update(token=f"{time.time_ns():x}-{os.getpid()}", problem=refuse_to_replace(path))
                extra_tensors: dict[str, torch.Tensor] = {}
                encoded = encode_extra(extra, extra_tensors) if extra is not None else None
                groups = None if optimizer is None else [
                    {k: _jsonable(v, f"optimizer hyperparameter {k!r}") for k, v in group.items() if k != "params"}
                    for group in optimizer.param_groups]
        except InputError as error:
            mine["problem"] = str(error)
        everyone = self._gather(mine)
        problems = list(dict.fromkeys(part["problem"] for part in everyone if part["problem"]))
        if problems:
            raise InputError("; ".join(problems))
        token = everyone[0]["token"]
        owner: dict[tuple, int] = {}
        tensors: dict[str, dict] = {}
        for rank, part in enumerate(everyone):
            for key, offsets, sizes, full, dtype in part["candidates"]:
                if owner.setdefault((key, tuple(offsets), tuple(sizes)), rank) == rank:
                    info = tensors.setdefault(key, {"shape": full, "dtype": dtype, "pieces": []})
                    info["pieces"].append({"file": rank_file(rank), "key": piece_key(key, offsets),
                                           "offsets": offsets, "sizes": sizes})
        directory = partial_dir(path, token)
        for key, info in tensors.items():  # every element written exactly once (all ranks know all pieces)
            if not tiles(tuple(info["shape"]), [(tuple(p["offsets"]), tuple(p["sizes"])) for p in info["pieces"]]):
                raise AutopartError(f"checkpoint save: the pieces of {key} do not tile its shape {info['shape']}")
        if self.rank == 0:
            remove_partials(path, token)
        os.makedirs(directory, exist_ok=True)

        writes = []
        written = set()
        for i, entry in enumerate(entries):
            if not entry.writes:
                continue
            local = local_part(entry.tensor).detach()
            for box in boxes[i][1]:
                ident = (entry.key, box.offsets, box.sizes)
                if owner.get(ident) == self.rank and ident not in written:
                    written.add(ident)
                    view = box.local_view(local)
                    writes.append((piece_key(entry.key, box.offsets),
                                   view.to("cpu", copy=True).contiguous() if async_save else view))
        rng_tensors, rng_record = self._rng_state()
        writes += list(rng_tensors.items())
        index = None
        if self.rank == 0:
            writes += list(extra_tensors.items())
            index = {"format": FORMAT, "version": VERSION, "model_class": self.plan.model_class,
                     "step": step, "saved_at_ns": time.time_ns(), "layout": self._layout(),
                     "tensors": tensors, "extra": encoded,
                     "optimizer": None if optimizer is None else {
                         "class": type(optimizer).__name__, "param_groups": groups}}
        record = {"rng": rng_record, "state_kinds": kinds, "state_values": values}
        pending = _PendingSave(thread=None, errors=[], path=path)  # type: ignore[arg-type]

        def write() -> None:
            try:
                write_rank(directory, self.rank, writes, record)
                if self.rank == 0:
                    self._commit(directory, path, index, token, keep)
            except BaseException as error:  # reported by wait_for_save on every rank
                pending.errors.append(f"rank {self.rank}: {type(error).__name__}: {error}")

        if async_save:
            pending.thread = threading.Thread(target=write, name="autopart-checkpoint", daemon=True)
            self._pending_save = pending
            pending.thread.start()
        else:
            write()
            self._pending_save = pending
            self.wait_for_save()

    def _commit(self, directory: str, path: str, index: dict, token: str, keep: int | None) -> None:
        """Rank 0: every rank's marker in, the index completed from them, then the rename."""
        markers = wait_for_markers(directory, self.world_size, self.timeout_s)
        crcs = {}
        for marker in markers:
            for key, value in marker["crc32"].items():
                crcs[(marker["file"], key)] = value
        for info in index["tensors"].values():
            for piece in info["pieces"]:
                if (piece["file"], piece["key"]) in crcs:
                    piece["crc32"] = crcs[(piece["file"], piece["key"])]
        index["files"] = {m["file"]: m["bytes"] for m in markers}
        index["other_crc32"] = {m["file"]: {k: v for k, v in m["crc32"].items() if k.startswith(("rng/", "extra/"))}
                                for m in markers}
        index["rng"] = {str(m["rank"]): m["rng"] for m in markers}
        if index["optimizer"] is not None:
            kinds, values = {}, {}
            for marker in markers:
                kinds.update(marker["state_kinds"])
                values.update(marker["state_values"])
            index["optimizer"].update(state_kinds=kinds, state_values=values)
        commit(directory, path, index, token)
        if keep is not None:
            prune(path, keep, self.plan.model_class)

    def wait_for_save(self) -> None:
        """Wait for the save in flight (collective); raise, on every rank, what failed in it."""
        pending, self._pending_save = self._pending_save, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        reports = self._gather(pending.errors)
        failures = [line for errors in reports for line in errors]
        if failures:
            raise AutopartError(f"checkpoint save to {pending.path!r} failed, the previous checkpoint there (if any) "
                                f"is unchanged: " + "; ".join(failures))

    def _rng_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"rng/default": torch.get_rng_state()}
        record: dict[str, Any] = {"default": "rng/default", "streams": {}}
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
            record["cuda"] = "rng/cuda"
        for adapter in self.adapters:
            stream = getattr(adapter.module, STREAM_ATTR, None)
            if stream is None:
                continue
            states = {}
            for device, state in stream.snapshot().items():
                key = f"rng/stream/{adapter.interface.stage}/{device}"
                tensors[key] = state.clone()
                states[device] = key
            record["streams"][str(adapter.interface.stage)] = {"seed": stream.seed, "states": states}
        return tensors, record

    # ------------------------------------------------------------------ load

    def load(self, path: str, *, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """Load what `save` wrote, whatever plan saved it (collective); returns the saved `extra`.

        Nothing is changed unless every rank found the checkpoint whole and matching this model.
        """
        self.wait_for_save()
        problems: list[str] = []
        shapes = None
        directory = index = None
        try:
            if is_gathered_v1(resolve(path)):
                if optimizer is not None:
                    raise InputError(f"{path!r} is a gathered checkpoint of format 1: it holds no optimizer state")
                self._load_gathered_v1(path)
                return None
            directory, index = read_index(path)
            found, shapes = self._mismatches(index, optimizer, directory)
            problems += found
        except InputError as error:
            problems.append(str(error))
        self._raise_any(problems, InputError, shapes)
        errors = []
        try:
            with PieceReader(directory, index) as reader, torch.no_grad():
                self._fill_model(reader)
                if optimizer is not None:
                    self._load_optimizer(optimizer, reader, index)
            if index["layout"] == self._layout():
                self._restore_rng(directory, index["rng"][str(self.rank)], index["other_crc32"][rank_file(self.rank)])
            extra = read_extra(directory, index)
        except (InputError, OSError) as error:
            errors.append(f"rank {self.rank}: {error}")
        self._raise_any(errors, InputError)
        self.loaded_step = index.get("step")
        return extra

    def load_hf(self, directory: str) -> None:
        """Load Hugging Face safetensors weights (`model.safetensors`, or shards listed in
        `model.safetensors.index.json`) under the model's own names (collective); each rank reads only
        the rows of its own slices. On a plan compiled on the meta device, build the runner with
        `cm.distributed(init_fn=lambda name, tensor: None)` and call this before training.
        Tensors in the files that the model lacks are ignored (a tied head saved once, say)."""
        from autopart.runtime.checkpoint_offline import hf_index

        self.wait_for_save()
        problems: list[str] = []
        shapes = None
        index = None
        try:
            index = hf_index(directory)
            found, shapes = self._mismatches(index, None, directory, allow_unexpected=True)
            problems += found
        except InputError as error:
            problems.append(str(error))
        self._raise_any(problems, InputError, shapes)
        errors = []
        try:
            with PieceReader(directory, index) as reader, torch.no_grad():
                self._fill_model(reader)
        except (InputError, OSError) as error:
            errors.append(f"rank {self.rank}: {error}")
        self._raise_any(errors, InputError)

    def _fill_model(self, reader: PieceReader) -> None:
        """Read every model tensor's own boxes (its tp slice, its FSDP shard) from the checkpoint."""
        for entry in self._model_entries():
            local = local_part(entry.tensor)
            for box in boxes_of(entry.tensor, entry.piece)[1]:
                reader.fill(entry.key, local, box)

    def _raise_any(self, problems: list[str], kind: type, shapes: tuple[str, list[str]] | None = None) -> None:
        """Raise on every rank what any rank found: its messages, then the shape mismatches of all
        ranks' tensors (`shapes`: the checkpoint's description and this rank's lines), first ones first."""
        everyone = self._gather({"problems": problems, "shapes": list(shapes[1]) if shapes else []})
        merged = list(dict.fromkeys(line for part in everyone for line in part["problems"]))
        shape_lines = list(dict.fromkeys(line for part in everyone for line in part["shapes"]))
        if shape_lines:
            merged.append(f"{shapes[0]}: shapes differ ({len(shape_lines)} tensors): "
                          f"{shape_lines[:_MISMATCHES_SHOWN]}")
        if merged:
            raise kind("; ".join(merged))

    def _mismatches(self, index: dict, optimizer, directory: str, *,
                    allow_unexpected: bool = False) -> tuple[list[str], tuple[str, list[str]]]:
        """(problems, (what the checkpoint is, this rank's shape mismatches)) of `index` against this plan."""
        saved = {key[len("model/"):]: info for key, info in index["tensors"].items() if key.startswith("model/")}
        expected = set(self._writer_stage())
        missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
        if allow_unexpected:
            unexpected = []
        shapes = []
        for entry in self._model_entries():
            name = entry.key[len("model/"):]
            if name in saved:
                full = tuple(boxes_of(entry.tensor, entry.piece)[0])
                if tuple(saved[name]["shape"]) != full:
                    shapes.append(f"{name}: saved {tuple(saved[name]['shape'])}, this model {full}")
        what = f"the checkpoint at {directory} is of another model ({index.get('model_class', 'unknown class')})"
        problems = []
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {missing[:_MISMATCHES_SHOWN]} ({len(missing)} in all)")
            if unexpected:
                parts.append(f"not in this model {unexpected[:_MISMATCHES_SHOWN]} ({len(unexpected)} in all)")
            problems.append(f"{what}: " + "; ".join(parts))
        if optimizer is not None:
            saved_optimizer = index.get("optimizer")
            if saved_optimizer is None:
                problems.append("the checkpoint holds no optimizer state; load it with optimizer=None")
            elif len(saved_optimizer["param_groups"]) != len(optimizer.param_groups):
                problems.append(f"the checkpoint's optimizer has {len(saved_optimizer['param_groups'])} parameter "
                                f"groups, this one {len(optimizer.param_groups)}")
        return problems, (what, shapes)

    def _load_optimizer(self, optimizer, reader: PieceReader, index: dict) -> None:
        saved = index["optimizer"]
        names = self._param_names()
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            for key, value in saved_group.items():
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
            on_device = bool(group.get("capturable") or group.get("fused"))
            for param in group["params"]:
                if id(param) not in names:
                    raise InputError("the optimizer holds a parameter that is not this runner's; build it from "
                                     "runner.parameters()")
                name, piece, _ = names[id(param)]
                state: dict[str, Any] = {}
                for key, kind in saved["state_kinds"].items():
                    entry_key = f"optim/{key}/{name}"
                    if entry_key not in index["tensors"]:
                        continue
                    dtype = DTYPES[index["tensors"][entry_key]["dtype"]]
                    if kind == "scalar":
                        value = reader.whole(entry_key)
                        state[key] = value.to(param.device if on_device else "cpu")
                    else:
                        value = optimizer.state.get(param, {}).get(key)
                        if not (isinstance(value, torch.Tensor) and value.shape == param.shape
                                and value.dtype == dtype and type(value) is type(param.data)):
                            value = torch.zeros_like(param, dtype=dtype).detach()  # as the optimizer makes it
                        # else: filled in place, so a load needs no second copy of the moments
                        local = local_part(value)
                        for box in boxes_of(value, piece)[1]:
                            reader.fill(entry_key, local, box)
                        state[key] = value
                state.update(saved["state_values"].get(name, {}))
                if state:
                    optimizer.state[param] = state
                else:
                    optimizer.state.pop(param, None)

    def _restore_rng(self, directory: str, record: dict, crcs: dict[str, list[int]]) -> None:
        with SafetensorsFile(os.path.join(directory, rank_file(self.rank))) as file:
            read = lambda key: file.read(key, crcs.get(key)).clone()  # noqa: E731
            torch.set_rng_state(read(record["default"]))
            if "cuda" in record and self.device.type == "cuda":
                torch.cuda.set_rng_state(read(record["cuda"]), self.device)
            for adapter in self.adapters:
                stream = getattr(adapter.module, STREAM_ATTR, None)
                saved = record["streams"].get(str(adapter.interface.stage))
                if stream is not None and saved is not None:
                    stream.reseed(saved["seed"])
                    stream.restore({device: read(key) for device, key in saved["states"].items()})


def _jsonable(value: Any, what: str) -> Any:
    """A hyperparameter or state value as JSON (tuples as lists, 0-dim tensors as numbers)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, what) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"{what} is a {type(value).__name__}, which a checkpoint cannot store as JSON")
