"""Devices and clusters: the hardware the cost model prices work on.

`Link` and the interconnect presets live in `links.py` and are re-exported here.

Units: bytes, bytes/s, FLOP/s, seconds. Every preset figure cites its source;
"dense" means without 2:4 structured sparsity (datasheets print the sparse
figure first, twice the dense one). Presets are starting points:
`autopart.calibrate()` replaces them with measurements of the machine at hand.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from autopart.cost_models.links import INFINIBAND_NDR, LOOPBACK, NVLINK3, NVLINK4, Link, _check_keys


def _dtype_name(dtype: torch.dtype | str) -> str:
    """'torch.bfloat16' -> 'bfloat16'; strings pass through."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


# Fraction of datasheet peak a large matmul reaches. meta-pytorch/autoparallel
# prices compute at 70% of peak (REFERENCES.md); on two H200s a bf16 GEMM
# measured about 750 of 989 TFLOP/s, 76% (REFERENCES.md). 0.7 keeps the
# conservative figure until `autopart.calibrate()` measures it.
MATMUL_EFFICIENCY = 0.7

# Fraction of datasheet memory bandwidth a streaming (elementwise) kernel
# reaches. Rule of thumb: STREAM-style copy kernels reach 80–90% of the
# datasheet bandwidth on HBM GPUs; 0.8 is the conservative end until
# `autopart.calibrate()` measures it.
MEMORY_EFFICIENCY = 0.8


def _check_fraction(where: str, field: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
        raise ValueError(
            f"{where}: {field}={value!r} must be a fraction in (0, 1] of the peak it scales; "
            "a device measured faster than its datasheet should carry the measured figure as its peak"
        )


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One device (a GPU, or the host CPU) as the cost model sees it.

    Rates come in two parts: the peaks (datasheet figures) and the fractions
    of them that real kernels reach (the efficiencies). `achieved_flops` and
    `achieved_bandwidth` are their products; `roofline.op_seconds` prices with
    those, `peak_flops` is the denominator of MFU. A spec from
    `autopart.calibrate()` keeps the datasheet peaks of the matching preset
    and stores the measured fractions; for a device with no datasheet preset
    (the CPU, an unlisted GPU) the measured rates are the peaks and the
    efficiencies are 1.0.
    """

    name: str
    """Preset or user-chosen name, e.g. "H100"."""
    memory_bytes: int
    """Device memory in bytes (presets: the capacity as sold, in decimal bytes)."""
    memory_bandwidth: float
    """Peak memory bandwidth in bytes/s (datasheet figure)."""
    peak_flops_by_dtype: tuple[tuple[str, float], ...]
    """Dense peak FLOP/s per dtype name ("float32", "tf32", "bfloat16", "float16", ...); has "float32"."""
    # A CUDA kernel launch costs a few µs of host and driver time (about 5 µs
    # through PyTorch's dispatcher); meta-pytorch/autoparallel floors each op
    # at 7 µs (REFERENCES.md). CPU presets use a smaller floor (no driver).
    launch_overhead_s: float = 5e-6
    """Fixed seconds per kernel (launch and tail), the floor of every op's time."""
    device_type: str = "cuda"
    """torch device type the spec describes: "cuda" or "cpu"."""
    matmul_efficiency: float = MATMUL_EFFICIENCY
    """Fraction of peak_flops a large matmul reaches, for dtypes not in matmul_efficiency_by_dtype."""
    matmul_efficiency_by_dtype: tuple[tuple[str, float], ...] = ()
    """Measured fraction of peak_flops per dtype name (calibrate() fills it); overrides matmul_efficiency."""
    memory_efficiency: float = MEMORY_EFFICIENCY
    """Fraction of memory_bandwidth a streaming kernel reaches (bytes read + written per second)."""
    fused_memory_efficiency: float | None = None
    """Fraction of memory_bandwidth a TorchInductor-generated (fused) kernel reaches; None: as
    memory_efficiency until `autopart.calibrate()` measures one (cost_models/calibrate.py)."""
    fused_launch_overhead_s: float | None = None
    """Seconds per generated kernel (its launch through Inductor's wrapper and its tail); None: as
    launch_overhead_s until calibrated."""

    def __post_init__(self) -> None:
        table = self.peak_flops_by_dtype
        if isinstance(table, dict):
            table = tuple(table.items())
        table = tuple((str(k), float(v)) for k, v in table)
        object.__setattr__(self, "peak_flops_by_dtype", table)
        fractions = self.matmul_efficiency_by_dtype
        if isinstance(fractions, dict):
            fractions = tuple(fractions.items())
        fractions = tuple((str(k), float(v)) for k, v in fractions)
        object.__setattr__(self, "matmul_efficiency_by_dtype", fractions)
        names = [k for k, _ in table]
        where = f"DeviceSpec(name={self.name!r})"
        if "float32" not in names:
            raise ValueError(
                f"{where}: peak_flops_by_dtype={table} has no 'float32' entry; "
                "add ('float32', flops) — it is the fallback for dtypes not listed"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: peak_flops_by_dtype={table} names a dtype twice; keep one entry each")
        if any(v <= 0 for _, v in table):
            raise ValueError(f"{where}: peak_flops_by_dtype={table} has a non-positive figure; use FLOP/s > 0")
        if self.memory_bytes <= 0:
            raise ValueError(f"{where}: memory_bytes={self.memory_bytes} must be > 0 (bytes)")
        if self.memory_bandwidth <= 0:
            raise ValueError(f"{where}: memory_bandwidth={self.memory_bandwidth} must be > 0 (bytes/s)")
        if self.launch_overhead_s < 0:
            raise ValueError(f"{where}: launch_overhead_s={self.launch_overhead_s} must be >= 0 (seconds)")
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"{where}: device_type={self.device_type!r}; use 'cuda' or 'cpu'")
        _check_fraction(where, "matmul_efficiency", self.matmul_efficiency)
        _check_fraction(where, "memory_efficiency", self.memory_efficiency)
        if self.fused_memory_efficiency is not None:
            _check_fraction(where, "fused_memory_efficiency", self.fused_memory_efficiency)
        if self.fused_launch_overhead_s is not None and self.fused_launch_overhead_s < 0:
            raise ValueError(f"{where}: fused_launch_overhead_s={self.fused_launch_overhead_s} must be >= 0 (seconds)")
        for dtype, fraction in fractions:
            _check_fraction(where, f"matmul_efficiency_by_dtype[{dtype!r}]", fraction)
        if len({k for k, _ in fractions}) != len(fractions):
            raise ValueError(f"{where}: matmul_efficiency_by_dtype={fractions} names a dtype twice; keep one each")

    def peak_flops(self, dtype: torch.dtype | str, *, allow_tf32: bool = False) -> float:
        """Dense peak FLOP/s for matmuls in `dtype`.

        float32 uses the "float32" figure unless `allow_tf32` (what
        `torch.backends.cuda.matmul.allow_tf32` turns on) and a "tf32" entry
        exists. Dtypes not listed fall back to the float32 figure.
        """
        return dict(self.peak_flops_by_dtype)[self._flops_key(dtype, allow_tf32)]

    def achieved_flops(self, dtype: torch.dtype | str, *, allow_tf32: bool = False) -> float:
        """FLOP/s a large matmul in `dtype` reaches: peak_flops × its matmul efficiency.

        The efficiency is matmul_efficiency_by_dtype's entry for the table row
        peak_flops reads (so float64 on a GPU shares float32's), else
        matmul_efficiency.
        """
        key = self._flops_key(dtype, allow_tf32)
        fraction = dict(self.matmul_efficiency_by_dtype).get(key, self.matmul_efficiency)
        return dict(self.peak_flops_by_dtype)[key] * fraction

    @property
    def achieved_bandwidth(self) -> float:
        """Bytes/s (read + written) a streaming kernel reaches: memory_bandwidth × memory_efficiency."""
        return self.memory_bandwidth * self.memory_efficiency

    @property
    def achieved_fused_bandwidth(self) -> float:
        """Bytes/s (read + written) a generated fused kernel reaches: memory_bandwidth × its efficiency."""
        fraction = self.fused_memory_efficiency if self.fused_memory_efficiency is not None else self.memory_efficiency
        return self.memory_bandwidth * fraction

    @property
    def fused_launch_seconds(self) -> float:
        """Seconds per generated kernel: `fused_launch_overhead_s`, else the per-op floor."""
        return self.launch_overhead_s if self.fused_launch_overhead_s is None else self.fused_launch_overhead_s

    def _flops_key(self, dtype: torch.dtype | str, allow_tf32: bool) -> str:
        """The peak_flops_by_dtype row a matmul in `dtype` runs at."""
        table = dict(self.peak_flops_by_dtype)
        name = _dtype_name(dtype)
        if name == "float32" and allow_tf32 and "tf32" in table:
            return "tf32"
        return name if name in table else "float32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; `DeviceSpec.from_dict` inverts it."""
        return {
            "name": self.name,
            "memory_bytes": int(self.memory_bytes),
            "memory_bandwidth": float(self.memory_bandwidth),
            "peak_flops_by_dtype": dict(self.peak_flops_by_dtype),
            "launch_overhead_s": float(self.launch_overhead_s),
            "device_type": self.device_type,
            "matmul_efficiency": float(self.matmul_efficiency),
            "matmul_efficiency_by_dtype": dict(self.matmul_efficiency_by_dtype),
            "memory_efficiency": float(self.memory_efficiency),
            "fused_memory_efficiency": self.fused_memory_efficiency,
            "fused_launch_overhead_s": self.fused_launch_overhead_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSpec:
        """Inverse of `to_dict`; keys it lacks (JSON from older versions) take the field defaults."""
        _check_keys(cls, d)
        return cls(**d)


# H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet and the Hopper
# architecture whitepaper (table "NVIDIA H100 SXM5"): dense BF16/FP16 989.4
# TFLOP/s, TF32 494.7, FP32 (non-tensor) 66.9, FP8 1978.9; HBM3 3.35 TB/s.
# Memory: 80e9 bytes as sold ("80GB"); the board reports 81559 MiB, part of
# which the CUDA context takes, so the round decimal figure is kept as a
# slightly conservative capacity. calibrate() reads torch.cuda.mem_get_info.
_HOPPER_FLOPS = (
    ("float32", 66.9e12),
    ("tf32", 494.7e12),
    ("bfloat16", 989.4e12),
    ("float16", 989.4e12),
    ("float8_e4m3fn", 1978.9e12),
    ("float8_e5m2", 1978.9e12),
)
H100 = DeviceSpec(name="H100", memory_bytes=80 * 10**9, memory_bandwidth=3.35e12, peak_flops_by_dtype=_HOPPER_FLOPS)

# H200 SXM: NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s; same GH100
# compute as the H100 SXM (the datasheet's sparse figures equal H100's).
# 141e9 bytes as sold (the board reports 143771 MiB).
H200 = DeviceSpec(name="H200", memory_bytes=141 * 10**9, memory_bandwidth=4.8e12, peak_flops_by_dtype=_HOPPER_FLOPS)

# A100 SXM4 80GB: NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312
# TFLOP/s dense, TF32 156, FP32 19.5; HBM2e 2,039 GB/s; 80e9 bytes as sold.
A100_80GB = DeviceSpec(
    name="A100-80GB",
    memory_bytes=80 * 10**9,
    memory_bandwidth=2.039e12,
    peak_flops_by_dtype=(("float32", 19.5e12), ("tf32", 156e12), ("bfloat16", 312e12), ("float16", 312e12)),
)


def _host_memory_bytes() -> int:
    """Physical RAM of this machine in bytes (POSIX sysconf); 16 GiB where unavailable."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 16 * 2**30


# The host CPU. Memory is this machine's RAM. Compute and bandwidth are
# conservative guesses for a multi-core x86 server (100 GFLOP/s fp32 ≈ a few
# AVX2/AVX-512 cores' worth; 20 GB/s ≈ one or two DDR4 channels, below what a
# whole socket streams): `autopart.calibrate()` replaces them with measurements.
# CPU kernels launch with no driver round-trip, hence the smaller floor.
CPU = DeviceSpec(
    name="CPU",
    memory_bytes=_host_memory_bytes(),
    memory_bandwidth=20e9,
    peak_flops_by_dtype=(("float32", 100e9),),
    launch_overhead_s=2e-6,
    device_type="cpu",
)

PRESETS: dict[str, DeviceSpec] = {d.name: d for d in (H100, H200, A100_80GB, CPU)}


def get_preset(name: str) -> DeviceSpec:
    """The preset DeviceSpec called `name` (case-insensitive)."""
    for key, spec in PRESETS.items():
        if key.lower() == name.strip().lower():
            return spec
    raise ValueError(
        f"get_preset(name={name!r}): unknown device; known: {', '.join(PRESETS)} "
        "(or build a DeviceSpec(...) with your own figures)"
    )


# Intra-node link per device preset; other GPUs get NVLink 4.
_INTRA_LINK_BY_DEVICE = {"A100-80GB": NVLINK3, "CPU": LOOPBACK}


def _default_links(devices: tuple[DeviceSpec, ...]) -> tuple[Link, Link]:
    """(intra, inter) node links for `devices`: the slowest member's defaults."""
    if all(d.device_type == "cpu" for d in devices):
        # CPU processes talk over gloo/TCP; across hosts too, to a first guess.
        return LOOPBACK, LOOPBACK
    intra = [_INTRA_LINK_BY_DEVICE.get(d.name, NVLINK4 if d.device_type == "cuda" else LOOPBACK) for d in devices]
    slowest = Link(latency_s=max(l.latency_s for l in intra), bandwidth=min(l.bandwidth for l in intra))
    return slowest, INFINIBAND_NDR


_TERM = re.compile(r"^(?:(\d+)\s*[xX*]\s*)?(?:(\d+)\s*[xX*]\s*)?([A-Za-z][\w.\-]*)$")


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Devices, the host each sits on, and the links between them."""

    devices: tuple[DeviceSpec, ...]
    """Device i's spec; i is the global device (rank) index."""
    node_of_device: tuple[int, ...]
    """Host index of device i, numbered 0 .. num_nodes - 1."""
    intra_node_link: Link
    """Link between two devices on the same host."""
    inter_node_link: Link
    """Link between two devices on different hosts."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "node_of_device", tuple(int(n) for n in self.node_of_device))
        if not self.devices:
            raise ValueError("Cluster(devices=()): needs at least one device; e.g. Cluster.parse('8xH100')")
        bad = [d for d in self.devices if not isinstance(d, DeviceSpec)]
        if bad:
            raise ValueError(f"Cluster(devices=...): {bad[0]!r} is not a DeviceSpec; use get_preset(name)")
        if len(self.node_of_device) != len(self.devices):
            raise ValueError(
                f"Cluster(node_of_device={self.node_of_device}): has {len(self.node_of_device)} entries "
                f"for {len(self.devices)} devices; give one host index per device"
            )
        nodes = set(self.node_of_device)
        if nodes != set(range(len(nodes))):
            raise ValueError(
                f"Cluster(node_of_device={self.node_of_device}): host indices must be 0 .. k-1 with none "
                "skipped; renumber the hosts"
            )

    @property
    def num_devices(self) -> int:
        """Number of devices."""
        return len(self.devices)

    @property
    def num_nodes(self) -> int:
        """Number of hosts."""
        return len(set(self.node_of_device))

    @property
    def is_homogeneous(self) -> bool:
        """True when every device has the same spec."""
        return len(set(self.devices)) == 1

    def link(self, i: int, j: int) -> Link:
        """The link between devices i and j (intra-node if they share a host)."""
        for name, k in (("i", i), ("j", j)):
            if not 0 <= k < self.num_devices:
                raise ValueError(f"Cluster.link({name}={k}): device index out of range 0..{self.num_devices - 1}")
        return self.intra_node_link if self.node_of_device[i] == self.node_of_device[j] else self.inter_node_link

    def link_for_group(self, device_ids: Iterable[int]) -> Link:
        """The link a collective over `device_ids` is bound by: inter-node if they span hosts."""
        ids = list(device_ids)
        if not ids:
            raise ValueError("Cluster.link_for_group(device_ids=[]): give at least one device index")
        for k in (min(ids), max(ids)):
            self.link(k, k)  # validates the index range (one check each end: groups of thousands)
        spans_hosts = len({self.node_of_device[k] for k in ids}) > 1
        return self.inter_node_link if spans_hosts else self.intra_node_link

    @classmethod
    def from_devices(
        cls,
        devices: tuple[DeviceSpec, ...] | list[DeviceSpec],
        *,
        node_of_device: tuple[int, ...] | None = None,
        gpus_per_node: int = 8,
        intra_node_link: Link | None = None,
        inter_node_link: Link | None = None,
    ) -> Cluster:
        """A cluster of `devices`; hosts default to `gpus_per_node` GPUs each (CPUs: one host)."""
        devices = tuple(devices)
        if gpus_per_node < 1:
            raise ValueError(f"Cluster.from_devices(gpus_per_node={gpus_per_node}): must be >= 1")
        if node_of_device is None:
            on_one_host = all(d.device_type == "cpu" for d in devices)
            node_of_device = tuple(0 if on_one_host else i // gpus_per_node for i in range(len(devices)))
        intra, inter = _default_links(devices) if devices else (NVLINK4, INFINIBAND_NDR)
        return cls(
            devices=devices,
            node_of_device=node_of_device,
            intra_node_link=intra_node_link or intra,
            inter_node_link=inter_node_link or inter,
        )

    @classmethod
    def homogeneous(
        cls,
        n: int,
        preset: str | DeviceSpec = "H100",
        gpus_per_node: int = 8,
        intra_node_link: Link | None = None,
        inter_node_link: Link | None = None,
    ) -> Cluster:
        """`n` identical devices, `gpus_per_node` per host."""
        if n < 1:
            raise ValueError(f"Cluster.homogeneous(n={n}): needs at least one device")
        spec = get_preset(preset) if isinstance(preset, str) else preset
        return cls.from_devices(
            (spec,) * n, gpus_per_node=gpus_per_node, intra_node_link=intra_node_link, inter_node_link=inter_node_link
        )

    @classmethod
    def cpu(cls, n: int) -> Cluster:
        """`n` CPU devices (processes) on this host, joined by the loopback link."""
        if n < 1:
            raise ValueError(f"Cluster.cpu(n={n}): needs at least one device")
        return cls(devices=(CPU,) * n, node_of_device=(0,) * n, intra_node_link=LOOPBACK, inter_node_link=LOOPBACK)

    @classmethod
    def parse(cls, text: str, *, gpus_per_node: int = 8) -> Cluster:
        """Parse "H100", "8xH100", "2x8xH100" (2 hosts of 8) or "2xH100+2xA100-80GB".

        Terms joined by "+" are packed onto hosts of `gpus_per_node` devices in
        order; a term "AxBxNAME" adds A whole hosts of B devices. CPU-only
        clusters sit on one host unless a term names hosts.
        """
        where = f"Cluster.parse({text!r})"
        if gpus_per_node < 1:
            raise ValueError(f"{where}: gpus_per_node={gpus_per_node} must be >= 1")
        hosts: list[list[DeviceSpec]] = []
        open_host: list[DeviceSpec] | None = None
        names = {k.lower(): k for k in PRESETS}
        for raw in str(text).split("+"):
            match = _TERM.match(raw.strip())
            if match is None:
                raise ValueError(f"{where}: cannot read term {raw.strip()!r}; write e.g. '8xH100' or '2x8xH100'")
            first, second, name = match.groups()
            if name.lower() not in names:
                raise ValueError(f"{where}: unknown device {name!r}; known: {', '.join(PRESETS)}")
            spec = PRESETS[names[name.lower()]]
            num_hosts, count = (int(first), int(second)) if second else (None, int(first or 1))
            if count < 1 or (num_hosts is not None and num_hosts < 1):
                raise ValueError(f"{where}: term {raw.strip()!r} asks for zero devices; counts must be >= 1")
            if num_hosts is not None:
                hosts.extend([spec] * count for _ in range(num_hosts))
                open_host = None
                continue
            capacity = float("inf") if spec.device_type == "cpu" else gpus_per_node
            for _ in range(count):
                if open_host is None or len(open_host) >= capacity:
                    open_host = []
                    hosts.append(open_host)
                open_host.append(spec)
        devices = tuple(d for host in hosts for d in host)
        if len({d.device_type for d in devices}) > 1:
            raise ValueError(f"{where}: mixes CPU and GPU devices; plan for one kind at a time")
        node_of_device = tuple(h for h, host in enumerate(hosts) for _ in host)
        return cls.from_devices(devices, node_of_device=node_of_device)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; `Cluster.from_dict` inverts it."""
        return {
            "devices": [d.to_dict() for d in self.devices],
            "node_of_device": list(self.node_of_device),
            "intra_node_link": self.intra_node_link.to_dict(),
            "inter_node_link": self.inter_node_link.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cluster:
        """Inverse of `to_dict`."""
        _check_keys(cls, d)
        return cls(
            devices=tuple(DeviceSpec.from_dict(x) for x in d["devices"]),
            node_of_device=tuple(d["node_of_device"]),
            intra_node_link=Link.from_dict(d["intra_node_link"]),
            inter_node_link=Link.from_dict(d["inter_node_link"]),
        )

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of `to_dict`; `Cluster.from_json` reads it back."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        """Inverse of `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Cluster.from_json: not JSON ({error}); pass the text Cluster.to_json() wrote") from None
        if not isinstance(data, dict):
            raise ValueError(f"Cluster.from_json: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"Cluster.from_json: malformed cluster ({error!r}); write it with Cluster.to_json()"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `to_json()` to `path` (e.g. the cluster `autopart.calibrate()` measured)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Cluster:
        """Read a cluster written by `save` (or any `to_json()` text) from `path`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())
