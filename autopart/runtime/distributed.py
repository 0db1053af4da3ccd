"""Run a plan on torch.distributed: one process per device, started by torchrun.

Every process compiles the same plan (deterministically, or loads it from
JSON), then `DistributedRunner` keeps only its own rank's stage modules (one,
or v with virtual stages: stage s on pipeline rank s % pp). Stages run under
`torch.distributed.pipelining`: a PipelineStage each, driven by the schedule
the plan names (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B or
ScheduleInterleavedZeroBubble). Data-parallel replicas of the pipeline wrap
each stage in PyTorch's DDP or FSDP2 on the dp group, as the plan says
(runtime/data_parallel.py: ZeRO-3 and HSDP shard every block as its own FSDP
unit), so gradient communication overlaps backward (PipelineStage skips the
sync on all microbatches but the last). With one stage the runner drives DDP
or FSDP2 itself, microbatch by microbatch. Blocks the plan recomputes run
through torch.utils.checkpoint inside the stage modules (passes/regions.py).
A parameter copied into several stages (tied embeddings) has its gradient
summed over those stages after backward. How a stage module meets
PipelineStage (what crosses stages, the static shapes, the schedule class) is
runtime/pipelining.py.

Every collective has a timeout (`timeout_s`); a peer that dies or hangs makes
the others raise `AutopartError` naming this rank and its stage
(runtime/process_group.py).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from autopart.core.batch import batch_size_of, split_rows, take_rows
from autopart.core.errors import AutopartError, InputError
from autopart.core.interfaces import StageInterface, expert_parallel_info, tp_rank_info
from autopart.runtime.pipelining import (
    StageAdapter, example_inputs, example_outputs, make_schedule, received_vals, stage_output_vals, step_options,
    wire_dtype,
)
from autopart.runtime.autocast import check_caller_autocast, stage_autocast
from autopart.runtime.process_group import Watchdog, all_gather_rows, default_device, init_process_group
from autopart.core.context_chunks import CP_RANDOM_ATTR, CP_RANDOM_SEED_OFFSET, context_parallel_info
from autopart.core.tp_random import STREAM_ATTR, replica_seed, sharded_seed
from autopart.runtime.mesh import MeshGroups, build_groups, coordinates
from autopart.runtime.kernels import DEFAULT_BACKEND, KernelReport, compile_regions
from autopart.runtime.data_parallel import (data_parallel_mode, experts_sharded_over_edp, is_fully_sharded,
                                            wrap_data_parallel)
from autopart.runtime.checkpoint import CheckpointMixin
from autopart.runtime.state import StateMixin, _tp_slices, local_tensor


_SPLIT_FAILURES = (
    "backward through the graph a second time",  # T5: weight groups that share a path (torch 2.11, 2.13)
    "does not require grad and does not have a grad_fn",  # torch 2.11: integer tensors crossing stages
)
"""What PyTorch raises where zero bubble's split backward cannot handle a graph."""


def _chain(error: BaseException) -> str:
    """The messages of an exception and its causes."""
    parts = []
    while error is not None and len(parts) < 8:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


class DistributedRunner(CheckpointMixin, StateMixin):
    """This process's share of a compiled plan, ready to train or infer."""

    def __init__(self, compiled, *, timeout_s: float = 300.0, device: str | torch.device | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None,
                 init_fn: Callable[[str, torch.Tensor], None] | None = None,
                 kernels_backend: str = DEFAULT_BACKEND) -> None:
        from torch.distributed.pipelining import PipelineStage

        self.compiled = compiled
        self.plan = compiled.plan
        self.mesh = self.plan.mesh
        self.timeout_s = timeout_s
        self.device = torch.device(device) if device is not None else default_device()
        init_process_group(self.device, timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.world_size != self.mesh.num_devices:
            raise InputError(
                f"the plan's mesh dp={self.mesh.dp} × pp={self.mesh.pp} × tp={self.mesh.tp} needs "
                f"{self.mesh.num_devices} processes but torchrun started {self.world_size}; run "
                f"torchrun --nproc_per_node={self.mesh.num_devices} (or re-plan for {self.world_size} devices)"
            )
        self.coords = coordinates(self.mesh, self.rank)
        self.pp_rank = self.coords.stage
        self.stage_indices = self.plan.stages_of_rank(self.pp_rank)
        holders = _holders(compiled)
        self.shared_names = _shared_parameters(holders, self.mesh.pp)
        self.first_holder = {name: min(stages) for name, stages in holders.items()}
        """Original parameter name -> the first stage holding it (whose copy counts in norms)."""
        self.groups: MeshGroups = build_groups(self.mesh, self.rank, sorted(
            {ranks for ranks in self.shared_names.values() if len(ranks) > 1}))
        tensor_positions = [i for i, leaf in enumerate(compiled.io.example_inputs) if isinstance(leaf, torch.Tensor)]
        self.adapters: list[StageAdapter] = []
        for stage, module in zip(self.stage_indices, compiled.rank_modules(self.rank, device=self.device)):
            interface = compiled.interfaces[stage]
            module = _materialise(module, self.device, state_dict, init_fn, interface)
            if self.mesh.tp > 1:  # the stage's collectives (Megatron's f and g) run on the tp group
                for target in tp_rank_info(module).collectives:
                    module.get_submodule(target).attach(self.groups.tp)
            context = context_parallel_info(module)
            if context is not None:  # the key/value gathers and loss sums run on the cp group
                for target in context.modules:
                    module.get_submodule(target).process_group = self.groups.cp
            experts = expert_parallel_info(module)
            if experts is not None and experts.ep_rank is not None:  # the experts' all-to-alls run on the ep group
                for target in experts.modules:
                    module.get_submodule(target).process_group = self.groups.ep
            self.adapters.append(StageAdapter(module, interface, tensor_positions,
                                              received_vals(compiled, interface, tensor_positions),
                                              stage_output_vals(compiled, interface.stage), self._autocast))
        self.kernels: KernelReport | None = None
        """What ran through torch.compile (Plan.compile_kernels); None when the plan runs op by op."""
        if self.plan.compile_kernels:  # after the collectives know their group: bodies are shared
            self.kernels = compile_regions([adapter.module for adapter in self.adapters], backend=kernels_backend)
        self._seed_random_streams()
        self._model_output_vals = stage_output_vals(compiled, self.plan.num_stages - 1)
        # Static shapes (from the traced graph) spare PipelineStage its shape inference, which
        # would run stages on uninitialised inputs (token ids out of range) and call DDP outside no_sync.
        self.pipeline_stages = [
            PipelineStage(self._data_parallel(adapter), adapter.interface.stage, self.plan.num_stages, self.device,
                          input_args=example_inputs(adapter, self.device),
                          output_args=example_outputs(adapter, self.device),
                          group=self.groups.pp)
            for adapter in self.adapters]
        self._loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
        self._no_target = False
        self.schedule = make_schedule(self.plan, self.pipeline_stages, self._microbatch_loss)

    def _seed_random_streams(self) -> None:
        """Random ops (dropout) draw fresh masks in every replica and microbatch, the same masks on a
        tp group's replicated values and independent ones on its shards (autopart/tp_random.py): the
        default generator is seeded from global rank 0's seed, per replica; each tp rank's sharded
        stream from it too. Single-device plans keep the caller's generator untouched."""
        if self.mesh.tp == 1 and self.mesh.dp == 1:
            return
        seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.int64,
                            device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(seed, src=0)
        base = int(seed.item())
        torch.manual_seed(replica_seed(base, self.coords.dp_index))
        for adapter in self.adapters:
            stream = getattr(adapter.module, STREAM_ATTR, None)
            if stream is not None:
                stream.reseed(sharded_seed(base, self.coords.tp_index, self.coords.dp_index, self.mesh.tp))
            stream = getattr(adapter.module, CP_RANDOM_ATTR, None)  # random ops on values whole over cp:
            if stream is not None:                                   # alike within the cp group
                stream.reseed(replica_seed(base, self.coords.dp_index // self.mesh.cp) + CP_RANDOM_SEED_OFFSET)

    # ------------------------------------------------------------------ properties

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank runs the model's first stage (it feeds the inputs)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank runs the model's last stage (it computes the loss)."""
        return self.pp_rank == self.mesh.pp - 1

    @property
    def local_stages(self) -> list[tuple[torch.fx.GraphModule, StageInterface]]:
        """(stage GraphModule, its interface) of every stage this rank runs, on its device."""
        return [(adapter.module, adapter.interface) for adapter in self.adapters]

    @property
    def module(self) -> torch.fx.GraphModule:
        """This rank's stage GraphModule (the first of them with virtual stages)."""
        return self.adapters[0].module

    def parameters(self):
        """This rank's parameters (all its stages'): feed them to any torch.optim optimizer."""
        for adapter in self.adapters:
            yield from adapter.module.parameters()

    def describe(self) -> str:
        stages = "stage" + (f"s {self.stage_indices}" if len(self.stage_indices) > 1 else f" {self.stage_indices[0]}")
        return (f"rank {self.rank} ({stages} of {self.plan.num_stages}, tp rank {self.coords.tp_index} "
                f"of {self.mesh.tp}, dp replica {self.coords.dp_index} of {self.mesh.dp})")

    def _data_parallel(self, adapter: nn.Module) -> nn.Module:
        """The stage replicated over the dp group as the plan says (unchanged without replicas)."""
        if self.mesh.dp == 1:
            return adapter
        return wrap_data_parallel(adapter, self.groups, self.device, self.plan, experts=set(self.expert_parameters()))

    # ------------------------------------------------------------------ training

    def step(self, *args: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """Forward and backward of one global batch; returns the step's loss on every rank.

        Pass the same global batch on every rank; each data-parallel replica
        takes its share. `loss_fn(output, target)` is a mean over the
        microbatch; gradients are those of the mean loss over the batch.
        `target` may be None for a loss that needs none (it then gets None).
        """
        check_caller_autocast(self.device.type, self.plan.mixed_precision)
        flat, local_target = self._local_inputs(args, kwargs, target)
        for adapter in self.adapters:
            adapter.constants = flat
        self._loss_fn = loss_fn
        self._no_target = target is None
        if self._no_target:  # the schedules split a target into microbatches: give them rows to split
            local_target = torch.zeros(self.plan.batch_size // self.mesh.batch_shards, device=self.device)
        tensors = [flat[i] for i in self.adapters[0].tensor_positions]
        losses: list[torch.Tensor] = []
        with Watchdog(self.timeout_s, self.describe(), "step"):
            try:
                if isinstance(self.pipeline_stages[0].submod, torch.nn.parallel.DistributedDataParallel):
                    self._accumulate_under_ddp(flat, local_target, losses)
                elif self.plan.num_stages == 1 and is_fully_sharded(self.pipeline_stages[0].submod):
                    self._accumulate_under_fsdp(flat, local_target, losses)
                elif self.is_first_stage and self.is_last_stage:
                    self.schedule.step(*tensors, target=local_target, losses=losses, **step_options())
                elif self.is_first_stage:
                    self.schedule.step(*tensors, **step_options())
                elif self.is_last_stage:  # the loss per microbatch; no output kept past its backward
                    self.schedule.step(target=local_target, losses=losses, **step_options())
                else:
                    self.schedule.step(**step_options())
                self._sum_shared_gradients()
                self._reduce_expert_gradients()
                self._say_compiled()
                return self._step_loss(losses)
            except (RuntimeError, dist.DistBackendError) as error:
                if self.plan.schedule == "zero_bubble" and any(sign in _chain(error) for sign in _SPLIT_FAILURES):
                    raise AutopartError(
                        f"{self.describe()}: zero bubble's split backward (PyTorch's stage_backward_input / "
                        f"stage_backward_weight, torch {torch.__version__}) fails on this model's graph; "
                        "re-plan with schedule='interleaved_1f1b' or '1f1b'") from error
                raise self._peer_error("step", error) from error

    def _say_compiled(self) -> None:
        """After the first step, rank 0 says on stderr what compiling kernels took (once)."""
        if self.kernels is not None and not getattr(self, "_said_compiled", False):
            self._said_compiled = True
            if self.rank == 0:
                print(f"[autopart] {self.describe()}: {self.kernels.summary()}", file=sys.stderr, flush=True)

    def _accumulate_under_ddp(self, flat: list[Any], target: Any, losses: list[torch.Tensor]) -> None:
        """One stage under DDP: microbatches accumulate the way DDP documents, in `no_sync` but
        the last, whose backward all-reduces in buckets. (PipelineStage's shape inference would
        call DDP outside `no_sync`, and DDP's bucket rebuild then fails under GPipe.)"""
        ddp = self.pipeline_stages[0].submod
        m = self.plan.num_microbatches
        local_batch = self.plan.batch_size // self.mesh.batch_shards
        for i, (micro, micro_target) in enumerate(zip(split_rows(flat, local_batch, m),
                                                      split_rows(target, local_batch, m))):
            with ddp.no_sync() if i < m - 1 else contextlib.nullcontext():
                loss = self._microbatch_loss(ddp(*[micro[k] for k in self.adapters[0].tensor_positions]),
                                             micro_target)
                (loss / m).backward()
            losses.append(loss.detach())

    def _accumulate_under_fsdp(self, flat: list[Any], target: Any, losses: list[torch.Tensor]) -> None:
        """One stage under FSDP2: microbatches accumulate as FSDP2 documents (gradients reduced by the
        last microbatch's backward only), and its own backward hooks reduce-scatter each unit's
        gradients while the units before it compute, which PipelineStage's reduction after the
        whole backward would not overlap."""
        fsdp = self.pipeline_stages[0].submod
        m = self.plan.num_microbatches
        local_batch = self.plan.batch_size // self.mesh.batch_shards
        for i, (micro, micro_target) in enumerate(zip(split_rows(flat, local_batch, m),
                                                      split_rows(target, local_batch, m))):
            fsdp.set_requires_gradient_sync(i == m - 1)
            loss = self._microbatch_loss(fsdp(*[micro[k] for k in self.adapters[0].tensor_positions]), micro_target)
            (loss / m).backward()
            losses.append(loss.detach())

    def _autocast(self):
        return stage_autocast(self.device.type, self.plan.mixed_precision)

    def _microbatch_loss(self, output: Any, target: Any) -> torch.Tensor:
        flat = output if isinstance(output, tuple) else (output,)
        with self._autocast():  # the loss computes as it would in the user's autocast region
            return self._loss_fn(self.compiled.io.unflatten(flat), None if self._no_target else target)

    def _step_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        loss = torch.stack([x.detach() for x in losses]).mean() if losses else torch.zeros((), device=self.device)
        loss = loss.to(self.device, torch.float32)
        if self.mesh.pp > 1:
            dist.broadcast(loss, src=self.groups.pp_ranks[-1], group=self.groups.pp)
        if self.mesh.dp > 1:
            dist.all_reduce(loss, group=self.groups.dp)
            loss = loss / self.mesh.dp
        return loss

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's blocks of the experts (expert parallelism), which the dp wrappers leave alone."""
        found = []
        for module, _ in self.local_stages:
            info = expert_parallel_info(module)
            if info is not None and info.ep_rank is not None:
                found += [module.get_parameter(path) for path in info.weights]
        return found

    def _reduce_expert_gradients(self) -> None:
        """Expert blocks' gradients: the all-to-alls' backward already summed every ep-group rank's
        tokens into them; the replicas holding the same experts (edp) add theirs, and the sum over all
        dp replicas' losses becomes their mean, as DDP's average does for the dense parameters.
        Under ZeRO FSDP has reduced them over edp already (runtime/data_parallel.py)."""
        if experts_sharded_over_edp(self.plan):
            return
        for param in self.expert_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if self.groups.edp is not None:
                dist.all_reduce(param.grad, group=self.groups.edp)
            param.grad.div_(self.mesh.dp)

    def _sum_shared_gradients(self) -> None:
        """Every copy of a tied parameter gets the sum of all copies' gradients (this rank's
        copies added here, other ranks' through the group of the ranks holding one)."""
        copies: dict[str, list[torch.nn.Parameter]] = {}
        for module, interface in self.local_stages:
            for path, name in interface.parameters:
                if name in self.shared_names:
                    copies.setdefault(name, []).append(module.get_parameter(path))
        for name, params in copies.items():
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            # Under FSDP every copy holds the same dp shard: summing local shards is the sum.
            total = local_tensor(params[0].grad)
            for param in params[1:]:
                total += local_tensor(param.grad)
            ranks = self.shared_names[name]
            if len(ranks) > 1:
                dist.all_reduce(total, group=self.groups.shared[ranks])
            for param in params[1:]:
                local_tensor(param.grad).copy_(total)

    def zero_grad(self) -> None:
        for adapter in self.adapters:
            adapter.module.zero_grad(set_to_none=True)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradient norm over the whole model (all stages); returns the norm before clipping."""
        squares = torch.zeros((), device=self.device, dtype=torch.float32)
        expert_squares = torch.zeros((), device=self.device, dtype=torch.float32)
        experts = {id(p) for p in self.expert_parameters()}
        sharded = False
        for module, interface in self.local_stages:
            tp_slices = _tp_slices(module)
            for path, name in interface.parameters:
                param = module.get_parameter(path)
                grad = param.grad
                if grad is None or self.first_holder[name] != interface.stage:  # tied copies count once
                    continue
                if id(param) in experts:  # this rank's block of the experts (whole over tp; under ZeRO its edp shard)
                    if self.coords.tp_index == 0:
                        expert_squares += local_tensor(grad).detach().float().pow(2).sum()
                    continue
                piece = tp_slices.get(path)
                if (piece is None or piece.dim is None) and self.coords.tp_index != 0:
                    continue  # replicated over tp: rank 0's copy counts
                # FSDP's gradients are shards; FSDP2's replicate (a pipelined 'ddp') holds whole ones
                sharded |= grad is not local_tensor(grad) and any(p.is_shard() for p in grad.placements)
                squares += local_tensor(grad).detach().float().pow(2).sum()
        if sharded:  # FSDP: each replica of a shard group holds a shard of every gradient
            dist.all_reduce(squares, group=self.groups.dp_shard if data_parallel_mode(self.plan) == "hsdp"
                            else self.groups.dp)
        if experts_sharded_over_edp(self.plan):  # the edp group's shards make up this rank's block
            dist.all_reduce(expert_squares, group=self.groups.edp)
        if self.groups.ep is not None:  # the ep group's blocks make up every expert
            dist.all_reduce(expert_squares, group=self.groups.ep)
        squares = squares + expert_squares
        if self.mesh.tp > 1:
            dist.all_reduce(squares, group=self.groups.tp)
        if self.mesh.pp > 1:
            dist.all_reduce(squares, group=self.groups.pp)
        norm = squares.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in self.parameters():
            if param.grad is not None:
                local_tensor(param.grad).mul_(scale.to(param.grad.dtype))
        return norm

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output for one global batch, on every rank; no activations kept."""
        check_caller_autocast(self.device.type, self.plan.mixed_precision)
        flat, _ = self._local_inputs(args, kwargs, None)
        for adapter in self.adapters:
            adapter.constants = flat
        local_batch = self.plan.batch_size // self.mesh.batch_shards
        with Watchdog(self.timeout_s, self.describe(), "forward"):
            try:
                chunks = [self._forward_microbatch(micro)
                          for micro in split_rows(flat, local_batch, self.plan.num_microbatches)]
                outputs = [torch.cat(parts, dim=0) if parts[0].dim() > 0 else parts[0] for parts in zip(*chunks)]
                if self.mesh.dp > 1:   # the replicas' rows; a cp group's replicas return the same rows
                    outputs = [torch.cat(all_gather_rows(x, self.groups.dp, self.mesh.dp).chunk(self.mesh.dp)
                                         [::self.mesh.cp]) for x in outputs]
            except (RuntimeError, dist.DistBackendError) as error:
                raise self._peer_error("forward", error) from error
        return self.compiled.io.unflatten(tuple(outputs))

    def _forward_microbatch(self, micro: list[Any]) -> list[torch.Tensor]:
        """One microbatch through this rank's stages in order, with blocking sends and receives
        to the ranks of the neighbouring stages (a chain: no cycle to deadlock on)."""
        pp_ranks, num_stages = self.groups.pp_ranks, self.plan.num_stages
        final: list[torch.Tensor] | None = None
        for adapter in self.adapters:
            s = adapter.interface.stage
            if s == 0:
                received = [micro[i].to(self.device) for i in adapter.tensor_positions]
            else:
                received = [torch.empty(v.shape, dtype=wire_dtype(v.dtype), device=self.device)
                            for v in adapter.received_vals]
                for tensor in received:
                    dist.recv(tensor, src=pp_ranks[(s - 1) % self.mesh.pp], group=self.groups.pp)
            outputs = adapter(*received)
            if s < num_stages - 1:
                for tensor in outputs:
                    dist.send(tensor.contiguous(), dst=pp_ranks[(s + 1) % self.mesh.pp], group=self.groups.pp)
            else:
                final = [t.contiguous() for t in outputs]
        if final is None:
            final = [torch.empty(v.shape, dtype=v.dtype, device=self.device) for v in self._model_output_vals]
        if self.mesh.pp > 1:
            for tensor in final:
                dist.broadcast(tensor, src=pp_ranks[-1], group=self.groups.pp)
        return final

    # ------------------------------------------------------------------ helpers

    def _local_inputs(self, args: tuple, kwargs: dict, target: Any) -> tuple[list[Any], Any]:
        flat = self.compiled.io.flatten(args, kwargs)
        batch = batch_size_of(flat)
        if batch != self.plan.batch_size:
            raise InputError(f"the batch has {batch} samples but the plan was made for {self.plan.batch_size}; "
                             "pass the same global batch size on every rank, or re-compile")
        share = batch // self.mesh.batch_shards   # a cp group's replicas take the same samples
        start = self.coords.dp_index // self.mesh.cp * share
        to_device = lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        local = [to_device(x) for x in take_rows(flat, batch, start, start + share)]
        if target is not None:
            target = torch.utils._pytree.tree_map(to_device, take_rows(target, batch, start, start + share))
        return local, target

    def _peer_error(self, what: str, error: BaseException) -> AutopartError:
        return AutopartError(
            f"{self.describe()}: {what} failed, a peer process died, hung past timeout_s={self.timeout_s:g} "
            f"or raised: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        )


# ----------------------------------------------------------------------------- helpers


def _holders(compiled) -> dict[str, list[int]]:
    """Original parameter name -> the stages that hold a copy."""
    holders: dict[str, list[int]] = {}
    for interface in compiled.interfaces:
        for _, name in interface.parameters:
            holders.setdefault(name, []).append(interface.stage)
    return holders


def _shared_parameters(holders: dict[str, list[int]], pp: int) -> dict[str, tuple[int, ...]]:
    """Original parameter name -> the pipeline ranks that hold a copy, for names held by
    several stages (one rank may hold several copies, with virtual stages)."""
    return {name: tuple(sorted({s % pp for s in stages})) for name, stages in holders.items() if len(stages) > 1}


def _materialise(module: torch.fx.GraphModule, device: torch.device, state_dict, init_fn,
                 interface: StageInterface) -> torch.fx.GraphModule:
    on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    if on_meta:
        if state_dict is None and init_fn is None:
            raise InputError("the model was compiled on the meta device: pass state_dict= (a full state dict) "
                             "or init_fn=(name, tensor) to cm.distributed() so each rank fills its own shard")
        module = module.to_empty(device=device)
    else:
        module = module.to(device)
    if state_dict is not None:
        from autopart.runtime.state import load_into

        load_into(module, interface, state_dict)
    elif on_meta:
        with torch.no_grad():
            for path, name in [*interface.parameters, *interface.buffers]:
                init_fn(name, module.get_parameter(path) if (path, name) in interface.parameters
                        else module.get_buffer(path))
    return module


__all__ = ["DistributedRunner"]
