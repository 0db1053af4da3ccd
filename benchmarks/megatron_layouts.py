"""autopart's plans against the layouts Megatron-LM published, under the same cost model.

The GPT configurations and layouts are those of Table 1 of Narayanan et al., "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM" (SC'21,
arXiv:2104.04473; the Megatron-LM README reproduces the table): vocabulary 51200, sequence
2048, A100 80GB GPUs, 8 per DGX node, tensor parallel t within a node, pipeline p across
nodes, data parallel d = GPUs / (t·p) on the rest, the batch size listed. Selene's nodes
have eight 200 Gb/s HDR InfiniBand NICs: 25 GB/s per GPU across nodes (NVLink 3 within).

Each row plans the model twice with `autopart.compile` on the meta device (bf16 autocast
over float32 state, Adam): "published" fixes the mesh to (d, p, t) with `data_parallel`,
`pipeline_parallel` and `tensor_parallel` and lets autopart choose the rest for it (microbatches,
schedule, DDP/ZeRO-2/ZeRO-3/HSDP, recomputation per block); "autopart" chooses everything.
Both are priced by the same cost model, so autopart's step is never slower unless the search
misses (the published mesh is one of the layouts it searches). A published layout that does
not fit in 80 GB even recomputing is marked so. "paper" is the iteration time the paper's measured TFLOP/s per GPU implies
(its eq. 3: 96·B·s·l·h²·(1 + s/6h + V/16lh) FLOPs per iteration, with recomputation).

    python benchmarks/megatron_layouts.py [--models 1.7B 3.6B 7.5B 18.4B 39.1B]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

import autopart
from autopart.cost_models import Cluster, Link, get_preset
from autopart.zoo import GPT

VOCAB, SEQ = 51200, 2048
A100_BF16_PEAK = 312e12  # dense, cost_models/devices.py
SELENE_INFINIBAND = Link(latency_s=1e-5, bandwidth=25e9)  # 8 × 200 Gb/s HDR per 8-GPU node


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of Table 1: model size, heads, hidden size, layers, t, p, GPUs, batch, TFLOP/s per GPU."""

    name: str
    heads: int
    hidden: int
    layers: int
    tensor: int
    pipeline: int
    gpus: int
    batch: int
    tflops_per_gpu: float

    @property
    def data(self) -> int:
        return self.gpus // (self.tensor * self.pipeline)

    def paper_step_seconds(self) -> float:
        b, s, l, h, v = self.batch, SEQ, self.layers, self.hidden, VOCAB
        flops = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
        return flops / (self.gpus * self.tflops_per_gpu * 1e12)


TABLE_1 = [
    Row("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    Row("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
    Row("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142),
    Row("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    Row("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138),
    Row("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    Row("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    Row("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    Row("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    Row("1008.0B", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def selene(gpus: int) -> Cluster:
    return Cluster.homogeneous(gpus, get_preset("A100-80GB"), gpus_per_node=8, inter_node_link=SELENE_INFINIBAND)


def plan(row: Row, fixed: bool):
    """(plan or the reason it does not fit, compile seconds)."""
    with torch.device("meta"):
        model = GPT(row.layers, row.hidden, row.heads, VOCAB, SEQ, attn_bias=True)
        ids = torch.randint(0, VOCAB, (row.batch, SEQ))
    mesh = dict(data_parallel=row.data, pipeline_parallel=row.pipeline, tensor_parallel=row.tensor) if fixed else {}
    started = time.perf_counter()
    try:
        compiled = autopart.compile(model, selene(row.gpus), example_inputs=(ids,), mixed_precision="bf16",
                                    optimizer="adam", **mesh)
    except autopart.PlanError as error:
        return str(error).splitlines()[0], time.perf_counter() - started
    return compiled.plan, time.perf_counter() - started


def describe(result, seconds: float, gpus: int) -> str:
    if isinstance(result, str):
        return f"does not fit ({seconds:.1f} s) |  |  | "
    p = result
    mesh = f"{p.mesh.dp}×{p.mesh.pp}×{p.mesh.tp}"
    schedule = p.schedule.replace("interleaved_1f1b", "interleaved") + (f" v{p.virtual_stages}"
                                                                       if p.virtual_stages > 1 else "")
    flops = sum(s.fwd_flops + s.bwd_flops for s in p.stages) * p.num_microbatches * p.mesh.dp
    mfu = flops / (p.predicted_step_seconds * gpus * A100_BF16_PEAK)
    return (f"{mesh} m={p.num_microbatches} {schedule} {p.data_parallel_mode} | {p.predicted_step_seconds:.2f} | "
            f"{mfu:.0%} | {seconds:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[r.name for r in TABLE_1])
    args = parser.parse_args()
    print("| model | GPUs | batch | paper d×p×t | paper s | published layout, autopart's settings | step s | MFU "
          "| plan s | autopart's own plan | step s | MFU | plan s | autopart / published |")
    print("|---" * 14 + "|")
    for row in TABLE_1:
        if row.name not in args.models:
            continue
        published, published_s = plan(row, fixed=True)
        own, own_s = plan(row, fixed=False)
        ratio = (f"{own.predicted_step_seconds / published.predicted_step_seconds:.2f}×"
                 if not isinstance(own, str) and not isinstance(published, str) else "-")
        print(f"| {row.name} | {row.gpus} | {row.batch} | {row.data}×{row.pipeline}×{row.tensor} | "
              f"{row.paper_step_seconds():.1f} | {describe(published, published_s, row.gpus)} | "
              f"{describe(own, own_s, row.gpus)} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
