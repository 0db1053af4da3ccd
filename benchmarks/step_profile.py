"""Where a training step's GPU time goes, measured against where the planner puts it.

    torchrun --nproc_per_node=1 benchmarks/step_profile.py [--cases gpt24-mixed,llama-mixed] [--out profile.json]

For each case of benchmarks/single_gpu_step.py: one eager step under `torch.profiler`
(after warm-up), its CUDA kernel time summed by category, and the planner's predicted time of
the same categories (the NodeCost of every graph node, by op; the optimizer step; the loss is
not traced). Categories: matmul (mm/addmm/bmm/linear kernels: gemm), attention (flash /
efficient SDPA), optimizer (the fused AdamW or SGD kernels), copy/cast, other elementwise and
reductions. The gap per category says which cost formula to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import single_gpu_step as bench  # noqa: E402

import autopart  # noqa: E402
from autopart.passes.node_costs import node_cost  # noqa: E402


def kernel_category(name: str) -> str:
    low = name.lower()
    if "flash" in low or "fmha" in low or "attention" in low or "sdpa" in low:
        return "attention"
    if "gemm" in low or "sm90_xmma" in low or "cutlass" in low or "cublas" in low or "matmul" in low:
        return "matmul"
    if "adam" in low or "sgd" in low or "multi_tensor" in low:
        return "optimizer"
    if "copy" in low or "cast" in low or "convert" in low:
        return "copy/cast"
    return "other"


def op_category(target) -> str:
    name = str(target)
    if "scaled_dot_product" in name:
        return "attention"
    if any(k in name for k in ("linear", ".mm", "addmm", "bmm", "matmul", "baddbmm")):
        return "matmul"
    if any(k in name for k in ("_to_copy", ".to.", "clone", "contiguous", "copy")):
        return "copy/cast"
    return "other"


def profile_eager(case: bench.Case, seq: int) -> dict[str, float]:
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = bench.build(case, seq).to(device)
    optimizer = bench.make_optimizer(case.optimizer, model.parameters())
    vocab = bench.VOCAB[case.family]
    ids = torch.randint(0, vocab, (case.batch, seq), device=device)
    target = torch.randint(0, vocab, (case.batch, seq), device=device)
    mixed = case.precision == "mixed"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed):
            loss = bench.loss_fn(model(ids), target)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = getattr(event, "self_cuda_time_total", 0.0)
        if micros:
            totals[kernel_category(event.key)] += micros / 1e6
    del model, optimizer
    torch.cuda.empty_cache()
    return dict(totals)


def predicted(case: bench.Case, seq: int) -> dict[str, float]:
    with torch.device("meta"):
        model = bench.build(case, seq)
    ids = torch.randint(0, bench.VOCAB[case.family], (case.batch, seq))
    cm = autopart.compile(model, "1xH200", example_inputs=(ids,), optimizer=case.optimizer, num_microbatches=1,
                          mixed_precision="bf16" if case.precision == "mixed" else None)
    totals: dict[str, float] = defaultdict(float)
    for node in cm.graph.graph.nodes:
        if node.op == "call_function":
            cost = node_cost(node)
            totals[op_category(node.target)] += cost.fwd_seconds("H200") + cost.bwd_seconds("H200")
    stage = cm.plan.stages[0]
    totals["optimizer"] = cm.plan.predicted_step_seconds - stage.fwd_seconds - stage.bwd_seconds - stage.comm_seconds
    totals["step (plan)"] = cm.plan.predicted_step_seconds
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="gpt24-mixed,llama-mixed")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {}
    for case in [c for c in bench.CASES if c.name in args.cases.split(",")]:
        try:
            measured, plan = profile_eager(case, args.seq), predicted(case, args.seq)
        except Exception:  # noqa: BLE001 - say what broke, go on with the next case
            import traceback

            traceback.print_exc()
            continue
        results[case.name] = {"measured_s": measured, "predicted_s": plan}
        print(f"\n{case.name}: GPU kernel time by category (s), eager, against the planner")
        for key in sorted(set(measured) | set(plan)):
            m, p = measured.get(key, 0.0), plan.get(key, 0.0)
            print(f"  {key:<12}{m:>10.4f}{p:>10.4f}" + (f"{p / m:>8.2f}" if m else ""))
        print(f"  {'total':<12}{sum(measured.values()):>10.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
