"""Train a small GPT on the plan autopart makes, under torchrun, on CPUs or GPUs.

    torchrun --nproc_per_node=4 examples/train_gpt.py [--steps 10] [--layers 8]

Every process compiles the same plan (deterministic), keeps its own rank's
modules and trains; rank 0 prints the plan, the loss per step and the
throughput. The same script runs on GPUs unchanged (NCCL, one GPU per process).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import autopart
from autopart import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = torch.cuda.is_available()
    devices = [f"cuda:{i}" for i in range(world)] if gpus else world
    torch.manual_seed(0)  # the same weights and data on every rank
    entry = zoo.gpt(layers=args.layers, d_model=args.d_model, heads=4, vocab=args.vocab, seq=args.seq,
                    batch=args.batch, attn_bias=False)
    compiled = autopart.compile(entry.model, devices, example_inputs=entry.args, optimizer="adamw")
    runner = compiled.distributed(timeout_s=120)
    if runner.rank == 0:
        print(compiled.report())
    optimizer = torch.optim.AdamW(runner.parameters(), lr=3e-3)

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    generator = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    for step in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
        ids = ids.remainder(17) * 3 % args.vocab  # a learnable pattern: the loss should fall
        optimizer.zero_grad()
        loss = runner.step(ids[:, :-1], target=ids[:, 1:], loss_fn=loss_fn)
        runner.clip_grad_norm_(1.0)
        optimizer.step()
        if runner.rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    elapsed = time.perf_counter() - started
    if runner.rank == 0:
        tokens = args.steps * args.batch * args.seq
        print(f"{tokens / elapsed:,.0f} tokens/s over {world} process(es) "
              f"({'GPU' if gpus else 'CPU'}, mesh dp={compiled.plan.mesh.dp} pp={compiled.plan.mesh.pp} "
              f"tp={compiled.plan.mesh.tp})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
