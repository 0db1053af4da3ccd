"""Human-readable numbers for reports and error messages: bytes, seconds, FLOPs, counts.

Bytes use binary prefixes (KiB = 2^10 B), as `nvidia-smi` and PyTorch's memory
summaries do; FLOPs and counts use decimal ones (GFLOP = 10^9 FLOP). Pure
functions of numbers: the report and the solver's errors both use them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def fmt_bytes(num_bytes: float, *, exact: bool = False) -> str:
    """1536 -> '1.50 KiB'; 3.2e9 -> '2.98 GiB'.

    `exact`: two decimals and the byte count, for error messages that state a
    shortfall: 5583457280 -> '5.20 GiB (5,583,457,280 bytes)'.
    """
    if exact:
        value, unit = _binary(num_bytes, 1024)
        count = f"{math.ceil(num_bytes):,} bytes"
        return count if unit == "B" else f"{value:.2f} {unit} ({count})"
    value, unit = _binary(num_bytes, 1023.5)
    return f"{int(value)} B" if unit == "B" else f"{_three(value)} {unit}"


def _binary(num_bytes: float, limit: float) -> tuple[float, str]:
    """(value, unit) with the largest binary unit that keeps |value| below `limit` (TiB at most)."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < limit:
            return value, unit
        value /= 1024
    return value, "TiB"


def fmt_seconds(seconds: float) -> str:
    """0.000839 -> '839 µs'; 0.0123 -> '12.3 ms'; 2.5 -> '2.50 s'; below half a picosecond '0 s'."""
    s = float(seconds)
    if abs(s) < 5e-13:
        return "0 s"
    if abs(s) < 0.9995e-6:
        return f"{_three(s * 1e9)} ns"
    if abs(s) < 0.9995e-3:
        return f"{_three(s * 1e6)} µs"
    if abs(s) < 0.9995:
        return f"{_three(s * 1e3)} ms"
    if abs(s) < 120:
        return f"{_three(s)} s"
    return f"{s / 60:.1f} min"


def fmt_flops(flops: float) -> str:
    """28311552 -> '28.3 MFLOP'; 1.2e13 -> '12.0 TFLOP'."""
    return _decimal(flops, "FLOP", ("", "K", "M", "G", "T", "P", "E"))


def fmt_count(count: float) -> str:
    """236928 -> '237 K'; 1.34e9 -> '1.34 B' (billions)."""
    if abs(count) < 999.5:
        return str(int(count))
    return _decimal(count, "", ("", "K", "M", "B", "T")).strip()


def fmt_percent(fraction: float) -> str:
    """0.4567 -> '45.7%'; tiny but non-zero shares print as '<0.01%' rather than '0%'."""
    pct = 100.0 * float(fraction)
    if pct == 0:
        return "0%"
    if abs(pct) < 0.01:
        return "<0.01%"
    if abs(pct) < 1:
        return f"{pct:.2f}%"
    if abs(pct) < 10:
        return f"{pct:.1f}%"
    return f"{pct:.0f}%"


def fmt_ranges(indices: Iterable[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    values = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts)


def plural(count: int, noun: str) -> str:
    """plural(1, 'stage') -> '1 stage'; plural(3, 'stage') -> '3 stages'; 'microbatch' -> 'microbatches'."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("ch", "sh", "s", "x")) else f"{count} {noun}s"


def _decimal(value: float, suffix: str, prefixes: tuple[str, ...]) -> str:
    v = float(value)
    for prefix in prefixes:
        if abs(v) < 999.5 or prefix == prefixes[-1]:
            text = str(int(v)) if prefix == "" else _three(v)
            return f"{text} {prefix}{suffix}"
        v /= 1000
    raise AssertionError("unreachable")


def _three(value: float) -> str:
    """Three significant digits without exponent: 1.23, 12.3, 123."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
