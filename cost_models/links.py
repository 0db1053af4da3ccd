"""Links between devices in the α–β model, and presets for common interconnects.

Units: seconds (α) and bytes/s (β). Each preset cites its source;
`autopart.calibrate()` under torchrun replaces them with measurements (an
all-reduce and send/recv sweep, α–β fitted by least squares).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def _check_keys(cls: type, d: dict[str, Any]) -> None:
    """Reject keys of `d` that are not fields of the dataclass `cls` (from_dict helpers)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__}.from_dict(d): unknown keys {unknown}; expected a subset of {sorted(known)}"
        )


@dataclass(frozen=True, kw_only=True)
class Link:
    """A connection between two devices in the α–β model: t(n) = α + n/β."""

    latency_s: float
    """α: fixed seconds per message (per ring step in collectives)."""
    bandwidth: float
    """β: bytes/s one device moves over the link (NCCL's "bus bandwidth")."""

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"Link(latency_s={self.latency_s}): must be >= 0 seconds")
        if self.bandwidth <= 0:
            raise ValueError(f"Link(bandwidth={self.bandwidth}): must be > 0 bytes/s")

    def to_dict(self) -> dict[str, float]:
        """JSON-safe dict; `Link.from_dict` inverts it."""
        return {"latency_s": float(self.latency_s), "bandwidth": float(self.bandwidth)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Link:
        """Inverse of `to_dict`."""
        _check_keys(cls, d)
        return cls(**d)


# NVLink 4 (H100/H200 SXM, within one node). β: the all-reduce bus bandwidth
# measured on two H200s at 256 MiB, 270 GB/s (REFERENCES.md), not the 900 GB/s
# bidirectional marketing figure, which no collective reaches. α: NCCL's own
# tuning model (src/graph/tuning.cc, hwLat NVLink Ring/Simple) charges 3.4 µs
# per ring step plus 8.4 µs per call; 5 µs per step folds part of that per-call
# base in (a two-GPU all-reduce: 10 µs vs NCCL's 15.2 µs model). Measured small
# messages cost more (1 MiB at 17 GB/s ≈ 62 µs with launch); calibrate() fits α.
NVLINK4 = Link(latency_s=5e-6, bandwidth=270e9)

# NVLink 3 (A100 SXM). NCCL's tuning model caps sm80 bus bandwidth at
# 235 GB/s (src/graph/tuning.cc, `if (compCap80) busBw = min(busBw, 235)`).
NVLINK3 = Link(latency_s=5e-6, bandwidth=235e9)

# InfiniBand NDR across nodes: 400 Gb/s per NIC = 50e9 bytes/s, one NIC per GPU
# as in DGX H100. α: NCCL's tuning model charges 9.6 µs per ring step over the
# network (hwLat NET Ring/Simple); rounded to 10 µs.
INFINIBAND_NDR = Link(latency_s=1e-5, bandwidth=50e9)

# gloo over TCP loopback between CPU processes on one host: a guess (tens of
# µs per message, a few GB/s through the kernel's socket path) for
# calibrate() to replace.
LOOPBACK = Link(latency_s=2e-5, bandwidth=5e9)

LINK_PRESETS: dict[str, Link] = {
    "nvlink4": NVLINK4,
    "nvlink3": NVLINK3,
    "infiniband-ndr": INFINIBAND_NDR,
    "loopback": LOOPBACK,
}
