"""A sharded checkpoint on disk: safetensors files written by every rank and one JSON index.

Layout of a checkpoint directory:

- ``rank00003.safetensors``: the pieces rank 3 wrote (a box of an original
  tensor each, key ``"{entry}@{offsets}"``), its RNG states, and on rank 0
  the tensors of the caller's `extra`;
- ``autopart_checkpoint.json``: the index, written last by rank 0: for every
  entry (``model/<name>``, ``optim/<state key>/<name>``) its whole shape and
  dtype and where each piece lies (file, key, offsets, sizes, CRC32 per
  8 MiB block); the byte size of every file; the optimizer's
  hyperparameters; each rank's RNG record; the JSON part of `extra`.

Why not torch.distributed.checkpoint: its FileSystemReader reads the
``.metadata`` file with `pickle.load` (torch 2.11 and 2.13), so loading a
checkpoint from elsewhere could run code; its HuggingFaceStorageWriter/Reader
keep metadata in safetensors headers but take only tensors (no optimizer
step counts, no RNG bytes next to JSON hyperparameters), and neither can
describe a tensor-parallel slice of interleaved chunks (Megatron's fused
q/k/v, `ParamSlice.groups > 1`) that is not a DTensor placement. Here every
byte read back is JSON or raw tensor data, and a slice of any layout is a
list of boxes (runtime/checkpoint_layout.py), which is what lets any plan
load any other plan's checkpoint.

Crash safety: ranks write into ``.<name>.partial-<token>`` next to the
target; each rank's last act is an atomic rename of its marker
``rankNNNNN.json``; rank 0 waits for every marker, writes the index (atomic
rename too), then moves an existing checkpoint at the path aside, renames the
new one into place and deletes the old one. A crash before that leaves the
previous checkpoint untouched (the next save removes the partial directory);
a crash between the two renames leaves the previous one under
``.<name>.old-<token>``, which `resolve` finds.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import time
from typing import Any

import torch

from autopart.core.errors import AutopartError, InputError
from autopart.runtime.checkpoint_layout import Box, intersection
from autopart.runtime.safetensors_file import DTYPES, Deferred, SafetensorsFile, dtype_name, write_file
from autopart.runtime import safetensors_file

INDEX = "autopart_checkpoint.json"
FORMAT = "autopart-checkpoint"
VERSION = 2
"""Version 1 was one gathered model.pt with a JSON manifest of format 1 (runtime/state.py reads it)."""


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def piece_key(entry: str, offsets) -> str:
    return f"{entry}@{','.join(map(str, offsets))}"


def _sibling(path: str, kind: str, token: str) -> str:
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.{kind}-{token}")


def partial_dir(path: str, token: str) -> str:
    return _sibling(path, "partial", token)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise InputError(f"{path} is not valid JSON ({error}); the checkpoint is corrupt") from error


def _write_json_atomic(path: str, value: Any) -> None:
    """Write, fsync, then rename into place: readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_checkpoint(path: str) -> bool:
    """Whether `path` is a directory holding an autopart checkpoint (this format or the gathered v1)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, INDEX))


def is_gathered_v1(path: str) -> bool:
    """Whether `path` holds a checkpoint of format 1: the whole model gathered into model.pt."""
    if not is_checkpoint(path):
        return False
    return _read_json(os.path.join(path, INDEX)).get("format") == 1


def refuse_to_replace(path: str) -> str | None:
    """Why a save must not replace what is at `path` (None: nothing there, or a checkpoint)."""
    if not os.path.exists(path) or is_checkpoint(path):
        return None
    if os.path.isdir(path) and not os.listdir(path):
        return None
    return (f"{path!r} exists and is not an autopart checkpoint; saving there would destroy it. "
            "Save to a new path (or delete it yourself)")


def remove_partials(path: str, except_token: str) -> None:
    """Delete what crashed earlier saves to `path` left behind."""
    for stale in glob.glob(_sibling(path, "partial", "*")):
        if not stale.endswith(except_token):
            shutil.rmtree(stale, ignore_errors=True)


def write_rank(directory: str, rank: int, entries: list[tuple[str, torch.Tensor | Deferred]],
               record: dict[str, Any]) -> None:
    """One rank's file and then its marker (the marker's rename says: this rank is done)."""
    name = rank_file(rank)
    crcs = write_file(os.path.join(directory, name), entries, {"format": "pt", "writer": "autopart"})
    marker = {"rank": rank, "file": name, "bytes": os.path.getsize(os.path.join(directory, name)),
              "crc32": crcs, **record}
    _write_json_atomic(os.path.join(directory, f"rank{rank:05d}.json"), marker)


def wait_for_markers(directory: str, world_size: int, timeout_s: float) -> list[dict]:
    """Every rank's marker, or an error naming the ranks whose files stopped growing for `timeout_s`
    (a rank with more to write than rank 0 keeps the wait alive as long as its file grows)."""
    deadline = time.monotonic() + timeout_s
    paths = [os.path.join(directory, f"rank{r:05d}.json") for r in range(world_size)]
    sizes: dict[int, int] = {}
    while True:
        missing = [r for r, p in enumerate(paths) if not os.path.exists(p)]
        if not missing:
            return [_read_json(p) for p in paths]
        for r in missing:
            file = os.path.join(directory, rank_file(r))
            size = os.path.getsize(file) if os.path.exists(file) else -1
            if sizes.get(r) != size:
                sizes[r] = size
                deadline = time.monotonic() + timeout_s
        if time.monotonic() > deadline:
            raise AutopartError(
                f"checkpoint save: rank(s) {missing} did not finish writing (no progress for {timeout_s:g} s: "
                f"killed, hung or out of disk); the previous checkpoint is left as it was and {directory} is "
                "discarded")
        time.sleep(0.02)


def commit(directory: str, path: str, index: dict, token: str) -> None:
    """Write the index, then make `directory` the checkpoint at `path` (see the module docstring)."""
    _write_json_atomic(os.path.join(directory, INDEX), index)
    _fsync_dir(directory)
    old = None
    if os.path.exists(path):
        old = _sibling(path, "old", token)
        os.rename(path, old)
    os.rename(directory, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(path: str, keep: int, model_class: str) -> list[str]:
    """Delete all but the newest `keep` checkpoints of this model in `path`'s parent directory."""
    if keep < 1:
        raise InputError(f"keep={keep}: keep at least the checkpoint just written (keep >= 1), or None")
    parent = os.path.dirname(os.path.abspath(path))
    found = []
    for entry in os.listdir(parent):
        index_path = os.path.join(parent, entry, INDEX)
        if entry.startswith(".") or not os.path.exists(index_path):
            continue
        try:
            index = _read_json(index_path)
        except InputError:
            continue
        if index.get("format") == FORMAT and index.get("model_class") == model_class:
            found.append((index.get("saved_at_ns", 0), os.path.join(parent, entry)))
    removed = [p for _, p in sorted(found, reverse=True)[keep:] if os.path.abspath(p) != os.path.abspath(path)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------- reading


def resolve(path: str) -> str:
    """The directory holding the checkpoint saved at `path`, or an error saying why there is none."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, INDEX)):
        return path
    if not os.path.exists(path):
        # a crash between commit's two renames left the previous checkpoint aside
        olds = sorted(glob.glob(_sibling(path, "old", "*")), key=os.path.getmtime, reverse=True)
        for old in olds:
            if os.path.exists(os.path.join(old, INDEX)):
                return old
        raise InputError(f"no checkpoint at {path!r}: the path does not exist")
    raise InputError(f"{path!r} holds no autopart checkpoint ({INDEX} missing); pass the directory "
                     "that runner.save wrote")


def read_index(path: str) -> tuple[str, dict]:
    """(directory, index) of the checkpoint at `path`, its files checked against their recorded sizes."""
    directory = resolve(path)
    index = _read_json(os.path.join(directory, INDEX))
    if index.get("format") == 1:
        raise InputError(f"{directory} holds a gathered checkpoint of format 1 (model.pt); runner.load reads it, "
                         "the sharded reader does not")
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise InputError(f"{directory}: checkpoint format {index.get('format')!r} version {index.get('version')!r} "
                         f"is not {FORMAT!r} version {VERSION}")
    for name, size in index["files"].items():
        file = os.path.join(directory, name)
        if not os.path.exists(file):
            raise InputError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
        actual = os.path.getsize(file)
        if actual != size:
            raise InputError(f"checkpoint file {file} has {actual} bytes but the index records {size}: "
                             "it is truncated or was replaced; use another checkpoint")
    return directory, index


class PieceReader:
    """Fills boxes of tensors from the pieces an index lists, reading only the rows each needs."""

    def __init__(self, directory: str, index: dict) -> None:
        self.directory, self.index = directory, index
        self._files: dict[str, SafetensorsFile] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)
        """One read buffer for all pieces (each is copied out before the next read), grown to the largest."""

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        return self._scratch

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            self._files[name] = SafetensorsFile(os.path.join(self.directory, name))
        return self._files[name]

    def fill(self, key: str, dest: torch.Tensor, box: Box) -> None:
        """Copy entry `key`'s part `box` into `box.local_view(dest)`."""
        entry = self.index["tensors"][key]
        target = box.local_view(dest)
        covered = 0
        for piece in entry["pieces"]:
            overlap = intersection(box.offsets, box.sizes, piece["offsets"], piece["sizes"])
            if overlap is None:
                continue
            lo, sizes = overlap
            start = [l - o for l, o in zip(lo, piece["offsets"])]
            file = self._file(piece["file"])
            if piece["key"] not in file.entries:
                raise InputError(f"{file.path} lacks tensor {piece['key']!r} that the index lists; the checkpoint "
                                 "is corrupt")
            item = DTYPES[entry["dtype"]].itemsize
            if len(sizes) > 1 and "crc32" not in piece and list(sizes[1:]) != list(piece["sizes"][1:]):
                scratch = self._buffer(sizes[0] * math.prod(piece["sizes"][1:]) * item)
                source = file.read_box(piece["key"], start, list(sizes), scratch)  # a column slice: its columns
            elif sizes:
                # whole CRC blocks may be read around the rows: room for the piece or the rows plus two blocks
                row = math.prod(piece["sizes"][1:]) * item
                scratch = self._buffer(min(math.prod(piece["sizes"]) * item, sizes[0] * row + 2 * safetensors_file.CRC_BLOCK_BYTES))
                source = file.read_rows(piece["key"], start[0], start[0] + sizes[0], piece.get("crc32"), scratch)
                for dim in range(1, len(sizes)):
                    source = source.narrow(dim, start[dim], sizes[dim])
            else:
                source = file.read_rows(piece["key"], 0, 1, piece.get("crc32"))
            view = target
            for dim, (l, n) in enumerate(zip(lo, sizes)):
                view = view.narrow(dim, l - box.offsets[dim], n)
            view.copy_(source)
            covered += math.prod(sizes)
        if covered != box.numel:
            raise InputError(f"the checkpoint holds {covered} of the {box.numel} elements of {key} at offsets "
                             f"{box.offsets}; it is incomplete")

    def whole(self, key: str) -> torch.Tensor:
        """Entry `key` as one whole CPU tensor."""
        entry = self.index["tensors"][key]
        shape = tuple(entry["shape"])
        out = torch.empty(shape, dtype=DTYPES[entry["dtype"]])
        self.fill(key, out, Box((0,) * len(shape), shape, (0,) * len(shape)))
        return out

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __enter__(self) -> "PieceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- extra


def encode_extra(value: Any, tensors: dict[str, torch.Tensor], where: str = "extra") -> Any:
    """`value` as JSON, its tensors moved to `tensors` (key 'extra/<n>') and referenced by key."""
    if isinstance(value, torch.Tensor):
        key = f"extra/{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise InputError(f"{where} has key {k!r} of type {type(k).__name__}; JSON keys are strings")
        return {k: encode_extra(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_extra(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_extra(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"{where} is a {type(value).__name__}; a checkpoint's extra holds JSON values (dict, list, "
                     "str, numbers, None) and tensors, e.g. scheduler.state_dict()")


def decode_extra(value: Any, read) -> Any:
    """Inverse of `encode_extra`; `read(key)` gives a stored tensor."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return read(value["__tensor__"])
        if set(value) == {"__tuple__"}:
            return tuple(decode_extra(v, read) for v in value["__tuple__"])
        return {k: decode_extra(v, read) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_extra(v, read) for v in value]
    return value


def read_extra(directory: str, index: dict) -> Any:
    extra = index.get("extra")
    if extra is None:
        return None
    crcs = index.get("other_crc32", {}).get(rank_file(0), {})
    with SafetensorsFile(os.path.join(directory, rank_file(0))) as file:
        return decode_extra(extra, lambda key: file.read(key, crcs.get(key)).clone())


__all__ = ["INDEX", "FORMAT", "VERSION", "PieceReader", "read_index", "resolve", "is_checkpoint", "dtype_name",
           "Deferred"]
