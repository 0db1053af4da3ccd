"""`autopart.compile`: the driver. Each stage of the compiler is one line below."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import warnings
from typing import Any

import torch
import torch.fx

from autopart import passes
from autopart.axes import AXES, SearchShape
from autopart.compiled import CompiledModel
from autopart.core.blocks import BlockGraph
from autopart.core.errors import InputError, PlanError
from autopart.core.modes import check_recompute, data_parallel_mode_name, reshards_parameters
from autopart.core.plan import Plan, TensorParallelPlan, autocast_dtype
from autopart.core.request import PlanRequest
from autopart.cost_models import Cluster, optimizer_state_bytes
from autopart.frontend.analysis import Analysis, analyse, block_strategies
from autopart.frontend.device_arg import DevicesArg, resolve_devices
from autopart.frontend.input_checks import check_mesh_product, check_tp_plan
from autopart.frontend.source import ModelSource
from autopart.passes.random_ops import route_sharded_random
from autopart.passes.stack_assignment import restate_assignment
from autopart.passes.tensor_parallel import TPAssignment
from autopart.planner.choices import smallest_microbatch
from autopart.planner.fit_advice import with_fit_advice
from autopart.planner.mesh_search import choose_splits, search_mesh, stages_on_blocks
from autopart.report.summary import splits_nothing, tensor_parallel_summary

def compile(  # noqa: A001 - the public name the project promises
    model: torch.nn.Module,
    devices: DevicesArg,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    *,
    pipeline_parallel: int | None = None,
    num_microbatches: int | None = None,
    data_parallel: int | None = None,
    tensor_parallel: int | None = None,
    sequence_parallel: bool | None = None,
    tp_plan: dict[str, str] | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    expert_parallel: int | None = None,
    context_parallel: int | None = None,
    data_parallel_mode: str | None = None,
    recompute: str | None = None,
    optimizer: str = "adam",
    mixed_precision: str | None = None,
    training: bool = True,
    reuse_layers: bool = True,
    compile_kernels: bool | None = None,
    verbose: bool = False,
) -> CompiledModel:
    """Partition `model` across `devices` and return the plan with one module per rank.

    `example_inputs` is one whole batch (dim 0 of each batched tensor); the plan
    splits it among `data_parallel` replicas of the pipeline and each share into
    microbatches. `pipeline_parallel` (pipeline ranks), `num_microbatches` (per
    replica), `data_parallel`, `tensor_parallel` (devices per tp group), `schedule`
    ('gpipe', '1f1b', 'interleaved_1f1b' or 'zero_bubble'), `virtual_stages`
    (stages per pipeline rank, for the last two: the plan has pipeline_parallel ×
    virtual_stages stages), `data_parallel_mode` ('ddp', 'zero2', 'zero3' or 'hsdp';
    see plan.DATA_PARALLEL_MODES) and `recompute` ('none', 'selective' or 'full' for
    every block whose replay frees memory; autopart/recompute.py) fix those choices; None lets the planner choose
    (recomputation then per block, only where memory demands it). `tp_plan` fixes layers' splits,
    e.g. {"blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"}. `sequence_parallel`
    (Megatron-SP; passes/tensor_parallel/sequence.py) shards the activations between the split
    regions along the sequence: True for every layer's residual stream, False never, None lets
    the strategy ILP choose where it pays.
    `expert_parallel` splits each mixture-of-experts layer's experts over that many data-parallel
    replicas (tokens reach them by all-to-all; autopart/axes/expert.py); None lets the planner choose.
    `context_parallel` splits each sequence over that many consecutive data-parallel replicas
    (`data_parallel` counts them: the batch splits over data_parallel / context_parallel groups);
    attention exchanges keys and values among them (autopart/axes/context.py); None lets the
    planner choose.
    `optimizer` ('sgd', 'momentum', 'adam', 'adamw') prices optimizer state.
    `mixed_precision="bf16"` trains as `torch.autocast(bfloat16)` over float32 parameters,
    gradients and optimizer state; the runtimes enable it and the planner prices it.
    `reuse_layers` (default) analyses a stack of identical layers once: a copy of the model with
    three of them is traced, costed and split, and the costs restated for every layer; the whole
    model is traced only when rank modules are first asked for (`CompiledModel.rank_modules`,
    `simulate`, `distributed`). False traces every layer up front.
    `compile_kernels` runs every rank's stage through TorchInductor (torch.compile: fused kernels,
    identical blocks compiled once) and prices the plan that way; None (default) compiles for CUDA
    clusters and not for CPU ones (the one-process simulation always runs op by op).
    """
    log = _Phases(verbose)
    cluster = resolve_devices(devices)
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    _check_model(model)
    check_mesh_product(cluster.num_devices, data_parallel, tensor_parallel, pipeline_parallel)
    check_tp_plan(model, tp_plan)
    _check_optimizer(optimizer)
    compute_dtype = _check_mixed_precision(mixed_precision)
    data_parallel_mode, recompute = _check_modes(data_parallel_mode, recompute)
    compile_kernels = _check_compile_kernels(compile_kernels, cluster)
    source = ModelSource.of(model, example_inputs, example_kwargs, cluster, compute_dtype, fused=compile_kernels)
    request = PlanRequest(batch_size=source.batch_size, pipeline_parallel=pipeline_parallel,
                          num_microbatches=num_microbatches, data_parallel=data_parallel,
                          tensor_parallel=tensor_parallel, sequence_parallel=_check_flag(
                              "sequence_parallel", sequence_parallel), tp_plan=tuple((tp_plan or {}).items()), schedule=schedule,
                          virtual_stages=virtual_stages, data_parallel_mode=data_parallel_mode,
                          expert_parallel=expert_parallel, context_parallel=context_parallel,
                          recompute=recompute, optimizer=optimizer, mixed_precision=mixed_precision,
                          compile_kernels=compile_kernels, training=training, reuse_layers=reuse_layers,
                          verbose=verbose)

    # Trace at the smallest microbatch the planner may choose (the one it usually
    # picks); costs of other microbatch sizes scale from it.
    traced_size = smallest_microbatch(request, cluster)
    analysis = analyse(model, *source.rows(traced_size), cluster, compute_dtype,  # TRACED, COSTED -> blocks (a
                       min_blocks=(pipeline_parallel or 1) * (virtual_stages or 1),  # stack of identical layers:
                       reuse_layers=reuse_layers, pinned=tuple(tp_plan or ()),     # three of them, restated)
                       phase=log, note=log.note, fused=compile_kernels)
    stacked = analysis.stack is not None
    tp_sizes = AXES["tp"].degrees(request, cluster, SearchShape())
    log("plan", f"planning over {analysis.num_blocks} blocks, tp in {tp_sizes}")
    try:
        found = search_mesh(analysis.gm, analysis.blocks, cluster, request, traced_batch_size=traced_size,  # ILPs
                            tp_choices=tp_sizes, retrace=None if stacked else source,  # -> Plan, and its
                            restate=analysis.restate, progress=log.note, phase=log)  # microbatch's graph
    except PlanError as error:  # no plan for lack of memory: what would fit, by the same search
        log.note("no plan fits: searching for the devices and the batch that would")

        def plan_on(other: Cluster, other_request: PlanRequest) -> Plan:
            sizes = AXES["tp"].degrees(other_request, other, SearchShape())
            return search_mesh(analysis.gm, analysis.blocks, other, other_request, traced_batch_size=traced_size,
                               tp_choices=sizes, retrace=None, restate=analysis.restate).plan

        raise with_fit_advice(error, cluster, request, plan_on)
    plan = found.plan
    log("codegen", f"plan: dp={plan.mesh.dp} pp={plan.mesh.pp} tp={plan.mesh.tp}, "
                   f"{plan.num_microbatches} microbatches, {plan.schedule}"
                   + (f" ({plan.virtual_stages} stages per rank)" if plan.virtual_stages > 1 else ""))
    if stacked:  # the whole model's graph and rank modules when first asked for
        if found.assignment is not None:
            plan = dataclasses.replace(plan, tensor_parallel=dataclasses.replace(
                plan.tensor_parallel, nodes={}, collectives=(),
                block_strategies=block_strategies(analysis, found.assignment),
                analysed_layers=f"{analysis.stack.keep} of {analysis.stack.num_layers}"))
        _warn_if_tp_splits_nothing(plan)
        log("done")
        whole = _WholeModel(source=source, request=request, analysis=analysis, assignment=found.assignment,
                            tp_budget=found.tp_budget, eager_splits=found.eager_splits, traced_size=traced_size)
        return CompiledModel(plan=plan, cluster=cluster, phase_seconds=log.seconds,
                             materialize=functools.partial(whole.rank_modules, plan))
    _warn_if_tp_splits_nothing(plan)
    ranks = _rank_modules(found.graph, plan, found.assignment, found.blocks, model)
    log("done")
    return CompiledModel(plan=plan, stages=ranks, graph=found.graph, cluster=cluster, phase_seconds=log.seconds)


def _warn_if_tp_splits_nothing(plan: Plan) -> None:
    """A tp group that splits no op (a forced size on layers it cannot split): each device repeats its peers'
    work, which the user should hear of at once, not only in the report."""
    if splits_nothing(plan):
        warnings.warn(f"tensor_parallel={plan.mesh.tp}: {tensor_parallel_summary(plan)}", stacklevel=3)


def _rank_modules(gm: torch.fx.GraphModule, plan: Plan, assignment, blocks: BlockGraph, model: torch.nn.Module):
    """[stage][tp rank] GraphModules of `plan` cut from the whole model's graph `gm` (whose blocks are `blocks`)."""
    split = passes.split_stages(gm, plan.stage_of_node(), plan.num_stages)    # cut into stage submodules
    stages = passes.stage_modules(split, _canonical_names(model))             # one GraphModule per stage
    ranks = passes.tensor_parallel.shard_stages(stages, assignment)           # its tp ranks, collectives in
    ranks = [route_sharded_random(r) if len(r) > 1 else r for r in ranks]    # dropout on shards: own RNG
    if plan.mesh.ep > 1:                                                      # experts over ep ranks
        for module in (m for r in ranks for m in r):
            passes.expert_parallel.shard_experts(module, plan.mesh.ep)
    if plan.mesh.cp > 1:                                                      # sequences over cp ranks
        ranks = passes.context_parallel.shard_stages_context(gm, ranks, plan.mesh.cp)
    return [[_regions(r, plan, s, blocks) for r in rs] for s, rs in enumerate(ranks)]  # blocks to recompute


@dataclasses.dataclass(frozen=True, kw_only=True)
class _WholeModel:
    """What tracing the whole model later needs, after a layer stack was analysed once."""

    source: ModelSource
    request: PlanRequest
    analysis: Analysis
    """The copy with a few layers the plan was made on."""
    assignment: TPAssignment | None
    """The tp splits chosen on the copy (None at tp = 1)."""
    tp_budget: float | None
    """The strategy ILP's parameter budget they were chosen under."""
    eager_splits: bool
    """They were chosen by op-by-op prices (planner/mesh_search.py)."""
    traced_size: int
    """The microbatch size the copy was traced at."""

    def rank_modules(self, plan: Plan) -> tuple[Plan, list[list[torch.fx.GraphModule]], torch.fx.GraphModule]:
        """The whole model traced at the plan's microbatch, the plan on its nodes, and the rank modules.

        Its blocks are the ones planned, by name; the tp assignment chosen on the analysed copy is
        restated node by node (at another microbatch size it is chosen again on the copy first,
        under the same parameter budget).
        """
        size, cluster = plan.microbatch_size, self.source.cluster
        planned = [b for stage in plan.stages for b in stage.blocks]
        gm, blocks = self.source.planned_graph(size, self.analysis.blocks.depth, planned, plan.model_class)
        whole = None
        if plan.mesh.tp > 1:
            copy, assignment = self.analysis, self.assignment
            if size != self.traced_size:  # node names and shapes differ at this size: choose the splits again
                copy = analyse(self.source.model, *self.source.rows(size), cluster, self.source.compute_dtype,
                               min_blocks=self.analysis.num_blocks, fused=self.source.fused)
                assignment = choose_splits(copy.gm, copy.blocks, cluster, self.request, plan.mesh.tp, self.tp_budget,
                                           self.eager_splits)
            if copy.expansion is not None:
                whole = restate_assignment(copy.gm, copy.blocks, gm, blocks, copy.expansion, assignment)
            if whole is None:  # the graphs do not line up node by node: choose the splits on the whole graph
                whole = choose_splits(gm, blocks, cluster, self.request, plan.mesh.tp, self.tp_budget,
                                      self.eager_splits)
        tensor_parallel = None
        if whole is not None:
            tensor_parallel = dataclasses.replace(TensorParallelPlan.of(whole),
                                                  analysed_layers=plan.tensor_parallel.analysed_layers)
        plan = dataclasses.replace(plan, stages=stages_on_blocks(plan, blocks), tensor_parallel=tensor_parallel)
        return plan, _rank_modules(gm, plan, whole, blocks, self.source.model), gm


def _regions(module: torch.fx.GraphModule, plan: Plan, s: int, blocks: BlockGraph) -> torch.fx.GraphModule:
    """Blocks the plan recomputes, or (ZeRO-3, HSDP, compiled kernels) every block, as region
    submodules: each an FSDP unit, and the unit the runtime compiles (identical blocks once)."""
    stage = plan.stages[s]
    nodes_of = {b.name: b.node_names for b in blocks.blocks}
    units = (reshards_parameters(plan.data_parallel_mode) and plan.mesh.dp > 1) or plan.compile_kernels
    return passes.nest_regions(module, [(name, nodes_of[name], stage.recompute_of(name)) for name in stage.blocks],
                               units=units)


class _Phases:
    """Wall time of each compile phase; printed as it goes when verbose."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.started = self.last = time.perf_counter()
        self.current: str | None = None
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str, message: str = "") -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.last
        self.current, self.last = phase, now
        if self.verbose:
            print(f"[autopart {now - self.started:6.2f}s] {message or phase}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A progress line within the current phase (printed when verbose; the search's own lines
        always, which it sends only once it has run a second or more)."""
        now = time.perf_counter()
        if self.verbose or self.current == "plan":
            print(f"[autopart {now - self.started:6.2f}s]   {message}", file=sys.stderr, flush=True)


def _check_model(model: torch.nn.Module) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise InputError(
            f"{type(model).__name__} has no parameters: there is nothing to partition; "
            "run it on one device as it is"
        )


def _check_optimizer(optimizer: str) -> None:
    try:
        optimizer_state_bytes(0, optimizer)
    except ValueError as error:
        raise InputError(f"optimizer={optimizer!r}: {error}") from error


def _check_modes(data_parallel_mode: str | None, recompute: str | None) -> tuple[str | None, str | None]:
    try:
        return data_parallel_mode_name(data_parallel_mode), check_recompute(recompute)
    except ValueError as error:
        raise InputError(str(error)) from error


def _check_compile_kernels(compile_kernels: bool | None, cluster: Cluster) -> bool:
    """`compile_kernels`, or its default: compiled for a cluster of GPUs, op by op for CPUs."""
    if compile_kernels is None:
        return all(device.device_type == "cuda" for device in cluster.devices)
    if not isinstance(compile_kernels, bool):
        raise InputError(f"compile_kernels={compile_kernels!r} must be True, False or None "
                         "(None: compiled on CUDA clusters)")
    return compile_kernels


def _check_mixed_precision(mixed_precision: str | None) -> torch.dtype | None:
    try:
        return autocast_dtype(mixed_precision)
    except ValueError as error:
        raise InputError(str(error)) from error




def _canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every path a parameter or buffer is reachable by -> the name `named_parameters()` gives it."""
    names: dict[str, str] = {}
    first: dict[int, str] = {}
    for path, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        names[path] = first.setdefault(id(tensor), path)
    return names


def _check_flag(name: str, value: bool | None) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InputError(f"{name}={value!r}: pass True, False or None (the planner chooses)")
    return value
