"""How a pipeline stage's backward splits into input and weight gradients, measured.

    python benchmarks/zero_bubble_split.py [--layers 4] [--d-model 1024] [--json out.json]

Zero-bubble schedules split every backward B into I (gradient of the stage's
inputs, which the previous stage waits for) and W (gradient of its weights,
which fills the bubble). Qi et al. 2024 take F : I : W = 1 : 1 : 1; the
planner plays schedules with 1 : 1.25 : 1, calibrated with this script on an
H100 (autopart/schedules.py cites the figures). This times a stage of
GPT blocks: forward, full backward, and the split backward the way
torch.distributed.pipelining runs it (stage_backward_input, then
stage_backward_weight), and prints the measured ratios with the step factors
they imply next to the planner's. Times are medians of --steps on the GPU
(float32) or the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from autopart import zoo
from autopart.core.schedules import build_schedule, play, step_factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    gpt = zoo.gpt(layers=args.layers, d_model=args.d_model, heads=16, vocab=1024, seq=args.seq,
                  batch=args.batch, attn_bias=False).model
    stage = torch.nn.Sequential(*gpt.blocks).to(device)
    x = torch.randn(args.batch, args.seq, args.d_model, device=device)
    grad_out = torch.randn_like(x)

    def timed(fn) -> float:
        samples = []
        for i in range(args.steps + 2):
            sync()
            started = time.perf_counter()
            fn()
            sync()
            if i >= 2:
                samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    def forward():
        inp = x.detach().requires_grad_(True)
        return inp, stage(inp)

    def full():
        inp, out = forward()
        t0 = _now(sync)
        torch.autograd.backward(out, grad_out)
        return _now(sync) - t0

    def split():
        inp, out = forward()
        t0 = _now(sync)
        _, groups = stage_backward_input([out], [grad_out], [inp], stage.parameters())
        t1 = _now(sync)
        stage_backward_weight(stage.parameters(), groups)
        return t1 - t0, _now(sync) - t1

    fwd = timed(forward)
    bwd = statistics.median(full() for _ in range(args.steps))
    pairs = [split() for _ in range(args.steps)]
    inp_s, weight_s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    costs = {"F": 1.0, "B": bwd / fwd, "I": inp_s / fwd, "W": weight_s / fwd}
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{args.layers} GPT blocks, d_model {args.d_model}, batch {args.batch} × {args.seq}, float32, {name}")
    print(f"forward {fwd * 1e3:.2f} ms, backward {bwd * 1e3:.2f} ms, input gradient {inp_s * 1e3:.2f} ms, "
          f"weight gradient {weight_s * 1e3:.2f} ms")
    print(f"F : B : I : W = 1 : {costs['B']:.2f} : {costs['I']:.2f} : {costs['W']:.2f} "
          f"(planner: 1 : 2 : 1.25 : 1); I + W = {(inp_s + weight_s) / bwd:.2f} × B")
    rows = []
    for ranks, m, v in [(2, 4, 1), (4, 8, 1), (4, 8, 2), (8, 16, 1)]:
        schedule = build_schedule("zero_bubble", ranks, m, True, v)
        slot = costs["F"] + costs["B"]
        measured = max(end for _, end in play(schedule, lambda a: costs[a.kind]).values()) / slot
        baseline = step_factor("1f1b", ranks, m) if v == 1 else step_factor("interleaved_1f1b", ranks, m, v)
        rows.append(dict(ranks=ranks, microbatches=m, virtual_stages=v, planner=step_factor("zero_bubble", ranks, m, v),
                         with_measured_costs=measured, one_f_one_b=baseline))
        print(f"  zero bubble R={ranks} m={m} v={v}: {rows[-1]['planner']:.2f} slots as planned, "
              f"{measured:.2f} with the measured costs (1F1B-style baseline {baseline:.2f})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(device=name, args=vars(args), seconds=dict(forward=fwd, backward=bwd, input=inp_s,
                                                                       weight=weight_s), rows=rows), f, indent=2)


def _now(sync) -> float:
    sync()
    return time.perf_counter()


if __name__ == "__main__":
    main()
