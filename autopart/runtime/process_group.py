"""The process group a runner joins, and the guard that ends a rank whose peer hangs."""

from __future__ import annotations

import datetime
import os
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

from autopart.core.errors import InputError


class Watchdog:
    """Abort this process, naming it, if a step outlives `timeout_s`.

    Collectives honour the process group's timeout, but a point-to-point
    receive on gloo waits for ever when its peer hangs; like NCCL's own
    watchdog, this ends the process (exit code 3) with a message instead.
    """

    def __init__(self, timeout_s: float, who: str, what: str) -> None:
        self.timeout_s, self.who, self.what = timeout_s, who, what
        self.timer: threading.Timer | None = None

    def _fire(self) -> None:
        print(f"autopart: {self.who}: {self.what} did not finish within timeout_s={self.timeout_s:g}; "
              "a peer process died or hangs. Aborting this process.", file=sys.stderr, flush=True)
        os._exit(3)

    def __enter__(self) -> "Watchdog":
        self.timer = threading.Timer(self.timeout_s, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()


def default_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK), or the CPU without one."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU), every collective timing out
    after `timeout_s`; a clear error when the script was not started by torchrun."""
    if dist.is_initialized():
        return
    for variable in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if variable not in os.environ:
            raise InputError(f"environment variable {variable} is not set: start the script with torchrun, "
                             "e.g. torchrun --nproc_per_node=4 train.py")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def all_gather_rows(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """The group's tensors concatenated along rows (dim 0), in rank order."""
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)
