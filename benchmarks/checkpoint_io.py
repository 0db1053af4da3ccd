"""Checkpoint I/O: autopart's sharded save and load against plain torch.save / torch.load of the
same bytes, and each rank's peak resident memory during them.

    torchrun --nproc_per_node=2 benchmarks/checkpoint_io.py [--layers 16 --width 1024] [--dir D] [--out F]

The model: `--layers` Linear(width, 4·width) + Linear(4·width, width) pairs, float32, planned as a
pipeline over all ranks (`--plan pp`) or ZeRO-3 over them (`--plan zero3`), with AdamW state after
one step (model + exp_avg + exp_avg_sq: 3× the weights). Each rank's share is what it holds.

Per repetition (the median of `--repeats` is reported), every timing is wall-clock from a barrier
to the end of the last rank:
- autopart save: `runner.save(path, optimizer=opt)` (every rank writes its own safetensors file,
  CRC32 per 8 MiB block, fsync, rank 0 commits the index by rename);
- torch.save: every rank `torch.save`s the same tensors (its share: parameter shards and AdamW
  moments, as a dict) into a new file of its own, fsyncs it and renames it over the previous one:
  the durability and crash safety of autopart's save (which also writes beside the previous
  checkpoint, then renames and deletes it);
- async: how long `runner.save(..., async_save=True)` blocks training (copy to host), then the wait;
- autopart load: `runner.load(path, optimizer=opt)` into the live runner (index read, every file's
  size checked, each rank's pieces read with their CRC32s checked, copied in place);
- torch.load: `torch.load(weights_only=True)` of the rank's file and the same copies in place.
MB/s is the checkpoint's total bytes over that wall time. Files stay in the page cache between
write and read (nothing here drops caches), on both sides alike.

Memory: a thread samples /proc/self/statm every 0.5 ms; the report gives each rank's peak resident
set during save and load minus the resident set just before (the share is already resident), next
to the largest tensor piece, the bound the design promises (share + one piece in flight), and
the same figure for torch.save / torch.load (torch.load materialises a whole second copy of the
share before it is copied in).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

import autopart

_PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set of this process while the block runs, minus the one before it."""

    def __enter__(self) -> "PeakRSS":
        _release_free_memory()  # else freed pages stay resident and a new allocation reuses them unseen
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the kernel (glibc's malloc_trim), so that the resident
    set counts live memory only: a later allocation then shows in it whatever was freed before."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the sample may then miss reused pages
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _timed(fn) -> tuple[float, int]:
    """(wall seconds from a barrier to the last rank's end, this rank's peak RSS increase)."""
    dist.barrier()
    start = time.perf_counter()
    with PeakRSS() as rss:
        fn()
    dist.barrier()
    return time.perf_counter() - start, rss.extra


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--plan", choices=["pp", "zero3"], default="pp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/autopart-checkpoint-io")
    parser.add_argument("--out", help="write the results as JSON here (rank 0)")
    parser.add_argument("--check-margin-mb", type=float, help="assert on every rank that the peak during autopart's "
                        "save and load stays within the largest piece plus this margin, and that torch.load's does "
                        "not (the sampler sees a share-sized allocation); prints 'MEMORY OK rank R'")
    args = parser.parse_args()

    world = int(os.environ["WORLD_SIZE"])
    blocks = []
    for _ in range(args.layers):
        blocks += [nn.Linear(args.width, 4 * args.width), nn.GELU(), nn.Linear(4 * args.width, args.width)]
    model = nn.Sequential(*blocks)
    x = torch.randn(world * 2, args.width)
    plan = dict(pipeline_parallel=world, data_parallel=1) if args.plan == "pp" else dict(
        pipeline_parallel=1, data_parallel=world, data_parallel_mode="zero3")
    compiled = autopart.compile(model, world, example_inputs=(x,), tensor_parallel=1, num_microbatches=2, **plan)
    del model
    runner = compiled.distributed(timeout_s=600)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-3)
    runner.step(x, target=None, loss_fn=lambda out, _: out.square().mean())
    optimizer.step()
    rank = runner.rank

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    share = {f"param/{i}": local(p.detach()) for i, p in enumerate(runner.parameters())}
    for i, p in enumerate(runner.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            share[f"{key}/{i}"] = local(optimizer.state[p][key])
    share_bytes = sum(t.numel() * t.element_size() for t in share.values())
    largest = max(t.numel() * t.element_size() for t in share.values())
    totals = [torch.tensor([share_bytes]) for _ in range(world)]
    dist.all_gather(totals, torch.tensor([share_bytes]))
    total = int(sum(t.item() for t in totals))

    path = os.path.join(args.dir, "ckpt")
    peer = os.path.join(args.dir, f"torch-rank{rank}.pt")
    if rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
    dist.barrier()

    def torch_save() -> None:  # crash-safe like autopart's: a new file, fsync'd, renamed over the old one
        with open(peer + ".tmp", "wb") as f:
            torch.save(share, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(peer + ".tmp", peer)

    def torch_load() -> None:
        loaded = torch.load(peer, weights_only=True)
        with torch.no_grad():
            for key, tensor in share.items():
                tensor.copy_(loaded[key])

    def async_save() -> None:
        runner.save(path, optimizer=optimizer, async_save=True)

    results: dict[str, list] = {k: [] for k in ("save", "torch_save", "async_block", "async_total", "load",
                                                "torch_load")}
    memory: dict[str, list] = {k: [] for k in ("save", "torch_save", "load", "torch_load")}
    for _ in range(args.repeats):  # each write right after another one of the same size, on both sides
        for name, fn in (("save", lambda: runner.save(path, optimizer=optimizer)), ("async", None),
                         ("torch_save", torch_save), ("load", lambda: runner.load(path, optimizer=optimizer)),
                         ("torch_load", torch_load)):
            if fn is None:
                dist.barrier()
                start = time.perf_counter()
                async_save()
                results["async_block"].append(time.perf_counter() - start)
                runner.wait_for_save()
                dist.barrier()
                results["async_total"].append(time.perf_counter() - start)
                continue
            seconds, extra = _timed(fn)
            results[name].append(seconds)
            memory[name].append(extra)

    seconds = {k: statistics.median(v) for k, v in results.items()}
    worst = {k: max(v) for k, v in memory.items()}
    if args.check_margin_mb is not None:
        bound = largest + args.check_margin_mb * 2**20
        for name in ("save", "load"):
            assert worst[name] <= bound, (f"rank {rank}: {name} peak +{worst[name] / 2**20:.1f} MB over the resident "
                                          f"share, above the largest piece {largest / 2**20:.1f} MB + "
                                          f"{args.check_margin_mb} MB")
        assert worst["torch_load"] > bound, f"rank {rank}: torch.load's peak +{worst['torch_load'] / 2**20:.1f} MB"
        print(f"MEMORY OK rank {rank}: save +{worst['save'] / 2**20:.1f} MB, load +{worst['load'] / 2**20:.1f} MB, "
              f"largest piece {largest / 2**20:.1f} MB, share {share_bytes / 2**20:.1f} MB, torch.load "
              f"+{worst['torch_load'] / 2**20:.1f} MB", flush=True)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"rank": rank, "share": share_bytes, "largest": largest, "peak_extra": worst})
    if rank == 0:
        mb = total / 2**20
        lines = [f"checkpoint I/O, {world} ranks ({args.plan}), torch {torch.__version__}, device "
                 f"{runner.device} ({torch.cuda.get_device_name() if runner.device.type == 'cuda' else 'CPU'}); "
                 f"{mb:.0f} MB of weights and AdamW moments, median of {args.repeats}",
                 "| operation | seconds | MB/s | vs torch |", "|---|---|---|---|"]
        for ours, theirs in (("save", "torch_save"), ("load", "torch_load")):
            lines.append(f"| autopart {ours} | {seconds[ours]:.3f} | {mb / seconds[ours]:.0f} | "
                         f"{seconds[theirs] / seconds[ours]:.2f}x |")
            lines.append(f"| torch.{ours} | {seconds[theirs]:.3f} | {mb / seconds[theirs]:.0f} | 1 |")
        lines.append(f"| async save: blocks for | {seconds['async_block']:.3f} | | |")
        lines.append(f"| async save: until written | {seconds['async_total']:.3f} | {mb / seconds['async_total']:.0f} | |")
        lines.append("")
        lines.append("| rank | share MB | largest piece MB | save peak +MB | load peak +MB | torch.save +MB | "
                     "torch.load +MB |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in per_rank:
            p = {k: v / 2**20 for k, v in r["peak_extra"].items()}
            lines.append(f"| {r['rank']} | {r['share'] / 2**20:.0f} | {r['largest'] / 2**20:.0f} | {p['save']:.1f} | "
                         f"{p['load']:.1f} | {p['torch_save']:.1f} | {p['torch_load']:.1f} |")
        print("\n".join(lines), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world": world, "plan": args.plan, "torch": torch.__version__, "device": str(runner.device),
                           "total_bytes": total, "seconds": seconds, "repetitions": results, "ranks": per_rank},
                          f, indent=2)
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
