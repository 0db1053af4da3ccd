"""One GPU: a Mixtral-style mixture-of-experts training step, measured against the planner.

    torchrun --nproc_per_node=1 benchmarks/moe_step.py [--cases mixtral8-mixed,mixtral8-bf16] [--out r.json]

The model: transformers' MixtralForCausalLM, 8 layers × d 1024, 32 heads (8 key-value heads),
8 experts of width 2048 per layer, top-2 routing, vocabulary 32000 (about 490M parameters);
sequence 1024, batch 8, AdamW. Cases:

| name | precision | expert kernels that run |
|---|---|---|
| mixtral8-mixed | float32 weights, bf16 autocast | `transformers::grouped_mm_fallback`, one mm per expert: in bf16 in autopart's runner (both operands cast, passes/expert_precision.py), in float32 in the eager model (HF casts the tokens to the weights' dtype) |
| mixtral8-bf16 | model.to(bfloat16) | `aten._grouped_mm` (one grouped bf16 kernel) |

Both sides as in benchmarks/single_gpu_step.py (same harness, imported): eager HF model with
`torch.autocast` for the mixed case, autopart's runner for one device; median of `--steps`
steps after `--warmup`; peak = `torch.cuda.max_memory_allocated`. It prints predicted and
measured step time and peak memory, and the predicted seconds of the expert matmuls
(forward + backward, from the plan's traced graph) beside the whole step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import single_gpu_step as harness  # noqa: E402 - the benchmark directory is not a package

CASES = [
    harness.Case("mixtral8-mixed", "mixtral", 8, 1024, 8, "adamw", "mixed"),
    harness.Case("mixtral8-bf16", "mixtral", 8, 1024, 8, "adamw", "bf16"),
]


def expert_seconds(case: harness.Case, seq: int, device_name: str) -> float:
    """Predicted forward + backward seconds of every grouped expert matmul of one step (meta device)."""
    import autopart
    from autopart.cost_models import Cluster
    from autopart.cost_models.experts import expert_matmul_flops
    from autopart.frontend.source import annotate_graph
    from autopart.passes.node_costs import node_cost

    with torch.device("meta"):
        model = harness.build(case, seq)
    ids = torch.randint(0, harness.VOCAB[case.family], (case.batch, seq))
    gm = annotate_graph(autopart.trace(model, (ids,)), Cluster.parse(f"1x{device_name}"),
                        torch.bfloat16 if case.precision == "mixed" else None)   # as the planner costs it
    total = 0.0
    for node in gm.graph.nodes:
        operands = [a.meta.get("val") for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if node.op == "call_function" and len(operands) == 2 and expert_matmul_flops(node.target, operands):
            cost = node_cost(node)
            total += cost.fwd_seconds(device_name) + cost.bwd_seconds(device_name)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="all")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device-preset", default="H100", help="preset the expert breakdown is priced for")
    parser.add_argument("--tiny", action="store_true", help="2 layers × d 128, sequence 64 (CPU smoke run)")
    parser.add_argument("--out")
    parser.add_argument("--cluster", default=None)
    args = parser.parse_args()
    cases = CASES if args.cases == "all" else [c for c in CASES if c.name in args.cases.split(",")]
    if args.tiny:
        cases = [harness.Case(c.name, c.family, 2, 128, 2, c.optimizer, c.precision) for c in cases]
        args.seq = 64
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    results = []
    for case in cases:
        try:
            row = harness.run_case(case, args, device)
            row["predicted_expert_matmuls_s"] = expert_seconds(case, args.seq, args.device_preset)
        except Exception as error:  # noqa: BLE001 - a failing case is reported, the others still run
            row = {"case": case.name, "error": f"{type(error).__name__}: {str(error)[:500]}"}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{name}, torch {torch.__version__}, sequence {args.seq}")
    print(f"{'case':<16}{'eager s':>9}{'autopart s':>11}{'predicted s':>12}{'pred/meas':>10}"
          f"{'experts s (pred)':>17}{'peak GiB':>9}{'pred GiB':>9}{'pred/meas mem':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<16} failed: {r['error'][:100]}")
            continue
        measured_peak = r["autopart_peak_bytes"]
        ratio = "-" if not measured_peak else f"{r['predicted_peak_bytes'] / measured_peak:.3f}"
        print(f"{r['case']:<16}{r['eager_s']:>9.4f}{r['autopart_s']:>11.4f}{r['predicted_s']:>12.4f}"
              f"{r['predicted_over_measured_s']:>10.3f}{r['predicted_expert_matmuls_s']:>17.4f}"
              f"{measured_peak / 2**30:>9.2f}{r['predicted_peak_bytes'] / 2**30:>9.2f}{ratio:>14}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": name, "torch": torch.__version__, "results": results}, f, indent=2)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
