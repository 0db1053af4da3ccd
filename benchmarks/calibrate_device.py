"""Measure this machine with `autopart.calibrate()` and compare with the preset the planner uses otherwise.

    python benchmarks/calibrate_device.py [--quick] [--dtypes float32,bfloat16,float16] [--json cluster.json]
    torchrun --nproc_per_node=2 benchmarks/calibrate_device.py --json h200x2.json     # the links too

One table: each figure as measured, as the preset prices it without
calibration (datasheet peak × the default efficiency: 0.7 for matmuls, 0.8 for
memory), and their ratio. Under torchrun a second table times all-reduce and
send/recv per message size against what the fitted link and the preset link
predict (comm.py's formulas). --json saves the calibrated cluster for
`autopart.compile(model, "cluster.json")` or `autopart plan ... --devices cluster.json`.
On a CPU it measures the CPU (against the CPU preset's guesses).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import autopart
from autopart.cost_models import Cluster, DeviceSpec, Link, all_reduce_seconds, get_preset, p2p_seconds
from autopart.cost_models import measure
from autopart.frontend.device_arg import gpu_preset


def _preset(device: torch.device) -> DeviceSpec:
    if device.type == "cuda":
        return gpu_preset(torch.cuda.get_device_name(device)) or get_preset("H100")
    return get_preset("CPU")


def _rate(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _row(what: str, measured: str, preset: str, ratio: float | None) -> str:
    return f"{what:<30}{measured:>18}{preset:>18}{'' if ratio is None else f'{ratio:.2f}':>9}"


def _device_table(cluster: Cluster, preset: DeviceSpec, dtypes: list[str]) -> list[str]:
    spec = cluster.devices[0]
    lines = [f"{spec.name}: {cluster.num_devices} device(s) on {cluster.num_nodes} host(s); preset {preset.name}",
             _row("figure", "measured", "preset", None) + "  measured/preset", "-" * 90]
    lines.append(_row("memory", f"{spec.memory_bytes / 2**30:.1f} GiB", f"{preset.memory_bytes / 2**30:.1f} GiB",
                      spec.memory_bytes / preset.memory_bytes))
    for dtype in dtypes:
        got, assumed = spec.achieved_flops(dtype), preset.achieved_flops(dtype)
        lines.append(_row(f"{dtype} matmul (achieved)", _rate(got), _rate(assumed), got / assumed))
        if dtype in dict(spec.matmul_efficiency_by_dtype) and spec.peak_flops(dtype) == preset.peak_flops(dtype):
            fraction = dict(spec.matmul_efficiency_by_dtype)[dtype]
            lines.append(_row(f"  fraction of {_rate(spec.peak_flops(dtype))}", f"{fraction:.0%}",
                              f"{preset.matmul_efficiency:.0%}", fraction / preset.matmul_efficiency))
    got, assumed = spec.achieved_bandwidth, preset.achieved_bandwidth
    lines.append(_row("memory bandwidth (r + w)", f"{got / 1e9:.1f} GB/s", f"{assumed / 1e9:.1f} GB/s", got / assumed))
    lines.append(_row("launch floor per op", f"{spec.launch_overhead_s * 1e6:.2f} µs",
                      f"{preset.launch_overhead_s * 1e6:.2f} µs", spec.launch_overhead_s / preset.launch_overhead_s))
    preset_cluster = Cluster.from_devices((preset,))
    for which, link, base in (("intra-node", cluster.intra_node_link, preset_cluster.intra_node_link),
                              ("inter-node", cluster.inter_node_link, preset_cluster.inter_node_link)):
        tag = "" if link != base else " (preset)"
        lines.append(_row(f"{which} link α{tag}", f"{link.latency_s * 1e6:.1f} µs", f"{base.latency_s * 1e6:.1f} µs",
                          link.latency_s / base.latency_s if base.latency_s else None))
        lines.append(_row(f"{which} link β{tag}", f"{link.bandwidth / 1e9:.1f} GB/s",
                          f"{base.bandwidth / 1e9:.1f} GB/s", link.bandwidth / base.bandwidth))
    return lines


def _link_table(result: measure.LinkMeasurement, preset: Link) -> list[str]:
    p, fitted = result.group_size, result.link
    lines = [f"\nlinks over {p} ranks: measured vs predicted (comm.py) by the fitted and the preset link",
             f"{'bytes':>12}{'all-reduce':>12}{'fitted':>9}{'preset':>9}{'send/recv':>12}{'fitted':>9}{'preset':>9}",
             "-" * 72]
    for n, ar, sr in zip(result.num_bytes, result.all_reduce_times, result.send_recv_times):
        lines.append(f"{n:>12}{ar * 1e6:>10.0f}µs{all_reduce_seconds(n, p, fitted) / ar:>9.2f}"
                     f"{all_reduce_seconds(n, p, preset) / ar:>9.2f}{sr * 1e6:>10.0f}µs"
                     f"{p2p_seconds(n, fitted) / sr:>9.2f}{p2p_seconds(n, preset) / sr:>9.2f}")
    lines.append("(fitted: this run's joint fit; fitted, preset: predicted / measured)")
    for what, link in (("all-reduce alone", result.all_reduce), ("send/recv alone", result.send_recv),
                       ("both (the cluster's)", result.link)):
        lines.append(f"fit to {what:<22} α {link.latency_s * 1e6:7.1f} µs   β {link.bandwidth / 1e9:8.2f} GB/s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller CPU shapes")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated matmul dtypes to measure")
    parser.add_argument("--json", metavar="PATH", help="save the calibrated cluster here")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    cluster = autopart.calibrate(dtypes=dtypes, quick=args.quick)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    preset = _preset(device)
    measured = [d for d in dtypes if d in dict(cluster.devices[0].matmul_efficiency_by_dtype)]
    lines = _device_table(cluster, preset, measured)
    if world > 1:  # time the links once more, to show each size against the model
        result = measure.measure_links(quick=args.quick)
        lines += _link_table(result, Cluster.from_devices((preset,)).intra_node_link)
    if rank == 0:
        print("\n".join(lines))
        if args.json:
            cluster.save(args.json)
            print(f"\nsaved the calibrated cluster to {args.json}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
