"""Measure the machine at hand: matmul rate per dtype, memory bandwidth, per-op floor, link α–β.

Pure measurement with torch (numpy for the fit); `autopart.calibrate()` turns
the figures into a `Cluster`. Units: FLOP/s, bytes/s, seconds, bytes.

How each figure is taken (every timing: warm-up first, the device
synchronised around the timed region, the median of several runs):
- matmul: the four weight matmuls of a transformer layer (QKV d→3d, attention
  output d→d, MLP up d→4d, MLP down 4d→d) over `tokens` rows, random normal
  inputs; rate = Σ FLOPs / Σ median seconds, the rate a whole layer sees.
  float32 runs with TF32 off (`torch.set_float32_matmul_precision("highest")`
  for the measurement), as `DeviceSpec.peak_flops` prices float32.
- memory bandwidth: a device-to-device copy of a buffer far larger than the
  caches; (bytes read + bytes written) / seconds, the way the roofline counts
  an op's bytes (passes/annotate.py).
- launch floor: seconds per tiny in-place add, issued back to back: what eager
  PyTorch pays per op (dispatch, launch, tail) when there is no work.
- fused kernels (GPUs): TorchInductor's generated kernels, their bandwidth (an RMS
  norm) and what each adds to a compiled call (`measure_fused_kernels`).
- links: all-reduce and send/recv (ping-pong between two ranks, half the round
  trip) at message sizes from kilobytes to hundreds of megabytes, then α and β
  by least squares through comm.py's own formulas, so a fitted `Link` prices
  exactly what was timed. Every rank returns rank 0's timings.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autopart.cost_models.comm import all_reduce_seconds, p2p_seconds
from autopart.cost_models.devices import MATMUL_EFFICIENCY, DeviceSpec, _dtype_name, _host_memory_bytes
from autopart.cost_models.links import Link

Shape = tuple[int, int, int]


def transformer_matmul_shapes(tokens: int, d_model: int) -> tuple[Shape, ...]:
    """(m, k, n) of one transformer layer's weight matmuls over `tokens` rows of width `d_model`."""
    if tokens < 1 or d_model < 1:
        raise ValueError(f"transformer_matmul_shapes(tokens={tokens}, d_model={d_model}): both must be >= 1")
    d = d_model
    return ((tokens, d, 3 * d), (tokens, d, d), (tokens, d, 4 * d), (tokens, 4 * d, d))


# GPU: a 7B-class layer (d 4096) over 8192 tokens (e.g. batch 8 × sequence
# 1024), large enough to keep an H100/H200's tensor cores busy. CPU: scaled by
# 1/32 in tokens and 1/8 in width so the four matmuls take tens of
# milliseconds on a few cores.
GPU_MATMUL_SHAPES = transformer_matmul_shapes(8192, 4096)
CPU_MATMUL_SHAPES = transformer_matmul_shapes(256, 512)
CPU_MATMUL_SHAPES_QUICK = transformer_matmul_shapes(128, 512)


def default_matmul_shapes(device: torch.device | str, *, quick: bool = False) -> tuple[Shape, ...]:
    """The transformer shapes measure_matmul_flops times on `device` (smaller on the CPU)."""
    if torch.device(device).type == "cuda":
        return GPU_MATMUL_SHAPES
    return CPU_MATMUL_SHAPES_QUICK if quick else CPU_MATMUL_SHAPES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, *, repeats: int, inner: int = 1,
                    warmup: int = 1, budget_s: float | None = None) -> float:
    """Median seconds of one `fn()` over `repeats` timed runs of `inner` calls each (at least 3 runs).

    `budget_s` stops early, after the third run, once the timed runs together took that long.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    for i in range(max(repeats, 1)):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / inner)
        if budget_s is not None and i >= 2 and sum(times) * inner >= budget_s:
            break
    return statistics.median(times)


class _Float32Highest:
    """Within the block, float32 matmuls run in full float32 (no TF32), then the setting is restored."""

    def __enter__(self) -> None:
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc: object) -> None:
        torch.set_float32_matmul_precision(self.saved)


def supports_matmul(device: torch.device | str, dtype: torch.dtype | str) -> bool:
    """Whether a small matmul in `dtype` runs on `device`."""
    device, dtype = torch.device(device), _torch_dtype(dtype)
    try:
        a = torch.ones(8, 8, device=device, dtype=dtype)
        (a @ a).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name; use e.g. 'float32', 'bfloat16', 'float16'")
    return value


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype | str,
                         shapes: Sequence[Shape] | None = None, *, repeats: int = 10,
                         budget_s: float = 2.0) -> float:
    """FLOP/s of dense matmuls in `dtype` on `device` at `shapes` ((m, k, n) each; 2·m·k·n FLOPs).

    Default shapes: `default_matmul_shapes(device)`. Each shape runs once to
    warm up, then `repeats` times (at least 3, fewer once `budget_s` seconds
    are spent on it); the result is Σ FLOPs / Σ median seconds.
    """
    device, torch_dtype = torch.device(device), _torch_dtype(dtype)
    shapes = tuple(shapes) if shapes is not None else default_matmul_shapes(device)
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ValueError(f"measure_matmul_flops(shapes={shapes}): give (m, k, n) triples of positive sizes")
    total_flops = total_seconds = 0.0
    counts = {shape: shapes.count(shape) for shape in dict.fromkeys(shapes)}  # a repeated shape is timed once
    with _Float32Highest():
        for (m, k, n), count in counts.items():
            a = torch.randn(m, k, device=device, dtype=torch_dtype)
            b = torch.randn(k, n, device=device, dtype=torch_dtype)
            out = torch.empty(m, n, device=device, dtype=torch_dtype)
            total_seconds += count * _median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats=repeats,
                                                     budget_s=budget_s)
            total_flops += count * 2.0 * m * k * n
            del a, b, out
    return total_flops / total_seconds


def default_copy_bytes(device: torch.device | str, *, quick: bool = False) -> int:
    """Bytes of the buffer measure_memory_bandwidth copies: far above any cache, within free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        wanted = (256 if quick else 1024) * 2**20
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(wanted, free // 4))
    return (128 if quick else 256) * 2**20


def measure_memory_bandwidth(device: torch.device | str, num_bytes: int | None = None, *,
                             repeats: int = 10) -> float:
    """Bytes/s (read + written) of copying a `num_bytes` buffer into another on `device`."""
    device = torch.device(device)
    num_bytes = num_bytes or default_copy_bytes(device)
    if num_bytes < 4:
        raise ValueError(f"measure_memory_bandwidth(num_bytes={num_bytes}): give at least 4 bytes")
    src = torch.ones(num_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    moved = 2.0 * src.numel() * src.element_size()  # one read and one write of the buffer
    del src, dst
    return moved / seconds


def measure_launch_floor(device: torch.device | str, *, num_ops: int = 500, repeats: int = 10) -> float:
    """Seconds per tiny elementwise op (a one-element in-place add) issued back to back on `device`."""
    device = torch.device(device)
    x = torch.zeros(1, device=device)
    return _median_seconds(lambda: x.add_(1.0), device, repeats=repeats, inner=num_ops, warmup=num_ops)


def measure_fused_kernels(device: torch.device | str, num_bytes: int | None = None, *, repeats: int = 10,
                          chain: int = 16, width: int = 4096) -> tuple[float, float]:
    """(bytes/s, seconds per kernel) of TorchInductor's generated kernels on `device`.

    Bandwidth: an RMS norm compiled as one kernel (`x · rsqrt(mean(x²) + ε) · w` over rows of `width`
    float32: a model's activation width), counting x read once and the result written once. Per kernel: a compiled chain of
    `chain` tiny steps against one, each step a generated elementwise kernel and a 16×16 library
    matmul that separates it from the next (a chain of elementwise ops alone would fuse into one
    kernel); its slope less that of a chain of the matmuls alone is what each generated kernel
    adds (its launch through Inductor's wrapper and its tail), apart from the call's guard checks.
    """
    device = torch.device(device)
    num_bytes = num_bytes or default_copy_bytes(device) // 2
    rows = max(1, num_bytes // (4 * width))
    x = torch.randn(rows, width, device=device)
    w = torch.randn(width, device=device)

    def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    norm = torch.compile(rms_norm, dynamic=False)
    seconds = _median_seconds(lambda: norm(x, w), device, repeats=repeats, warmup=2)
    bandwidth = 2.0 * x.numel() * x.element_size() / seconds
    del x

    def steps(y: torch.Tensor, m: torch.Tensor, count: int, elementwise: bool) -> torch.Tensor:
        for _ in range(count):  # with `elementwise`, a generated kernel before each library matmul
            y = torch.mm(torch.sin(y) * 1.0001 if elementwise else y, m)
        return y

    tiny, mix = torch.randn(16, 16, device=device), torch.randn(16, 16, device=device)

    def slope(elementwise: bool) -> float:
        """Seconds each step of a compiled chain adds."""
        one = torch.compile(lambda y: steps(y, mix, 1, elementwise), dynamic=False)
        many = torch.compile(lambda y: steps(y, mix, chain, elementwise), dynamic=False)
        t_one = _median_seconds(lambda: one(tiny), device, repeats=repeats, inner=50, warmup=3)
        t_many = _median_seconds(lambda: many(tiny), device, repeats=repeats, inner=50, warmup=3)
        return (t_many - t_one) / (chain - 1)

    return bandwidth, max(0.0, slope(True) - slope(False))


def measure_memory_capacity(device: torch.device | str) -> int:
    """Bytes of memory on `device`: the GPU's total (torch.cuda.mem_get_info), or the host's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return _host_memory_bytes()


def calibrated_spec(*, name: str, device_type: str, memory_bytes: int, matmul_flops: dict[str, float],
                    memory_bandwidth: float, launch_overhead_s: float,
                    datasheet: DeviceSpec | None = None, fused_bandwidth: float | None = None,
                    fused_launch_s: float | None = None) -> DeviceSpec:
    """A DeviceSpec whose achieved rates are the measured ones.

    `matmul_flops`: measured FLOP/s per dtype name (needs "float32");
    `memory_bandwidth`: measured bytes/s read + written. With `datasheet` (the
    preset of this GPU) the peaks stay the datasheet's and the measured
    fractions of them become the efficiencies, so `peak_flops` stays the MFU
    denominator; dtypes not measured keep the datasheet peak at the default
    efficiency. A figure above its datasheet peak (the preset does not
    describe this device) becomes its own peak at efficiency 1.0. Without a
    datasheet the measured rates are the peaks, every efficiency 1.0. Either
    way `achieved_flops(d) == matmul_flops[d]` for each measured dtype and
    `achieved_bandwidth == memory_bandwidth`. `fused_bandwidth` and `fused_launch_s`
    (TorchInductor's kernels, `measure_fused_kernels`) become `achieved_fused_bandwidth` (capped
    at the peak) and `fused_launch_seconds`.
    """
    measured = {_dtype_name(k): float(v) for k, v in matmul_flops.items()}
    if "float32" not in measured:
        raise ValueError(f"calibrated_spec(matmul_flops={measured}): needs a 'float32' figure (the fallback row)")
    peaks = dict(datasheet.peak_flops_by_dtype) if datasheet is not None else {}
    fractions: dict[str, float] = {}
    for dtype, rate in measured.items():
        if dtype in peaks and rate < peaks[dtype]:
            fractions[dtype] = rate / peaks[dtype]
        else:
            peaks[dtype], fractions[dtype] = rate, 1.0
    if datasheet is not None and memory_bandwidth < datasheet.memory_bandwidth:
        bandwidth, memory_fraction = datasheet.memory_bandwidth, memory_bandwidth / datasheet.memory_bandwidth
    else:
        bandwidth, memory_fraction = memory_bandwidth, 1.0
    return DeviceSpec(
        name=name,
        memory_bytes=int(memory_bytes),
        memory_bandwidth=float(bandwidth),
        peak_flops_by_dtype=tuple(peaks.items()),
        launch_overhead_s=float(launch_overhead_s),
        device_type=device_type,
        matmul_efficiency=MATMUL_EFFICIENCY if datasheet is not None else 1.0,
        matmul_efficiency_by_dtype=tuple(fractions.items()),
        memory_efficiency=memory_fraction,
        fused_memory_efficiency=min(1.0, fused_bandwidth / bandwidth) if fused_bandwidth else None,
        fused_launch_overhead_s=fused_launch_s,
    )


# --- links ----------------------------------------------------------------------


def model_terms(cost: Callable[[float, Link], float], num_bytes: float) -> tuple[float, float]:
    """(latency terms, byte terms) of a linear α–β cost: cost(n, link) = a·α + b·n/β.

    Read off the cost function itself (α = 1 s with infinite β, then α = 0 with
    β = 1 byte/s), so a fit through them uses comm.py's formulas unchanged.
    """
    a = cost(num_bytes, Link(latency_s=1.0, bandwidth=math.inf))
    b = cost(num_bytes, Link(latency_s=0.0, bandwidth=1.0)) / num_bytes
    return a, b


def fit_alpha_beta(num_bytes: Sequence[float], seconds: Sequence[float], *,
                   latency_terms: float | Sequence[float] = 1.0,
                   byte_terms: float | Sequence[float] = 1.0) -> Link:
    """Least-squares α (s) and β (bytes/s) of t = latency_terms·α + byte_terms·n/β.

    The terms are per sample or shared: send/recv pays 1 and 1; a ring
    all-reduce over p ranks 2(p−1) and 2(p−1)/p (`model_terms` reads them off
    comm.py). Residuals are relative (each row divided by its time), so small
    messages, which fix α, count as much as large ones, which fix β. α < 0
    (noise) refits with α = 0.
    """
    n = np.asarray(num_bytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    where = f"fit_alpha_beta(num_bytes={list(n)}, seconds={list(t)})"
    if n.shape != t.shape or n.ndim != 1 or len(n) < 2:
        raise ValueError(f"{where}: needs two equally long lists with at least two samples")
    if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(np.isfinite(n)) and np.all(n > 0)):
        raise ValueError(f"{where}: sizes and times must be finite and > 0")
    a = np.broadcast_to(np.asarray(latency_terms, dtype=np.float64), n.shape)
    b = np.broadcast_to(np.asarray(byte_terms, dtype=np.float64), n.shape) * n
    rows = np.stack([a / t, b / t], axis=1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(rows, np.ones_like(t), rcond=None)
    if alpha < 0:
        alpha, c = 0.0, b / t
        inv_beta = float(c.sum() / (c * c).sum())
    if not inv_beta > 0:
        raise ValueError(f"{where}: the times do not grow with the message size, so β cannot be fitted; "
                         "time larger messages")
    return Link(latency_s=float(alpha), bandwidth=float(1.0 / inv_beta))


@dataclass(frozen=True, kw_only=True)
class LinkMeasurement:
    """Timed all-reduces and send/recvs over one process group, and the α–β links fitted to them."""

    link: Link
    """Fitted to all timings at once through comm.py's formulas: the link a Cluster carries."""
    all_reduce: Link
    """Fitted to the all-reduce timings alone (all_reduce_seconds over group_size ranks)."""
    send_recv: Link
    """Fitted to the send/recv timings alone (p2p_seconds)."""
    group_size: int
    """Ranks in the group."""
    num_bytes: tuple[int, ...]
    """Message sizes timed, in bytes."""
    all_reduce_times: tuple[float, ...]
    """Median seconds of one all-reduce of each size."""
    send_recv_times: tuple[float, ...]
    """Median seconds of one message of each size from one rank to another (half a round trip)."""


def default_link_sizes(device: torch.device | str, *, quick: bool = False) -> tuple[int, ...]:
    """Message sizes (bytes) measure_links times, in ×4 steps: 64 KiB–256 MiB (quick: 64 MiB) on GPUs,
    4 KiB–16 MiB between CPU processes (gloo over loopback: below a few MiB the per-message
    latency hides the bandwidth term)."""
    if torch.device(device).type == "cuda":
        low, high = 16, 26 if quick else 28
    else:
        low, high = 12, 24
    return tuple(2**k for k in range(low, high + 1, 2))


def _inner_iterations(num_bytes: int, device: torch.device) -> int:
    """Calls per timed run: enough to outlast the timer for small messages; the same on every rank."""
    per_run = 2**26 if device.type == "cuda" else 2**22
    return max(1, min(50 if device.type == "cuda" else 20, per_run // num_bytes))


def group_device(group: object = None) -> torch.device:
    """Where a collective over `group` wants its tensors: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def measure_links(group: object = None, *, device: torch.device | str | None = None,
                  sizes: Sequence[int] | None = None, repeats: int = 5, quick: bool = False,
                  peer: int = 1) -> LinkMeasurement:
    """Time all-reduce and send/recv over `group` (default: the world) and fit α–β links; every rank calls it.

    torch.distributed must be initialised with at least two ranks in the
    group. `device`: where the buffers live (default: the current CUDA device
    for NCCL, else the CPU). Send/recv ping-pongs between group ranks 0 and
    `peer`; the other ranks wait. Every rank returns the same figures: those
    rank 0 measured.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("measure_links: torch.distributed is not initialised; start the ranks with torchrun "
                           "and call torch.distributed.init_process_group() first")
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size < 2:
        raise ValueError(f"measure_links: the group has {size} rank; links need at least two")
    if not 0 < peer < size:
        raise ValueError(f"measure_links(peer={peer}): must be a group rank in 1 .. {size - 1}")
    device = torch.device(device) if device is not None else group_device(group)
    sizes = tuple(int(s) for s in (sizes or default_link_sizes(device, quick=quick)))
    if len(sizes) < 2 or min(sizes) < 4:
        raise ValueError(f"measure_links(sizes={sizes}): give at least two sizes of 4 bytes or more")
    repeats = 3 if quick else repeats
    first, second = dist.get_global_rank(group, 0), dist.get_global_rank(group, peer)
    token = torch.zeros(1, device=device)

    def line_up() -> None:  # every rank starts a timed run together
        dist.all_reduce(token, group=group)
        _sync(device)

    all_reduce_times, send_recv_times = [], []
    for num_bytes in sizes:
        # zeros: the values do not change the speed, and sums of zeros never overflow
        buf = torch.zeros(num_bytes // 4, device=device, dtype=torch.float32)
        inner = _inner_iterations(num_bytes, device)

        def all_reduce() -> None:
            dist.all_reduce(buf, group=group)

        def ping_pong() -> None:
            if rank == 0:
                dist.send(buf, dst=second, group=group)
                dist.recv(buf, src=second, group=group)
            elif rank == peer:
                dist.recv(buf, src=first, group=group)
                dist.send(buf, dst=first, group=group)

        for fn, out, scale in ((all_reduce, all_reduce_times, 1.0), (ping_pong, send_recv_times, 0.5)):
            for _ in range(2):
                fn()
            runs = []
            for _ in range(repeats):
                line_up()
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                _sync(device)
                runs.append((time.perf_counter() - start) / inner * scale)
            out.append(statistics.median(runs))
        del buf
    times = torch.tensor(all_reduce_times + send_recv_times, dtype=torch.float64, device=device)
    dist.broadcast(times, src=first, group=group)
    values = times.cpu().tolist()
    all_reduce_times, send_recv_times = values[: len(sizes)], values[len(sizes):]

    def ring(n: float, link: Link) -> float:
        return all_reduce_seconds(n, size, link)

    ar_terms = [model_terms(ring, n) for n in sizes]
    p2p_terms = [model_terms(p2p_seconds, n) for n in sizes]
    terms = ar_terms + p2p_terms
    return LinkMeasurement(
        link=fit_alpha_beta(sizes + sizes, all_reduce_times + send_recv_times,
                            latency_terms=[a for a, _ in terms], byte_terms=[b for _, b in terms]),
        all_reduce=fit_alpha_beta(sizes, all_reduce_times, latency_terms=[a for a, _ in ar_terms],
                                  byte_terms=[b for _, b in ar_terms]),
        send_recv=fit_alpha_beta(sizes, send_recv_times),
        group_size=size,
        num_bytes=sizes,
        all_reduce_times=tuple(all_reduce_times),
        send_recv_times=tuple(send_recv_times),
    )


__all__ = [
    "CPU_MATMUL_SHAPES",
    "GPU_MATMUL_SHAPES",
    "LinkMeasurement",
    "calibrated_spec",
    "default_copy_bytes",
    "default_link_sizes",
    "default_matmul_shapes",
    "fit_alpha_beta",
    "measure_fused_kernels",
    "group_device",
    "measure_launch_floor",
    "measure_links",
    "measure_matmul_flops",
    "measure_memory_bandwidth",
    "measure_memory_capacity",
    "model_terms",
    "supports_matmul",
    "transformer_matmul_shapes",
]
