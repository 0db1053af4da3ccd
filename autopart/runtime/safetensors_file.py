"""Write and read safetensors files with torch alone, streaming one tensor at a time.

The format (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header length N, N bytes of JSON header ({key: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the
raw little-endian tensor bytes. Nothing in it is executable: reading it is
`json.loads` and byte copies, never pickle. The `safetensors` package and
Hugging Face's `from_pretrained` read what `write_file` writes.

Written here rather than through `safetensors.torch.save_file` because a
checkpoint writes a rank's pieces one after another straight from the
tensors (no dict of copies held at once) and records a CRC32 per block of
every piece on the way, and a load reads only the rows it needs of a piece
(`read_rows`) into a buffer it allocates, so its peak memory is the piece
rows in flight, not the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from autopart.core.errors import InputError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

CRC_BLOCK_BYTES = 8 << 20
"""Each piece's bytes carry one CRC32 per block of this size, so a partial read verifies what it reads."""

_MAX_HEADER_BYTES = 100 << 20


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise InputError(f"dtype {dtype} has no safetensors name; supported: {sorted(map(str, DTYPE_NAMES))}")
    return DTYPE_NAMES[dtype]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy for a contiguous CPU tensor."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def block_crcs(data: memoryview) -> list[int]:
    """CRC32 of every CRC_BLOCK_BYTES block of `data` (the last one shorter)."""
    return [zlib.crc32(data[i:i + CRC_BLOCK_BYTES]) for i in range(0, max(len(data), 1), CRC_BLOCK_BYTES)]


@dataclass(frozen=True, kw_only=True)
class Deferred:
    """A tensor to write that is produced only when its turn comes (one in memory at a time)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[], torch.Tensor]


def write_file(path: str, entries: Iterable[tuple[str, torch.Tensor | Deferred]],
               metadata: dict[str, str] | None = None, *, checksums: bool = True) -> dict[str, list[int]]:
    """Write `entries` (key, tensor or Deferred) as one safetensors file, fsync'd; returns key -> block CRC32s."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key, tensor in entries:
        size = math.prod(tensor.shape) * tensor.dtype.itemsize
        header[key] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    crcs: dict[str, list[int]] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key, tensor in entries:
            value = tensor.fetch() if isinstance(tensor, Deferred) else tensor
            data = tensor_bytes(value.cpu())
            if checksums:
                crcs[key] = block_crcs(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return crcs


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One tensor of a safetensors file: where its bytes lie."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute file offset of its first byte."""
    end: int


class SafetensorsFile:
    """Reads the header of a safetensors file, checking it against the file's size, then rows on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as error:
            raise InputError(f"checkpoint file {path} cannot be opened: {error.strerror}") from error
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            self.close()
            raise InputError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            self.close()
            raise InputError(f"{path} is truncated or not a safetensors file (header of {length} bytes "
                             f"in a file of {size})")
        try:
            header = json.loads(self._file.read(length))
        except (ValueError, UnicodeDecodeError) as error:
            self.close()
            raise InputError(f"{path}: the safetensors header is not JSON ({error}); the file is corrupt") from error
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        start = 8 + length
        self.entries: dict[str, Entry] = {}
        for key, info in header.items():
            begin, end = info["data_offsets"]
            if info["dtype"] not in DTYPES:
                self.close()
                raise InputError(f"{path}: tensor {key!r} has dtype {info['dtype']!r}, which autopart cannot read")
            self.entries[key] = Entry(dtype=DTYPES[info["dtype"]], shape=tuple(info["shape"]),
                                      begin=start + begin, end=start + end)
            if start + end > size:
                self.close()
                raise InputError(f"{path} is truncated: tensor {key!r} ends at byte {start + end} but the file "
                                 f"has {size}; the save that wrote it did not finish, use another checkpoint")

    def read_rows(self, key: str, start: int, stop: int, crcs: list[int] | None = None,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of tensor `key` (the whole of a 0-dim one), verifying the
        CRC32 of every block the read touches when `crcs` is given. With `scratch` (a uint8 buffer
        large enough) the rows are read into it and the result is a view of it, valid until the
        next read into the same buffer: a reader that copies each piece out at once then allocates
        one buffer for all of them, which keeps its peak at one piece."""
        entry = self.entries[key]
        if not entry.shape:
            start, stop = 0, 1
        row = entry.dtype.itemsize
        for n in entry.shape[1:]:
            row *= n
        lo, hi = start * row, stop * row
        if crcs is not None:  # widen to whole CRC blocks and check each
            lo_block, hi_block = lo // CRC_BLOCK_BYTES * CRC_BLOCK_BYTES, min(
                -(-hi // CRC_BLOCK_BYTES) * CRC_BLOCK_BYTES, entry.end - entry.begin)
        else:
            lo_block, hi_block = lo, hi
        size = hi_block - lo_block
        buffer = scratch[:size] if scratch is not None and scratch.numel() >= size else torch.empty(size, dtype=torch.uint8)
        self._file.seek(entry.begin + lo_block)
        if buffer.numel() and self._file.readinto(memoryview(buffer.numpy())) != buffer.numel():
            raise InputError(f"{self.path} is truncated: tensor {key!r} could not be read whole")
        if crcs is not None:
            data = memoryview(buffer.numpy())
            first = lo_block // CRC_BLOCK_BYTES
            for i in range(0, max(len(data), 1), CRC_BLOCK_BYTES):
                expected = crcs[first + i // CRC_BLOCK_BYTES]
                if zlib.crc32(data[i:i + CRC_BLOCK_BYTES]) != expected:
                    raise InputError(f"{self.path} is corrupt: tensor {key!r}, bytes {lo_block + i}.. fail their "
                                     "CRC32 check; use another checkpoint")
        rows = buffer[lo - lo_block:hi - lo_block].view(entry.dtype)
        return rows.view((stop - start,) + entry.shape[1:]) if entry.shape else rows.view(())

    def read_box(self, key: str, start: list[int], sizes: list[int], scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The box `start`/`sizes` of tensor `key`, reading per row of dim 0 only the span of that row
        between the box's first and last element (a column slice of a row-major matrix reads just
        its columns). No checksum: for files without one (Hugging Face's)."""
        entry = self.entries[key]
        inner = entry.shape[1:]
        strides = [1] * len(inner)
        for i in range(len(inner) - 2, -1, -1):
            strides[i] = strides[i + 1] * inner[i + 1]
        first = sum(s * st for s, st in zip(start[1:], strides))
        span = sum((s + n - 1) * st for s, n, st in zip(start[1:], sizes[1:], strides)) - first + 1
        row = math.prod(inner)
        item = entry.dtype.itemsize
        size = sizes[0] * span * item
        if scratch is not None and scratch.numel() >= size:
            buffer = scratch[:size].view(entry.dtype).view(sizes[0], span)
        else:
            buffer = torch.empty(sizes[0], span, dtype=entry.dtype)
        raw = buffer.view(torch.uint8).numpy() if buffer.numel() else None
        for i in range(sizes[0]):
            self._file.seek(entry.begin + ((start[0] + i) * row + first) * item)
            if self._file.readinto(memoryview(raw[i])) != span * item:
                raise InputError(f"{self.path} is truncated: tensor {key!r} could not be read whole")
        return buffer.as_strided(tuple(sizes), (span, *strides))

    def read(self, key: str, crcs: list[int] | None = None) -> torch.Tensor:
        if key not in self.entries:
            raise InputError(f"{self.path} lacks tensor {key!r}; the file is corrupt or of another checkpoint")
        entry = self.entries[key]
        return self.read_rows(key, 0, entry.shape[0] if entry.shape else 1, crcs)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
