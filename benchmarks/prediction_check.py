"""One GPU: the planner's predicted step against the measured one, with the preset cluster and with
`autopart.calibrate()`'s, for a training step and an inference forward. Calibrating must not make a
prediction worse.

    torchrun --nproc_per_node=1 benchmarks/prediction_check.py [--out prediction_check.json]

The model is `benchmarks/compiled_step.py`'s Llama (16 × 2048, 853M, vocabulary 32000, sequence
1024), bf16 mixed precision, run op by op by autopart's runner (`compile_kernels=False`; with
`--compile-kernels`, compiled): a training step at batch 8 (fused AdamW, one microbatch) and an
inference forward at batch 16 (`training=False`, the planner choosing the microbatches). Clusters:
the preset for this GPU; `autopart.calibrate()` (the default shapes: a d 4096 layer's training GEMMs,
elementwise kernels over 8192 × 4096); `autopart.calibrate(model=...)` at this model's own shapes.
Each prediction / measured is printed, and a calibrated one farther from 1 than the preset's is
flagged WORSE (exit status 1). Results name the GPU and the torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import autopart

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compiled_step import build, fresh, loss_fn, timed  # noqa: E402


def measure(model: torch.nn.Module, ids: torch.Tensor, training: bool, compile_kernels: bool,
            steps: int, warmup: int) -> float:
    """Median seconds of a training step (or an inference forward) of autopart's runner."""
    fresh()
    cm = autopart.compile(model, [torch.device("cuda", 0)], example_inputs=(ids.cpu(),), mixed_precision="bf16",
                          optimizer="adamw", training=training, compile_kernels=compile_kernels,
                          num_microbatches=1 if training else None)
    runner = cm.distributed(timeout_s=1800)
    if training:
        optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-4, fused=True)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            runner.step(ids, target=ids, loss_fn=loss_fn)
            optimizer.step()
    else:
        def step() -> None:
            with torch.no_grad():
                runner(ids)
    _, seconds = timed(step, steps, warmup)
    return seconds


def predict(model: torch.nn.Module, ids: torch.Tensor, devices, training: bool, compile_kernels: bool) -> float:
    return autopart.compile(model, devices, example_inputs=(ids.cpu(),), mixed_precision="bf16", optimizer="adamw",
                            training=training, compile_kernels=compile_kernels,
                            num_microbatches=1 if training else None).plan.predicted_step_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--compile-kernels", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build("llama", args.layers, args.hidden, 32000, 1024)
    batches = {"training": torch.randint(0, 32000, (8, 1024), device="cuda"),
               "inference": torch.randint(0, 32000, (16, 1024), device="cuda")}
    clusters = {"preset": [torch.device("cuda", 0)],
                "calibrated": autopart.calibrate(),
                "calibrated, model's shapes": autopart.calibrate(model=model, example_inputs=(batches["training"].cpu(),))}
    rows, worse = [], False
    for kind, ids in batches.items():
        training = kind == "training"
        measured = measure(model, ids, training, args.compile_kernels, args.steps, args.warmup)
        row = {"kind": kind, "batch": ids.shape[0], "measured_s": measured}
        for label, devices in clusters.items():
            row[label] = predict(model, ids, devices, training, args.compile_kernels) / measured
        for label in clusters:
            if label != "preset" and abs(row[label] - 1) > abs(row["preset"] - 1):
                row.setdefault("worse", []).append(label)
                worse = True
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, Llama {args.layers} × {args.hidden}, "
          f"bf16, {'compiled kernels' if args.compile_kernels else 'op by op'}")
    print("kind        batch  measured s  " + "  ".join(f"{label:>26}" for label in clusters))
    for row in rows:
        flags = f"  WORSE: {', '.join(row['worse'])}" if row.get("worse") else ""
        print(f"{row['kind']:<12}{row['batch']:>5}{row['measured_s']:>12.4f}  "
              + "  ".join(f"{row[label]:>26.3f}" for label in clusters) + flags)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows,
                       "clusters": {k: v.to_dict() for k, v in clusters.items() if not isinstance(v, list)}},
                      f, indent=2)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
