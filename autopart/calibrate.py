"""`autopart.calibrate()`: measure the machine at hand and return the `Cluster` that describes it.

The measurements themselves are in `autopart.cost_models.measure`; this
module picks the device, asks every rank to agree on one set of figures,
chooses the links (measured under torchrun, the preset for the kind of
device otherwise) and reports progress on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from autopart.cost_models import Cluster, DeviceSpec, Link
from autopart.cost_models import measure, shaped
from autopart.cost_models.devices import _dtype_name
from autopart.frontend.device_arg import gpu_preset
from autopart.core.errors import InputError


def calibrate(device: torch.device | str | None = None, *,
              dtypes: Sequence[str | torch.dtype] = ("float32", "bfloat16"), quick: bool = False,
              num_devices: int | None = None, name: str | None = None, gpus_per_node: int | None = None,
              kernels: bool | None = None, verbose: bool = True, model: torch.nn.Module | None = None,
              example_inputs: tuple | None = None, example_kwargs: dict | None = None) -> Cluster:
    """Measure this process's device, and the links between ranks when several run, into a `Cluster`.

    Measures (see `autopart.cost_models.measure` and `.shaped` for how): the
    matmul rate for each of `dtypes` over every GEMM of training a transformer
    layer (forward, input and weight gradients; float32 always, with TF32 off;
    a dtype the device cannot multiply in is skipped), the memory bandwidth the
    elementwise kernels between them reach (casts, residual add, a norm's
    square, mean and weight, activation; a large copy is reported beside), the
    per-op launch floor, the memory capacity
    (`torch.cuda.mem_get_info`'s total, or the host's RAM), and, when
    torch.distributed is initialised with several ranks (every rank must
    call), the α–β link fitted to all-reduce and send/recv timings. Every
    rank returns the same Cluster: device figures are averaged over the
    ranks (capacity: the smallest), link figures are rank 0's.

    device: default the current CUDA device if there is one, else the CPU.
    quick: fewer repetitions and smaller CPU shapes (about two seconds on a CPU).
    num_devices: devices in the Cluster, all with the measured spec (default:
    the world size under torch.distributed, else the CUDA device count, else 1).
    name: the spec's name (default: the GPU's preset or name, or "CPU", plus
    " (calibrated)"). gpus_per_node: devices per host (default: torchrun's
    LOCAL_WORLD_SIZE, else this host's GPU count; CPU devices share one host).
    kernels: also measure TorchInductor's fused kernels (bandwidth, seconds per kernel) for plans
    that compile (`compile_kernels`); default on for GPUs (a few seconds of compiling), off for the CPU.
    model, example_inputs, example_kwargs: the shapes to measure at, the model's own (its weight
    matmuls over the example batch's rows, its activation width), instead of a 7B-class layer's
    (d 4096 over 8192 tokens; smaller on the CPU): rates measured at the shapes a plan runs.

    A GPU with a datasheet preset (H100, H200, A100) keeps the preset's peaks
    and stores the measured fractions of them as efficiencies, so
    `peak_flops` stays the MFU denominator; otherwise the measured rates are
    the peaks (DeviceSpec's docstring). Links not measured (one process) are
    the presets for that kind of device: NVLink within a host of H100/H200s,
    InfiniBand NDR across hosts, loopback between CPU processes. Save the
    result with `cluster.save("cluster.json")`; `autopart.compile(model,
    "cluster.json", ...)` and `autopart plan ... --devices cluster.json` read it.
    """
    if num_devices is not None and num_devices < 1:
        raise InputError(f"calibrate(num_devices={num_devices}): needs at least one device")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise InputError(f"calibrate(gpus_per_node={gpus_per_node}): must be >= 1")
    dist = _distributed()
    world = dist.get_world_size() if dist is not None else 1
    dev = _pick_device(device)

    def say(text: str) -> None:
        if verbose and (dist is None or dist.get_rank() == 0):
            print(f"[autopart.calibrate] {text}", file=sys.stderr, flush=True)

    datasheet = gpu_preset(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    label = (datasheet.name if datasheet else torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "CPU"
    say(f"measuring {dev} ({label}{', ' + str(world) + ' ranks' if world > 1 else ''}"
        f"{', quick' if quick else ''}); datasheet: "
        + (f"the {datasheet.name} preset" if datasheet else "none, the measured rates are the peaks"))
    repeats = 5 if quick else 10
    names = ["float32"] + [n for n in dict.fromkeys(_dtype_name(d) for d in dtypes) if n != "float32"]
    unknown = [n for n in names if not isinstance(getattr(torch, n, None), torch.dtype)]
    if unknown:
        raise InputError(f"calibrate(dtypes={tuple(dtypes)}): {unknown} are not torch dtype names; "
                         "use e.g. 'float32', 'bfloat16', 'float16'")
    if model is not None:
        forward, (rows, width) = model_matmul_shapes(model, example_inputs, example_kwargs)
        say(f"shapes of {type(model).__name__}: {len(forward)} weight matmuls, {rows} rows × d {width}")
    else:
        forward = measure.default_matmul_shapes(dev, quick=quick)
        rows, width = forward[0][0], forward[0][1]
    shapes = shaped.training_matmul_shapes(forward)
    rates: dict[str, float] = {}
    for dtype in names:
        if not measure.supports_matmul(dev, dtype):
            say(f"{dtype} matmul: not supported on {dev}, skipped")
            continue
        rates[dtype] = measure.measure_matmul_flops(dev, dtype, shapes, repeats=repeats,
                                                    budget_s=0.5 if quick else 2.0)
    copy = measure.measure_memory_bandwidth(dev, measure.default_copy_bytes(dev, quick=quick), repeats=repeats)
    bandwidth, each_kernel = shaped.measure_elementwise_bandwidth(dev, rows, width, repeats=repeats)
    floor = measure.measure_launch_floor(dev, repeats=repeats)
    capacity = measure.measure_memory_capacity(dev)
    fused_bandwidth = fused_launch = None
    if kernels if kernels is not None else dev.type == "cuda":
        fused_bandwidth, fused_launch = measure.measure_fused_kernels(dev, repeats=repeats, width=width)
    if dist is not None:  # every rank plans with the same figures
        values = _agree(dist, list(rates.values()) + [bandwidth, floor], "mean")
        rates = dict(zip(rates, values[:-2]))
        bandwidth, floor = values[-2:]
        if fused_bandwidth is not None:
            fused_bandwidth, fused_launch = _agree(dist, [fused_bandwidth, fused_launch], "mean")
        capacity = int(_agree(dist, [float(capacity)], "min")[0])
    for dtype, rate in rates.items():
        versus = f", {rate / datasheet.peak_flops(dtype):.0%} of the datasheet peak" if datasheet else ""
        say(f"{dtype} matmul: {_flops(rate)} (forward, input and weight gradients of {len(forward)} weight "
            f"matmuls, {rows} rows × d {width}{versus})")
    versus = f", {bandwidth / datasheet.memory_bandwidth:.0%} of the datasheet" if datasheet else ""
    say(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s read + written (eager elementwise kernels over "
        f"{rows} × {width}{versus}; slowest: {min(each_kernel, key=each_kernel.get)}; "
        f"a copy: {copy / 1e9:.1f} GB/s)")
    say(f"launch floor: {floor * 1e6:.2f} µs per op; memory: {capacity / 2**30:.1f} GiB")
    if fused_bandwidth is not None:
        say(f"fused kernels: {fused_bandwidth / 1e9:.1f} GB/s read + written (an RMS norm over d {width}), "
            f"{fused_launch * 1e6:.2f} µs per generated kernel")
    spec = measure.calibrated_spec(
        name=name or f"{label} (calibrated)", device_type=dev.type, memory_bytes=capacity, matmul_flops=rates,
        memory_bandwidth=bandwidth, launch_overhead_s=floor, datasheet=datasheet,
        fused_bandwidth=fused_bandwidth, fused_launch_s=fused_launch)

    count = num_devices if num_devices is not None else (world if dist is not None else _local_count(dev))
    ranks_per_host = _per_node(dist, world, dev)  # how the ranks that run now sit on hosts
    per_node = gpus_per_node if gpus_per_node is not None else ranks_per_host
    intra, inter = _preset_links(datasheet or spec)
    if dist is not None:
        intra, inter = _measure_links(dist, world, ranks_per_host, intra, inter, quick, say)
    node_of_device = tuple(0 if dev.type == "cpu" and dist is None else i // per_node for i in range(count))
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # give back the buffers the measurements took
    return Cluster(devices=(spec,) * count, node_of_device=node_of_device, intra_node_link=intra,
                   inter_node_link=inter)


def model_matmul_shapes(model: torch.nn.Module, example_inputs: tuple | None,
                        example_kwargs: dict | None = None) -> tuple[tuple[measure.Shape, ...], tuple[int, int]]:
    """(the (m, k, n) of every weight matmul of `model` over the example batch, (rows, width) of its
    activations: the most common m and k). Traced on fake tensors (a meta model will do)."""
    from autopart.frontend.tracing import trace

    if example_inputs is None:
        raise InputError("calibrate(model=...) needs example_inputs=(...), the batch the plans will run")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm = trace(model, args, example_kwargs)
    shapes: list[measure.Shape] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _WEIGHT_MATMULS or len(node.args) < 2:
            continue
        x, w = (a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in node.args[:2])
        if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.dim() == 2 and x.dim() >= 1):
            continue
        k = x.shape[-1]
        n = w.shape[0] if node.target is torch.ops.aten.linear.default else w.shape[1]
        shapes.append((max(1, x.numel() // max(k, 1)), k, n))
    if not shapes:
        raise InputError(f"calibrate(model={type(model).__name__}): the model has no weight matmul (linear, mm) "
                         "to measure at; calibrate without model=")
    rows = max(set(m for m, _, _ in shapes), key=[m for m, _, _ in shapes].count)
    width = max(set(k for _, k, _ in shapes), key=[k for _, k, _ in shapes].count)
    return tuple(shapes), (rows, width)


_WEIGHT_MATMULS = (torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.matmul.default)
"""ATen ops a weight matmul traces to (an input and a 2-D weight)."""


def _distributed() -> Any:
    """The torch.distributed module when it is initialised with several ranks, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"calibrate(device={str(device)!r}): CUDA is not available here; calibrate the "
                             "CPU (device='cpu') or run on the GPU machine")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        raise InputError(f"calibrate(device={str(device)!r}): only 'cuda' and 'cpu' devices can be measured")
    return dev


def _local_count(dev: torch.device) -> int:
    return torch.cuda.device_count() if dev.type == "cuda" else 1


def _per_node(dist: Any, world: int, dev: torch.device) -> int:
    if dist is not None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return local if local >= 1 and world % local == 0 else world
    return max(1, _local_count(dev))


def _preset_links(spec: DeviceSpec) -> tuple[Link, Link]:
    """(intra, inter) links the presets give a cluster of `spec` devices."""
    preset = Cluster.from_devices((spec,))
    return preset.intra_node_link, preset.inter_node_link


def _agree(dist: Any, values: list[float], how: str) -> list[float]:
    """The mean (or min) of `values` over all ranks, the same on every rank."""
    device = measure.group_device(None)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if how == "min" else dist.ReduceOp.SUM)
    if how == "mean":
        tensor /= dist.get_world_size()
    return tensor.cpu().tolist()


def _measure_links(dist: Any, world: int, per_node: int, intra: Link, inter: Link, quick: bool,
                   say: Callable[[str], None]) -> tuple[Link, Link]:
    """Measured (intra, inter) links; a kind of link the ranks do not span keeps its preset."""
    num_nodes = world // per_node
    if num_nodes == 1:
        intra = _fit(measure.measure_links(quick=quick), "within the host", say)
        return intra, inter
    # Several hosts: the world's ring is bound by the network; rank 0 pings the first rank of host 1.
    inter = _fit(measure.measure_links(quick=quick, peer=per_node), f"across {num_nodes} hosts", say)
    if per_node > 1:
        group, _ = dist.new_subgroups(group_size=per_node)
        local = measure.measure_links(group, quick=quick).link  # each host measures its own
        alpha, beta = _agree(dist, [local.latency_s, local.bandwidth], "mean")
        intra = Link(latency_s=alpha, bandwidth=beta)
        say(f"link within a host (mean over hosts): α {alpha * 1e6:.1f} µs, β {beta / 1e9:.2f} GB/s")
    return intra, inter


def _fit(result: measure.LinkMeasurement, where: str, say: Callable[[str], None]) -> Link:
    for what, link in (("all-reduce", result.all_reduce), ("send/recv", result.send_recv),
                       ("both (the cluster's link)", result.link)):
        say(f"link {where}, {what} over {result.group_size} ranks: α {link.latency_s * 1e6:.1f} µs, "
            f"β {link.bandwidth / 1e9:.2f} GB/s")
    return result.link


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
