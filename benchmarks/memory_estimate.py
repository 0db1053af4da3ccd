"""Peak training memory: the planner's memory model against a measurement on the CPU.

One training step = forward, then backward from the output's gradient, the
gradients left in `.grad` (no optimizer step). Both sides count parameters,
buffers, the example inputs, every storage the step allocates, and the
gradients.

Measured: `TrackingMode`, a TorchDispatchMode that records the storage of
every op output (keyed by its StorageImpl, `untyped_storage()._cdata`) with
its bytes, drops it when the storage dies (`weakref.finalize` on the storage:
torch keeps one Python object per live StorageImpl), and keeps the live total
and its peak. Parameters, buffers and inputs are live from the start;
gradients appear during backward. Scratch memory inside a kernel (never an op
output) is not seen, and the estimate does not price it either. Two runs per
model: the traced GraphModule (the program autopart executes) and the
original nn.Module.

Replayed (`memory_replay.estimate_training_peak`): autograd's lifetimes walked node by node over
the annotations (a check that every node's saved activations and outputs are exact).

Planned: the planner's own memory model (planner/step_costs.py, the figure every plan
is priced with): `autopart.compile` on one CPU device, one microbatch, SGD (no optimizer
state: the measured step takes none), and the stage's peak (`StageMemory.total`:
parameters, gradients, buffers, saved activations, the loss's float32 log-softmax of the
outputs and its backward temporaries). The stand-in loss here is lighter than that
cross-entropy, and the planner does not count the example inputs, so the planned peak may sit a
few percent off the measurement.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import autopart
from autopart import zoo
from autopart.cost_models import Cluster
from autopart.passes import annotate
from autopart.frontend.tracing import io_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_replay.py lies beside this file
from memory_replay import Estimate, estimate_training_peak  # noqa: E402


# ----------------------------------------------------------------------------- measurement


class TrackingMode(TorchDispatchMode):
    """Live bytes of every storage created by an op (plus those registered by `track`), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.total = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl: shared by views, stable while alive
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.total += storage.nbytes()
        self.peak = max(self.peak, self.total)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.total -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


@dataclass(frozen=True, kw_only=True)
class Measured:
    """Bytes live during one measured training step."""

    start: int
    """Parameters, buffers and inputs before the step."""
    forward_end: int
    """Live after the forward (the output still held)."""
    peak: int
    """Most live at once during forward and backward."""


class _OutputGradient(torch.autograd.Function):
    """A stand-in loss: a scalar whose backward hands the output a gradient of ones.

    The gradient is made inside backward, so nothing outside autograd holds it
    and it dies once the output's producer has used it, as a loss's would.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        ctx.shape = out.shape
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.new_ones(ctx.shape)


def measure_training_peak(
    module: torch.nn.Module, args: tuple, kwargs: dict, main_output: Callable[[Any], torch.Tensor],
) -> Measured:
    """Run forward and backward under `TrackingMode`; gradients start as None.

    Backward starts from an output gradient of ones (`_OutputGradient`: what a
    loss hands back, a tensor of the output's size). A real loss adds its own
    temporaries on top (mean(out²) four output-sized ones, cross-entropy its
    softmax); they are outside the traced graph and outside the estimate.
    """
    module.zero_grad(set_to_none=True)
    gc.collect()
    mode = TrackingMode()
    for tensor in [*module.parameters(), *module.buffers(), *pytree.tree_leaves((args, kwargs))]:
        if isinstance(tensor, torch.Tensor):
            mode.track(tensor)
    start = mode.total
    with mode, torch.enable_grad():
        out = main_output(module(*args, **kwargs))
        forward_end = mode.total
        _OutputGradient.apply(out).backward()
        del out
    module.zero_grad(set_to_none=True)
    return Measured(start=start, forward_end=forward_end, peak=mode.peak)


# ----------------------------------------------------------------------------- comparison


@dataclass(frozen=True, kw_only=True)
class Row:
    name: str
    estimate: Estimate
    """The node-by-node replay of the annotations."""
    planned: int
    """The planner's peak for the step (bytes)."""
    graph: Measured
    """The traced GraphModule run eagerly: the program autopart executes."""
    eager: Measured
    """The original nn.Module run eagerly."""


def compare(name: str, z: zoo.ZooModel) -> Row:
    """Trace and annotate `z`, replay its peak, plan it for one CPU device (the plan's peak), and
    measure the graph and the model."""
    gm = autopart.trace(z.model, z.args, z.kwargs)
    annotate(gm, Cluster.cpu(1))
    estimate = estimate_training_peak(gm)
    plan = autopart.compile(z.model, 1, example_inputs=z.args, example_kwargs=z.kwargs, num_microbatches=1,
                            optimizer="sgd").plan
    planned = plan.stages[0].memory.total
    # The same keywords as the trace (it adds use_cache=False: a KV cache would
    # hold every layer's keys and values, which training does not).
    kwargs = {**dict(io_spec(gm).default_kwargs), **z.kwargs}
    z.model.train()
    graph = measure_training_peak(gm, z.args, kwargs, z.main_output)  # called as the model is
    eager = measure_training_peak(z.model, z.args, kwargs, z.main_output)
    return Row(name=name, estimate=estimate, planned=planned, graph=graph, eager=eager)


CASES: dict[str, Callable[[], zoo.ZooModel]] = {
    # 1024 tokens per step (the zoo's GPT-2 and Llama have 64 positions).
    "gpt2 4L d256 b16 s64": lambda: zoo.gpt2(layers=4, d_model=256, batch=16, seq=64),
    "llama 4L d256 b16 s64": lambda: zoo.llama(layers=4, d_model=256, batch=16, seq=64),
    "mlp w1024 d4 b256 (params > acts)": lambda: zoo.mlp(width=1024, depth=4, batch=256),
    "mlp w256 d4 b4096 (acts > params)": lambda: zoo.mlp(width=256, depth=4, batch=4096),
    "bert 4L d256 b16 s64": lambda: zoo.bert(layers=4, d_model=256, batch=16, seq=64),
    "transformer_encoder d256 b16 s64": lambda: zoo.transformer_encoder(d_model=256, layers=4, batch=16, seq=64),
}


def _mib(n: int) -> str:
    return f"{n / 2**20:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    header = (f"{'model':36s} {'replay':>9s} {'graph MiB':>9s} {'ratio':>6s} {'eager MiB':>9s} {'ratio':>6s}"
              f" {'planned':>9s} {'ratio':>6s} {'fwd-end':>7s}  peak at")
    print(header)
    print("-" * len(header))
    for name, make in CASES.items():
        torch.manual_seed(0)
        started = time.perf_counter()
        row = compare(name, make())
        e = row.estimate
        print(f"{name:36s} {_mib(e.peak)} {_mib(row.graph.peak)} {e.peak / row.graph.peak:6.3f}"
              f" {_mib(row.eager.peak)} {e.peak / row.eager.peak:6.3f}"
              f" {_mib(row.planned)} {row.planned / row.graph.peak:6.3f}"
              f" {e.forward_end / row.graph.forward_end:7.4f}  {e.peak_at}"
              f"  ({time.perf_counter() - started:.1f} s)")
    print("\nratio = estimate / measured peak; graph = the traced GraphModule, eager = the nn.Module;"
          "\nreplay = the annotations replayed node by node; planned = the planner's peak for the step;"
          "\nfwd-end = replayed / measured live bytes when the traced graph's forward ends.")


if __name__ == "__main__":
    main()
