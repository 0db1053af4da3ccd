"""A rank's stage modules as torch.distributed.pipelining runs them.

`StageAdapter` calls a stage GraphModule with what a PipelineStage hands it;
integer and boolean tensors cross stages as float64 (`wire_dtype`); the static
example values spare PipelineStage its shape inference; `make_schedule` is the
schedule class the plan names over the rank's stages.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from autopart.core.schedules import schedule_keeps_outputs
from autopart.core.errors import InputError
from autopart.core.interfaces import StageInterface
from autopart.core.sequence_saves import gathers_sequence, keep_gathered_as_shards
from autopart.runtime.autocast import cast_like


class StageAdapter(nn.Module):
    """Calls a stage module with its inputs in the order its placeholders want.

    Stage 0 receives the model's tensor inputs; later stages the previous
    stage's outputs. Non-tensor model inputs (static at trace time) come from
    `constants`. The last stage returns the model's flat outputs. Point-to-point
    sends need contiguous tensors: outputs are made contiguous, and so are the
    gradients that flow back to the received inputs. Outputs are not views
    either: the zero-bubble input-gradient pass detaches them in place. The last
    stage's outputs are contiguous too, as declared to PipelineStage
    (`example_outputs`), whose forward checks every output's shape, dtype and
    strides against them (torch 2.11 on every call): a model output that is a
    slice or a transpose, or a compiled region returning another layout than
    eager, would fail it.

    Integer and boolean tensors cross stages as float64 (exact below 2**53):
    torch 2.11's PipelineStage makes every received buffer require grad, which
    only floating tensors can. The receiver casts them back, and a zero-valued
    term ties them to an output so that every buffer expecting a gradient gets
    one (of zeros).
    """

    def __init__(self, module: torch.fx.GraphModule, interface: StageInterface, tensor_positions: list[int],
                 received_vals: list[torch.Tensor], output_vals: list[torch.Tensor],
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        super().__init__()
        self.autocast = autocast
        """The plan's precision: a new torch.autocast context (or a null one) per call."""
        self.module = module
        self.gathers_sequence = gathers_sequence(module)
        """Whether the stage all-gathers sequence shards (sequence parallelism): only then are its saves
        hooked (core/sequence_saves.py)."""
        self.interface = interface
        self.tensor_positions = tensor_positions
        self.received_vals = received_vals
        """Example (traced) values of what the stage receives for one microbatch: the model's tensor
        inputs for stage 0, else the previous stage's outputs as that stage computes them."""
        self.output_vals = output_vals
        """Example values of what it returns (the model's outputs for the last stage)."""
        self.constants: list[Any] = []

    def forward(self, *received: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast: list[torch.Tensor] = []  # received integer tensors that travelled as float64 with a gradient
        if self.interface.stage == 0:
            flat = list(self.constants)
            for position, tensor in zip(self.tensor_positions, received):
                flat[position] = tensor
            args = [flat[src.index] for src in self.interface.inputs]
        else:
            cast = [x for x, v in zip(received, self.received_vals) if x.requires_grad and x.dtype != v.dtype]
            received = tuple(_from_wire(x, v.dtype) for x, v in zip(received, self.received_vals))
            args = [received[src.index] if src.kind == "previous_stage" else self.constants[src.index]
                    for src in self.interface.inputs]
        with self.autocast(), keep_gathered_as_shards(self.gathers_sequence):   # gathered sequence shards kept as shards
            outputs = tuple(self.module(*args))
        if self.interface.stage == self.interface.num_stages - 1:
            outputs = tuple(outputs[i] for i in self.interface.model_outputs)
        outputs = tuple(cast_like(x, v) for x, v in zip(outputs, self.output_vals))  # the planned dtypes
        if self.interface.stage < self.interface.num_stages - 1:
            outputs = tuple(_sendable(x) if isinstance(x, torch.Tensor) else x for x in outputs)
        else:  # laid out as declared (`example_outputs`): PipelineStage compares strides too
            outputs = tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in outputs)
        return _with_zero_gradients(outputs, cast) if cast else outputs


_WIRE_DTYPE = torch.float64
"""How integer and boolean tensors travel between stages."""


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point or dtype.is_complex else _WIRE_DTYPE


def _sendable(x: torch.Tensor) -> torch.Tensor:
    """`x` as it travels: its own contiguous storage (a copy only for views and strided tensors);
    integers and booleans as float64."""
    if wire_dtype(x.dtype) != x.dtype:
        return x.to(_WIRE_DTYPE)
    return x.clone(memory_format=torch.contiguous_format) if x._is_view() or not x.is_contiguous() else x


def _from_wire(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A received tensor as the stage reads it: cast back, or with a contiguous gradient."""
    if dtype != x.dtype or not x.requires_grad:
        return x.detach().to(dtype)
    return _ContiguousGradient.apply(x)


def _with_zero_gradients(outputs: tuple, cast: list[torch.Tensor]) -> tuple:
    """Add 0 · Σ(cast inputs) to the first output that carries gradients: values unchanged,
    and backward gives each cast input a gradient of zeros for the previous stage."""
    for i, out in enumerate(outputs):
        if isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point():
            zero = sum(_ContiguousGradient.apply(x).sum() for x in cast) * 0  # the zeros get sent: contiguous
            return (*outputs[:i], out + zero.to(out.dtype), *outputs[i + 1:])
    return outputs


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (it is sent to the previous stage)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def step_options() -> dict[str, Any]:
    """Keywords for a schedule's training `step`: no outputs returned, where this torch allows it."""
    return {} if schedule_keeps_outputs() else {"return_outputs": False}


def make_schedule(plan, stages: list, loss_fn: Callable[[Any, Any], torch.Tensor]):
    """The torch.distributed.pipelining schedule the plan names, over this rank's stages."""
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    m = plan.num_microbatches
    if plan.schedule in ("gpipe", "1f1b"):
        return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[plan.schedule](stages[0], n_microbatches=m,
                                                                             loss_fn=loss_fn)
    classes = {"interleaved_1f1b": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}
    if plan.schedule not in classes:
        raise InputError(f"the plan's schedule {plan.schedule!r} is not known to this runtime; re-plan")
    return classes[plan.schedule](stages, n_microbatches=m, loss_fn=loss_fn)


def _like(value: torch.Tensor, device: torch.device, requires_grad: bool, wire: bool = True) -> torch.Tensor:
    """An empty tensor shaped like `value`, in the dtype it travels in between stages (`wire`)."""
    dtype = wire_dtype(value.dtype) if wire else value.dtype
    tensor = torch.empty(value.shape, dtype=dtype, device=device)
    return tensor.requires_grad_(requires_grad and (tensor.is_floating_point() or tensor.is_complex()))


def received_vals(compiled, interface: StageInterface, tensor_positions: list[int]) -> list[torch.Tensor]:
    """What a stage receives for one microbatch: the model's tensor inputs for stage 0 (the graph
    is traced at the microbatch size), else the previous stage's outputs."""
    if interface.stage == 0:
        return [compiled.io.example_inputs[i] for i in tensor_positions]
    return _output_vals(compiled.stage_module(interface.stage - 1))


def stage_output_vals(compiled, stage: int) -> list[torch.Tensor]:
    """What stage `stage` returns: its outputs, or the model's outputs for the last stage."""
    module = compiled.stage_module(stage)
    vals = _output_vals(module)
    if stage == compiled.plan.num_stages - 1:
        return [vals[i] for i in compiled.interfaces[stage].model_outputs]
    return vals


def example_inputs(adapter: StageAdapter, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty tensors as the stage receives them; past stage 0 in their travelling dtype, and
    gradients flow back to them."""
    later = adapter.interface.stage > 0
    return tuple(_like(v, device, requires_grad=later, wire=later) for v in adapter.received_vals)


def example_outputs(adapter: StageAdapter, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty tensors as the stage returns them (sent in their travelling dtype, unless last)."""
    last = adapter.interface.stage == adapter.interface.num_stages - 1
    return tuple(_like(v, device, requires_grad=True, wire=not last) for v in adapter.output_vals)


def _output_vals(module: torch.fx.GraphModule) -> list[torch.Tensor]:
    output = next(n for n in module.graph.nodes if n.op == "output")
    return [v.meta["val"] for v in output.args[0]]
