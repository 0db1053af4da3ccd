"""Pipeline schedules side by side: measured step time against the planner's prediction.

    torchrun --nproc_per_node=2 benchmarks/pipeline_schedules.py [--layers 8] [--microbatches 4]

One GPT (float32, SGD) cut over every rank of the world (pp = world size),
trained with each schedule in turn: GPipe, 1F1B, interleaved 1F1B (v = 2) and
zero bubble (v = 1 and 2). Rank 0 prints seconds per step (median of --steps
after --warmup) and, per schedule, the ratio to 1F1B measured and predicted:
"pred" is the planner's step (every slot at the slowest stage), "play" the schedule
played with each stage's own predicted times (the report's timeline). The
planner says interleaving and zero bubble shorten the step by shrinking the
bubble, (R - 1)/(m + R - 1) → (R - 1)/(m·v + R - 1) for interleaving. On GPUs
(NCCL) the cost model is the GPU's; on CPUs (gloo) the devices are this
machine's cores, so only the ratios mean anything. --json writes the table.

Memory: one more step per schedule runs under a tracking allocator (every
storage an op creates, live until it dies: benchmarks/memory_estimate.py) and
each rank's peak of step-time bytes (activations kept for backward, received
boundary tensors, gradients, temporaries) is set against the plan's
activations + boundary + gradients of that rank's stages, which the planner
derives from each schedule's in-flight counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import autopart
from autopart import zoo
from autopart.report.timing import makespan, predicted_timeline
from memory_estimate import TrackingMode  # benchmarks/ is the script's directory

CONFIGS = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1), ("zero_bubble", 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", help="cluster to plan for (default: the world's GPUs or CPU cores)")
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = torch.cuda.is_available()
    devices = args.devices or (f"{world}x{_gpu_preset()}" if gpu else world)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.manual_seed(0)
    entry = zoo.gpt(layers=args.layers, d_model=args.d_model, heads=8, vocab=8192, seq=args.seq,
                    batch=args.batch, attn_bias=False)
    ids = torch.randint(0, 8192, (args.batch, args.seq))
    target = torch.randint(0, 8192, (args.batch, args.seq))

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    # Every schedule is built first, then timed in rounds (one step of each per round) so that
    # drift of the machine during the run falls on all of them alike.
    runs = []
    for schedule, v in CONFIGS:
        compiled = autopart.compile(entry.model, devices, example_inputs=(ids,), pipeline_parallel=world,
                                    num_microbatches=args.microbatches, schedule=schedule, virtual_stages=v,
                                    data_parallel=1, tensor_parallel=1, optimizer="sgd")
        runner = compiled.distributed(timeout_s=600)
        optimizer = torch.optim.SGD(runner.parameters(), lr=1e-3)

        def step(runner=runner, optimizer=optimizer):
            optimizer.zero_grad()
            runner.step(ids, target=target, loss_fn=loss_fn)
            optimizer.step()

        runs.append((schedule, v, compiled, runner, step))
    times: dict[int, list[float]] = {k: [] for k in range(len(runs))}
    for round_index in range(args.warmup + args.steps):
        for k, (_, _, _, _, step) in enumerate(runs):
            sync()
            dist.barrier()
            started = time.perf_counter()
            step()
            sync()
            dist.barrier()
            if round_index >= args.warmup:
                times[k].append(time.perf_counter() - started)
    rows = []
    for k, (schedule, v, compiled, runner, step) in enumerate(runs):
        measured_peak, predicted_peak = _step_memory(runner, compiled.plan, step)
        rows.append(dict(schedule=schedule, virtual_stages=v, measured_s=statistics.median(times[k]),
                         predicted_s=compiled.plan.predicted_step_seconds,
                         played_s=makespan(predicted_timeline(compiled.plan)),
                         bubble=compiled.plan.bubble_fraction,
                         measured_peak_bytes=measured_peak, predicted_peak_bytes=predicted_peak))
    if dist.get_rank() == 0:
        _print(rows, world, args, devices)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(dict(world=world, devices=str(devices), args=vars(args), rows=rows), f, indent=2)
    dist.destroy_process_group()


def _step_memory(runner, plan, step) -> tuple[list[int], list[int]]:
    """Per pipeline rank: peak bytes created during one step (measured) and the plan's
    activations + boundary + gradients of its stages (predicted)."""
    runner.zero_grad()  # gradients are created inside the step, as in training
    with TrackingMode() as tracker:
        step()
    stages = plan.stages_of_rank(runner.pp_rank)
    predicted = sum(plan.stages[s].memory.activations + plan.stages[s].memory.boundary + plan.stages[s].memory.grads
                    for s in stages)
    both: list = [None] * dist.get_world_size()
    dist.all_gather_object(both, (tracker.peak, predicted))
    return [b[0] for b in both], [b[1] for b in both]


def _gpu_preset() -> str:
    name = torch.cuda.get_device_name(0)
    return "H200" if "H200" in name else "H100"


def _print(rows: list[dict], world: int, args, devices) -> None:
    base = next(r for r in rows if r["schedule"] == "1f1b")
    print(f"\nGPT {args.layers} × {args.d_model}, batch {args.batch} × {args.seq}, {args.microbatches} microbatches, "
          f"pp = {world} ({devices})")
    print(f"{'schedule':>18} {'v':>2} {'bubble':>7} {'measured':>10} {'predicted':>10} {'meas/1F1B':>10} "
          f"{'pred/1F1B':>10} {'play/1F1B':>10}   step memory per rank, MiB measured / predicted")
    for r in rows:
        memory = "  ".join(f"{m / 2**20:.1f}/{p / 2**20:.1f}"
                           for m, p in zip(r["measured_peak_bytes"], r["predicted_peak_bytes"]))
        print(f"{r['schedule']:>18} {r['virtual_stages']:>2} {r['bubble']:>7.1%} {r['measured_s']:>9.4f}s "
              f"{r['predicted_s']:>9.4f}s {r['measured_s'] / base['measured_s']:>10.3f} "
              f"{r['predicted_s'] / base['predicted_s']:>10.3f} {r['played_s'] / base['played_s']:>10.3f}   {memory}")


if __name__ == "__main__":
    main()
