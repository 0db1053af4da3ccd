"""One GPU: a training step through autopart's runner against the plain PyTorch loop,
and the planner's predicted step time against the measured one.

    torchrun --nproc_per_node=1 benchmarks/single_gpu_step.py [--layers 12] [--d-model 1024]

Both run the same GPT (float32, AdamW) on the same batches; the table gives
seconds per step (median of --steps after --warmup), the ratio autopart / eager,
and predicted / measured. Run on a GPU machine; on a CPU it measures the CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import autopart
from autopart import zoo


def _timed(step, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.manual_seed(0)
    entry = zoo.gpt(layers=args.layers, d_model=args.d_model, heads=16, vocab=50304, seq=args.seq,
                    batch=args.batch, attn_bias=False)
    eager = copy.deepcopy(entry.model).to(device)
    ids = torch.randint(0, 50304, (args.batch, args.seq))
    target = torch.randint(0, 50304, (args.batch, args.seq))

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-4)
    ids_d, target_d = ids.to(device), target.to(device)

    def eager_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(eager(ids_d), target_d).backward()
        optimizer.step()

    eager_s = _timed(eager_step, args.steps, args.warmup, sync)
    del eager, optimizer
    if gpu:
        torch.cuda.empty_cache()

    devices = ["cuda:0"] if gpu else 1
    compiled = autopart.compile(entry.model, devices, example_inputs=(ids,), optimizer="adamw", num_microbatches=1)
    runner = compiled.distributed(timeout_s=600)
    runner_optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-4)

    def autopart_step() -> None:
        runner_optimizer.zero_grad(set_to_none=True)
        runner.step(ids, target=target, loss_fn=loss_fn)
        runner_optimizer.step()

    autopart_s = _timed(autopart_step, args.steps, args.warmup, sync)
    predicted = compiled.plan.predicted_step_seconds
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    params = sum(p.numel() for p in entry.model.parameters()) / 1e6
    print(f"GPT {args.layers} layers, d_model {args.d_model}, {params:.0f}M parameters, batch {args.batch} x "
          f"{args.seq}, float32, AdamW, on {name}")
    print(f"{'what':<34}{'s/step':>10}{'ratio':>8}")
    print(f"{'eager PyTorch (forward+backward)':<34}{eager_s:>10.4f}{1.0:>8.2f}")
    print(f"{'autopart runner (1 rank)':<34}{autopart_s:>10.4f}{autopart_s / eager_s:>8.2f}")
    print(f"{'planner prediction (fwd+bwd)':<34}{predicted:>10.4f}{predicted / autopart_s:>8.2f}  (predicted / measured)")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
