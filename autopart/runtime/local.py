"""All ranks of a plan in one process: the reference for tests and debugging.

Each stage runs its own GraphModule with its own parameter copies; tensors
cross stage boundaries detached (as if sent), and gradients come back the same
way, in the order the schedule's timeline gives. Nothing here is shared
between stages that a real pipeline would not send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx

from autopart.core.batch import batch_size_of, split_microbatches
from autopart.core.errors import InputError
from autopart.core.interfaces import StageInterface
from autopart.runtime.autocast import stage_autocast
from autopart.core.schedules import Action, build_schedule, timeline


@dataclass
class _Microbatch:
    """What one stage keeps of one microbatch between its forward and backward, per tp rank."""

    inputs: list[list[Any]]
    outputs: list[tuple[Any, ...]]
    losses: list[torch.Tensor] | None = None


class LocalPipeline:
    """Runs stage modules in one process, microbatched under a schedule.

    `stages[s]` holds the tensor-parallel rank modules of stage s (one module
    when tp = 1); the ranks of a stage run in lock step (runtime/spmd.py), each
    with its own copy of what it receives, as separate processes would. With
    context parallelism (`cp` > 1) the cp ranks of a group run the same modules
    on their positions of the same samples (cp × tp ranks in lock step), so their
    gradients add up in the shared parameters: cp times the gradient of the loss
    (passes/context_parallel/ops.py), which `gradients` divides back, as the
    data-parallel average over the cp replicas does on a process group.
    """

    def __init__(self, stages: Sequence[Sequence[torch.fx.GraphModule]], interfaces: Sequence[StageInterface],
                 schedule: str, num_microbatches: int, batch_size: int, *, virtual_stages: int = 1,
                 replicas: int = 1, mixed_precision: str | None = None, cp: int = 1) -> None:
        self.stages = [list(ranks) for ranks in stages]
        self.mixed_precision = mixed_precision
        """The plan's precision: stages and the loss run under its autocast (runtime/autocast.py)."""
        self.tp = len(self.stages[0])
        self.cp = cp
        self.width = self.tp * cp
        """Ranks per stage run in lock step: cp groups of tp ranks."""
        self.interfaces = list(interfaces)
        self.schedule = schedule
        self.num_microbatches = num_microbatches
        """All replicas' microbatches: each replica plays the schedule on its own num_microbatches / replicas."""
        self.batch_size = batch_size
        self.virtual_stages = virtual_stages
        self.replicas = replicas

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def _autocast(self):
        return stage_autocast(_device_type(self.stages[0][0]), self.mixed_precision)

    def _run_stage(self, s: int, per_rank_inputs: list[list[Any]]) -> list[tuple[Any, ...]]:
        with self._autocast():
            if self.width == 1:
                return [tuple(self.stages[s][0](*per_rank_inputs[0]))]
            from autopart.runtime.spmd import run_mesh_ranks, run_ranks

            if self.cp > 1:
                return [tuple(out) for out in run_mesh_ranks(self.stages[s], per_rank_inputs, self.cp)]
            return [tuple(out) for out in run_ranks(self.stages[s], per_rank_inputs[0], per_rank_inputs)]

    # ------------------------------------------------------------------ forward only

    @torch.no_grad()
    def forward(self, flat_inputs: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Flat model outputs of each microbatch."""
        outputs = []
        for inputs in self._microbatches(flat_inputs):
            carried: list[tuple[Any, ...]] = [()] * self.width  # per rank: a boundary value may be partial
            for s, interface in enumerate(self.interfaces):
                carried = self._run_stage(s, [self._gather(interface, inputs, carried[r]) for r in range(self.width)])
            outputs.append(tuple(carried[0][i] for i in self.interfaces[-1].model_outputs))  # outputs replicated
        return outputs

    # ------------------------------------------------------------------ training

    def train_step(self, flat_inputs: Sequence[Any], targets: Sequence[Any],
                   loss_of: Callable[[tuple[Any, ...], Any], torch.Tensor]) -> torch.Tensor:
        """One step: the mean microbatch loss; gradients accumulate in each stage's parameters.

        `loss_of(flat_outputs, target)` gives one microbatch's loss; backward runs
        on loss / m, so gradients equal those of the whole batch's mean loss.
        """
        micro_inputs = self._microbatches(flat_inputs)
        m = self.num_microbatches
        state: list[dict[int, _Microbatch]] = [{} for _ in self.stages]
        grads_to_send: list[dict[int, list[list[Any]]]] = [{} for _ in self.stages]
        losses: list[torch.Tensor] = []
        per_replica = m // self.replicas
        plan = build_schedule(self.schedule, self.num_stages // self.virtual_stages, per_replica, training=True,
                              virtual_stages=self.virtual_stages)
        slots = timeline(plan, per_replica, training=True)
        for replica in range(self.replicas):  # the replicas one after another, as the gradients add up alike
            for slot in slots:
                for action in slot:
                    if action is None or action.kind == "W":  # W: its gradients came with I (full backward)
                        continue
                    action = Action(action.kind, action.stage, action.microbatch + replica * per_replica)
                    if action.kind == "F":
                        self._forward(action, micro_inputs, state, targets, loss_of, losses)
                    else:
                        self._backward(action, state, grads_to_send)
        return torch.stack([loss.detach() for loss in losses]).mean()

    def _forward(self, action: Action, micro_inputs, state, targets, loss_of, losses) -> None:
        s, i = action.stage, action.microbatch
        interface = self.interfaces[s]
        previous = state[s - 1][i].outputs if s > 0 else [()] * self.width
        inputs = [[_receive(x) for x in self._gather(interface, micro_inputs[i], previous[r])]
                  for r in range(self.width)]
        record = _Microbatch(inputs=inputs, outputs=self._run_stage(s, inputs))
        if s == self.num_stages - 1:
            # every tp rank computes the loss on its (replicated) output, as processes would
            with self._autocast():
                record.losses = [loss_of(tuple(outputs[k] for k in interface.model_outputs), targets[i])
                                 for outputs in record.outputs]
            losses.append(record.losses[0])
        state[s][i] = record

    def _backward(self, action: Action, state, grads_to_send) -> None:
        s, i = action.stage, action.microbatch
        record = state[s].pop(i)
        if s == self.num_stages - 1:
            torch.autograd.backward([loss / self.num_microbatches for loss in record.losses])
        else:
            incoming = grads_to_send[s + 1].pop(i)
            pairs = [(out, grad) for r in range(self.width) for out, grad in zip(record.outputs[r], incoming[r])
                     if grad is not None and isinstance(out, torch.Tensor) and out.requires_grad]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        # Gradients of this stage's inputs go back to the previous stage's outputs, rank to rank.
        if s > 0:
            per_rank = []
            for r in range(self.width):
                back: list[Any] = [None] * len(self.interfaces[s - 1].output_names)
                for source, x in zip(self.interfaces[s].inputs, record.inputs[r]):
                    if source.kind == "previous_stage" and isinstance(x, torch.Tensor) and x.grad is not None:
                        back[source.index] = x.grad if back[source.index] is None else back[source.index] + x.grad
                per_rank.append(back)
            grads_to_send[s][i] = per_rank

    # ------------------------------------------------------------------ helpers

    def _microbatches(self, flat_inputs: Sequence[Any]) -> list[list[Any]]:
        size = batch_size_of(flat_inputs)
        if size != self.batch_size:
            raise InputError(
                f"the batch has {size} samples but the plan was made for {self.batch_size}; "
                "re-compile for this batch size (shapes are static)"
            )
        return split_microbatches(flat_inputs, self.batch_size, self.num_microbatches)

    @staticmethod
    def _gather(interface: StageInterface, model_inputs: Sequence[Any], previous: Sequence[Any]) -> list[Any]:
        return [model_inputs[src.index] if src.kind == "model_input" else previous[src.index]
                for src in interface.inputs]

    def gradients(self) -> dict[str, torch.Tensor]:
        """Gradient of every original parameter, summed over the stages holding a copy."""
        grads: dict[str, torch.Tensor] = {}
        for ranks, interface in zip(self.stages, self.interfaces):
            if self.tp > 1:
                from autopart.runtime.spmd import gather_gradients

                paths = dict(interface.parameters)  # attribute path -> original name (tied weights)
                stage_grads = {paths.get(k, k): g for k, g in gather_gradients(ranks).items()}
            else:
                stage_grads = {name: ranks[0].get_parameter(path).grad for path, name in interface.parameters}
            for name, grad in stage_grads.items():
                if grad is not None:
                    grad = grad / self.cp if self.cp > 1 else grad   # the cp ranks' sum (class docstring)
                    grads[name] = grad.clone() if name not in grads else grads[name] + grad
        return grads

    def zero_grad(self) -> None:
        for ranks in self.stages:
            for module in ranks:
                module.zero_grad(set_to_none=True)


def _device_type(module: torch.nn.Module) -> str:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device.type if tensor is not None else "cpu"


def _receive(x: Any) -> Any:
    """A tensor as the next stage receives it: a new leaf that collects its gradient."""
    if isinstance(x, torch.Tensor):
        leaf = x.detach()
        if x.is_floating_point() or x.is_complex():
            leaf.requires_grad_(True)
        return leaf
    return x
