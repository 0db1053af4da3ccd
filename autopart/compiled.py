"""What `autopart.compile` returns: the plan, the rank modules, and ways to run them."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from autopart.core.batch import split_rows
from autopart.cost_models import Cluster
from autopart.core.errors import InputError
from autopart.core.interfaces import IOSpec, StageInterface, io_spec, stage_interface
from autopart.core.plan import Plan
from autopart.passes.device import move_to_device
from autopart.runtime.local import LocalPipeline
from autopart.runtime.autocast import check_caller_autocast


@dataclass(frozen=True)
class _RankModules:
    """The rank modules and what the runtimes read with them, built once."""

    plan: Plan
    """The plan on the traced graph's nodes (stages name their nodes, tp splits per node)."""
    stages: list[list[torch.fx.GraphModule]]
    """[stage][tp rank] -> GraphModule."""
    graph: torch.fx.GraphModule
    """The traced microbatch graph (for users: the runtimes read `io`)."""
    interfaces: tuple[StageInterface, ...]
    io: IOSpec
    local: LocalPipeline
    seconds: float = 0.0
    """Wall time to build them after compile (a layer stack analysed once: the whole model's trace)."""


class CompiledModel:
    """A partitioned model: `plan`, one GraphModule per rank, and a one-process simulation.

    What the runtimes read besides the Plan: the rank modules, `interfaces` (one
    `StageInterface` per stage) and `io` (the model's input/output structure),
    which codegen and the tracer wrote on the modules; never the traced graph.
    Nothing it shows changes after `autopart.compile` returns: a compile that
    analysed a layer stack once builds the rank modules when first asked for them,
    and keeps them apart from `plan`.
    """

    def __init__(self, *, plan: Plan, cluster: Cluster, stages: list[list[torch.fx.GraphModule]] | None = None,
                 graph: torch.fx.GraphModule | None = None, phase_seconds: dict[str, float] | None = None,
                 materialize: Callable[[], tuple[Plan, list[list[torch.fx.GraphModule]], torch.fx.GraphModule]]
                 | None = None) -> None:
        if stages is None and materialize is None:
            raise ValueError("CompiledModel needs the rank modules or a way to build them (materialize)")
        self._plan = plan
        self._cluster = cluster
        self._compile_seconds = dict(phase_seconds or {})
        self._materialize = materialize
        self._built: _RankModules | None = None
        if stages is not None:
            self._built = self._assemble(plan, stages, graph)

    @property
    def plan(self) -> Plan:
        """The plan. Compiled with a layer stack analysed once, its stages list blocks but no graph
        nodes, and its tp splits are counted per block (`graph_plan` has them per node)."""
        return self._plan

    @property
    def cluster(self) -> Cluster:
        return self._cluster

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Wall time of each compile phase: trace, annotate, plan (with the tensor-parallel solves), retrace
        (when the plan's microbatch size is not the traced one), codegen; whole_model once a layer stack
        analysed once has been traced whole."""
        seconds = dict(self._compile_seconds)
        if self._materialize is not None and self._built is not None:
            seconds["whole_model"] = self._built.seconds
        return seconds

    @property
    def graph_plan(self) -> Plan:
        """The plan on the traced whole-model graph: every stage names its nodes and the tp splits are
        per node (traces the whole model first if compile analysed a layer stack once)."""
        return self._modules().plan

    def _assemble(self, plan: Plan, stages: list[list[torch.fx.GraphModule]], graph: torch.fx.GraphModule,
                  seconds: float = 0.0) -> _RankModules:
        interfaces = tuple(stage_interface(ranks[0]) for ranks in stages)
        # Data-parallel replicas average their gradients: in one process that is
        # the same as one pipeline over all dp × m microbatches of the batch (under context
        # parallelism, dp / cp groups of replicas, each group's cp ranks in lock step).
        shards = plan.mesh.batch_shards
        local = LocalPipeline(stages, interfaces, plan.schedule, plan.num_microbatches * shards,
                              plan.batch_size, virtual_stages=plan.virtual_stages, replicas=shards,
                              mixed_precision=plan.mixed_precision, cp=plan.mesh.cp)
        return _RankModules(plan=plan, stages=stages, graph=graph, interfaces=interfaces, io=io_spec(graph),
                            local=local, seconds=seconds)

    def _modules(self) -> _RankModules:
        """The rank modules, built once (a compile that analysed a layer stack once defers this until
        something needs them)."""
        if self._built is None:
            started = time.perf_counter()
            plan, stages, graph = self._materialize()
            self._built = self._assemble(plan, stages, graph, time.perf_counter() - started)
        return self._built

    @property
    def interfaces(self) -> tuple[StageInterface, ...]:
        """How each stage connects to its neighbours and to the model, stage 0 first."""
        return self._modules().interfaces

    @property
    def io(self) -> IOSpec:
        """How a call's (args, kwargs) flatten into the stage inputs and the outputs rebuild the model's."""
        return self._modules().io

    @property
    def graph(self) -> torch.fx.GraphModule:
        """The traced whole-model graph (one microbatch), with cost annotations."""
        return self._modules().graph

    @property
    def num_ranks(self) -> int:
        """Processes the plan runs on: dp × pp × tp."""
        return self.plan.mesh.num_devices

    def rank_module(self, rank: int) -> torch.fx.GraphModule:
        """The GraphModule rank `rank` runs: its stage, its tp slice of the parameters.

        Ranks are laid out (dp, pp, tp) with tp fastest; data-parallel replicas run
        the same modules.
        """
        modules = self.rank_modules(rank)
        if len(modules) > 1:
            raise InputError(f"rank {rank} runs {len(modules)} stages (virtual_stages={self.plan.virtual_stages}); "
                             "use rank_modules(rank)")
        return modules[0]

    def rank_modules(self, rank: int, device: torch.device | str | None = None) -> list[torch.fx.GraphModule]:
        """The GraphModules of every stage rank `rank` runs (several with virtual stages), first to last.

        With `device`, every device the graphs carry (factory ops, `to(device)`, traced on the CPU)
        is rewritten to it, in place (passes/device.py); parameters stay where they are.
        """
        mesh = self.plan.mesh
        if not 0 <= rank < mesh.num_devices:
            raise InputError(f"rank={rank} is outside 0..{mesh.num_devices - 1} "
                             f"(the plan uses dp={mesh.dp} × pp={mesh.pp} × tp={mesh.tp} ranks)")
        modules = [self._modules().stages[s][rank % mesh.tp] for s in self.plan.stages_of_rank((rank // mesh.tp) % mesh.pp)]
        if mesh.ep > 1:  # this rank's block of the experts (the stage modules keep them whole for simulate)
            ep_index = (rank // (mesh.tp * mesh.pp)) % mesh.ep
            modules = [_with_expert_block(module, ep_index) for module in modules]
        if mesh.cp > 1:  # this rank's index in its cp group (the stage modules run every index in simulate)
            cp_index = (rank // (mesh.tp * mesh.pp)) % mesh.cp
            modules = [_with_context_rank(module, cp_index) for module in modules]
        if device is not None:
            for module in modules:
                move_to_device(module, device, move_state=False)
        return modules

    def stage_module(self, stage: int, tp_index: int = 0) -> torch.fx.GraphModule:
        """The GraphModule of pipeline stage `stage`, tensor-parallel rank `tp_index`."""
        return self._modules().stages[stage][tp_index]

    def report(self) -> str:
        """The partition report as text."""
        from autopart.report.text import render_text

        return render_text(self.plan)

    def save_html(self, path: str) -> None:
        """Write the partition report as one self-contained HTML file."""
        from autopart.report.html import render_html

        with open(path, "w", encoding="utf-8") as f:
            f.write(render_html(self.plan))

    def distributed(self, **kwargs: Any):
        """This process's runner under torchrun (see `autopart.runtime.distributed.DistributedRunner`).

        Keywords: timeout_s (collective timeout, default 300), device, state_dict
        (a full state dict to load), init_fn(name, tensor) (fills meta-device tensors),
        kernels_backend (torch.compile's backend when the plan compiles kernels, default "inductor").
        """
        from autopart.runtime.distributed import DistributedRunner

        self._modules()
        return DistributedRunner(self, **kwargs)

    # ------------------------------------------------------------------ simulation

    def simulate(self, *args: Any, **kwargs: Any) -> Any:
        """Forward over all ranks in one process, microbatched as planned; the model's own output."""
        self._check_caller_autocast()
        per_microbatch = self._modules().local.forward(self.io.flatten(args, kwargs))
        return self.io.unflatten(_concat_microbatches(per_microbatch, self.plan.microbatch_size))

    def simulate_train_step(self, *args: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                            **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step over all ranks in one process.

        `loss_fn(output, target)` must be a mean over the microbatch (like
        `torch.nn.functional.cross_entropy`'s default); the step's loss is the mean
        over microbatches. Returns (loss, gradient of every original parameter by name).
        """
        self._check_caller_autocast()
        flat = self.io.flatten(args, kwargs)
        targets = split_rows(target, self.plan.batch_size, self.plan.num_microbatches * self.plan.mesh.batch_shards)

        def loss_of(flat_outputs: tuple[Any, ...], micro_target: Any) -> torch.Tensor:
            return loss_fn(self.io.unflatten(flat_outputs), micro_target)

        local = self._modules().local
        local.zero_grad()
        loss = local.train_step(flat, targets, loss_of)
        grads = local.gradients()
        local.zero_grad()
        return loss, grads


    def _check_caller_autocast(self) -> None:
        for device_type in ("cpu", "cuda"):
            check_caller_autocast(device_type, self.plan.mixed_precision)


def _with_expert_block(module: torch.fx.GraphModule, ep_index: int) -> torch.fx.GraphModule:
    """A copy of a stage module holding only ep index `ep_index`'s experts (passes/expert_parallel.py)."""
    from autopart.passes.expert_parallel import expert_modules, localize

    if not expert_modules(module):
        return module
    local = copy.deepcopy(module)
    localize(local, ep_index)
    return local


def _with_context_rank(module: torch.fx.GraphModule, cp_index: int) -> torch.fx.GraphModule:
    """A copy of a stage module whose context-parallel ops know their rank (passes/context_parallel/)."""
    from autopart.passes.context_parallel import localize

    local = copy.deepcopy(module)
    localize(local, cp_index)
    return local


def _concat_microbatches(per_microbatch: list[tuple[Any, ...]], microbatch_size: int) -> tuple[Any, ...]:
    if len(per_microbatch) == 1:
        return per_microbatch[0]
    merged = []
    for k, first in enumerate(per_microbatch[0]):
        parts = [outputs[k] for outputs in per_microbatch]
        if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == microbatch_size:
            merged.append(torch.cat(parts, dim=0))
        elif all(_same(p, first) for p in parts):
            merged.append(first)
        else:
            raise InputError(
                f"model output {k} (shape {getattr(first, 'shape', type(first).__name__)}) has no batch "
                "dimension and differs between microbatches; use num_microbatches=1 to read it whole"
            )
    return tuple(merged)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b
