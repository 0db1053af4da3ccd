"""The Plan: everything codegen and the runtimes need, and nothing else.

Frozen dataclasses with a versioned JSON form (never pickle). Schema, version 4
(all times in seconds, sizes in bytes, "per microbatch" where stated):

```
{"version": 4, "model_class": str, "batch_size": int, "num_microbatches": int,
 "schedule": "gpipe" | "1f1b" | "interleaved_1f1b" | "zero_bubble", "optimizer": str,
 "mesh": {"pp": int, "tp": int, "dp": int, "dp_shard": int (default 1), "ep": int (default 1),
          "cp": int (default 1)}, "virtual_stages": int (default 1),
 "data_parallel_mode": "ddp" | "zero2" | "zero3" | "hsdp" (default "ddp"),
 "mixed_precision": null | "bf16" (default null: the model's own dtypes),
 "compile_kernels": bool (default false: every rank runs its graph op by op),
 "cluster": Cluster.to_dict(),
 "stages": [{"index", "device", "device_name", "blocks": [str], "node_names": [str],
             "fwd_seconds", "bwd_seconds", "comm_seconds", "fwd_flops", "bwd_flops",
             "num_params", "send_bytes", "recompute": ["none" | "selective" | "full"] (one per block,
             default all "none"), "recompute_seconds" (default 0),
             "memory": {"params", "grads", "optimizer", "buffers", "activations",
                        "boundary", "capacity"}}],
 "predicted_step_seconds": float (= solver.objective_seconds, the pipeline's step, +
     data_parallel_sync_seconds + optimizer_seconds), "bubble_fraction": float,
 "data_parallel_sync_seconds": float, "optimizer_seconds": float (default 0, version 4),
 "idle_devices": [int],
 "solver": {"backend", "status", "objective_seconds", "bound_seconds", "solve_seconds",
            "plan_seconds", "num_problems", "num_pruned", "num_shapes_pruned"},
 "candidates": [{"data_parallel", "pipeline_parallel", "num_microbatches", "schedule", "step_seconds" | null,
                 "status", "detail", "tensor_parallel", "virtual_stages", "data_parallel_mode",
                 "recompute"}],
 "tensor_parallel": null | {"tp": int, "nodes": {node: {"strategy", "output", "inputs",
                            "grad_sync", "scaled_bias"}}, "predicted_seconds", "collectives": [...],
                            "param_bytes_per_device", "status", "solve_seconds",
                            "block_strategies": {block: {strategy: count}}, "analysed_layers": null | str,
                            "sequence_parallel": bool}}
```

Older plans still load (`Plan.from_json` upgrades them as it reads them):
version 3 did not itemise the step (its data_parallel_sync_seconds and
optimizer_seconds read as 0); version 1 named a candidate's pipeline ranks "num_stages" (now
"pipeline_parallel"); versions 1 and 2 called ZeRO-2 'fsdp' (optimizer state
and master weights sharded, parameters kept whole through the step: now
'zero2') and recompute nothing. "Stages" are model stages throughout:
`Plan.num_stages` = mesh.pp × virtual_stages.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from autopart.core.errors import InputError
from autopart.core.modes import DATA_PARALLEL_MODE_ALIASES, recompute_counts

PLAN_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
"""Schema versions `Plan.from_json` reads (older ones are upgraded on load)."""

MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16}
"""`Plan.mixed_precision` names and the autocast dtype each runs. float16 would also need a
gradient scaler (its range underflows gradients), which the runtimes do not provide."""


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a `mixed_precision` setting (None: full precision)."""
    if mixed_precision is None:
        return None
    if mixed_precision not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r} is not known; use one of "
                         f"{sorted(MIXED_PRECISION_DTYPES)} or None")
    return MIXED_PRECISION_DTYPES[mixed_precision]


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """Peak bytes a stage holds, by kind."""

    params: int
    """Parameters of the stage (tied ones counted on every stage that reads them)."""
    grads: int
    """Gradients of its trainable parameters."""
    optimizer: int
    """Optimizer state of its trainable parameters."""
    buffers: int
    """Buffers and constants."""
    activations: int
    """Saved activations of the microbatches the schedule keeps in flight."""
    boundary: int
    """Received and sent boundary tensors of the microbatches in flight."""
    capacity: int
    """Memory of the stage's device."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations + self.boundary


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One pipeline stage: where it runs, what it computes, what it costs."""

    index: int
    """Position in the pipeline, 0 first."""
    device: int
    """The first device that runs it: its pipeline rank (index % mesh.pp) × mesh.tp, in replica 0 (the
    devices of a stage are `Mesh.devices_of(index % mesh.pp)`)."""
    device_name: str
    """DeviceSpec name of that device."""
    blocks: tuple[str, ...]
    """Names of the blocks (layers) on the stage, first to last."""
    node_names: tuple[str, ...]
    """Graph nodes (call_function) the stage computes."""
    fwd_seconds: float
    """Forward compute of one microbatch."""
    bwd_seconds: float
    """Backward compute of one microbatch."""
    comm_seconds: float
    """Boundary sends and receives of one microbatch, forward and backward."""
    fwd_flops: int
    """Forward FLOPs of one microbatch."""
    bwd_flops: int
    """Backward FLOPs of one microbatch."""
    num_params: int
    """Parameter elements held by the stage."""
    send_bytes: int
    """Activation bytes sent to the next stage per microbatch."""
    memory: StageMemory
    """Peak memory by kind."""
    recompute: tuple[str, ...] = ()
    """Per block (as `blocks`): 'none', 'selective' or 'full' (autopart/recompute.py); () = all 'none'."""
    recompute_seconds: float = 0.0
    """Of `bwd_seconds`, the forward recomputed in backward for one microbatch."""

    @property
    def seconds(self) -> float:
        return self.fwd_seconds + self.bwd_seconds + self.comm_seconds

    def recompute_of(self, block: str) -> str:
        """How block `block` of this stage recomputes its activations."""
        return self.recompute[self.blocks.index(block)] if self.recompute else "none"

    @property
    def recompute_summary(self) -> str:
        """'none', 'selective' or 'full' when every block does the same, else e.g. '3 full, 2 none'."""
        return recompute_counts(self.recompute)


@dataclass(frozen=True, kw_only=True)
class Mesh:
    """Device mesh shape: dp × pp × tp devices."""

    pp: int
    """Pipeline ranks (each runs Plan.virtual_stages stages)."""
    tp: int = 1
    """Tensor-parallel group size."""
    dp: int = 1
    """Data-parallel replicas."""
    dp_shard: int = 1
    """Replicas among which FSDP shards the state: 1 for 'ddp', dp for 'zero2' and 'zero3', the
    replicas on one host for 'hsdp' (dp / dp_shard hosts then hold replicas of the shards)."""
    ep: int = 1
    """Expert-parallel group size: ep consecutive data-parallel replicas split each mixture-of-experts
    layer's experts (dim 0 of their weights) among them; no ranks of its own (axes/expert.py)."""
    cp: int = 1
    """Context-parallel group size: cp consecutive data-parallel replicas split each sequence among
    them (axes/context.py); no ranks of its own. The batch splits over dp / cp groups of replicas,
    and every replica still holds the whole pipeline rank's parameters (gradients are reduced over
    all dp replicas, cp ones included)."""

    @property
    def batch_shards(self) -> int:
        """Groups the batch splits over: dp / cp (each group's cp replicas split its sequences)."""
        return self.dp // self.cp

    @property
    def num_devices(self) -> int:
        return self.pp * self.tp * self.dp

    def rank_of(self, dp_index: int, pp_rank: int, tp_index: int = 0) -> int:
        """The rank (and device) at these coordinates: ranks are laid out (dp, pp, tp), tp fastest."""
        return (dp_index * self.pp + pp_rank) * self.tp + tp_index

    def devices_of(self, pp_rank: int) -> list[int]:
        """The devices that run pipeline rank `pp_rank`'s stages: its tp group in every replica."""
        return [self.rank_of(d, pp_rank, t) for d in range(self.dp) for t in range(self.tp)]


@dataclass(frozen=True, kw_only=True)
class ExpertsPlan:
    """The mixture-of-experts layers of a plan: their grouped expert matmuls and how they are split."""

    layers: tuple[str, ...]
    """Blocks holding expert weights (grouped expert matmuls), in model order."""
    num_experts: int
    """Experts per layer (their gcd over the layers)."""
    weight_bytes: int
    """Bytes of all expert weights (whole model)."""
    ep: int = 1
    """Ranks splitting each layer's experts on dim 0 (`Mesh.ep`); 1: every rank holds all of them."""
    tp: int = 1
    """Ranks splitting each expert's matmuls (expert tensor parallelism: the tp group); 1: experts whole."""

    @property
    def per_rank(self) -> int:
        return self.num_experts // self.ep


@dataclass(frozen=True, kw_only=True)
class SolverInfo:
    """How the plan was found."""

    backend: str
    """OR-Tools backend of the chosen solve."""
    status: str
    """'OPTIMAL' or 'FEASIBLE' for the chosen solve."""
    objective_seconds: float
    """Objective of the chosen solve: predicted step time."""
    bound_seconds: float
    """Best proven lower bound of that solve."""
    solve_seconds: float
    """Solver wall time of the chosen solve."""
    plan_seconds: float
    """Wall time of the whole search (all candidates)."""
    num_problems: int
    """ILPs solved during the search."""
    num_pruned: int = 0
    """Layouts a bound ruled out without a solve (`candidates` lists the closest few hundred)."""
    num_shapes_pruned: int = 0
    """Mesh shapes (tp × dp × pp) a bound ruled out whole, their layouts never listed."""


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One configuration the planner tried."""

    data_parallel: int
    """Replicas of the pipeline."""
    pipeline_parallel: int
    """Pipeline ranks (each runs `virtual_stages` stages)."""
    num_microbatches: int
    schedule: str
    step_seconds: float | None
    """Predicted step time, None when infeasible or pruned."""
    status: str
    """'chosen', 'feasible', 'infeasible' or 'pruned'."""
    detail: str
    """Why: the binding constraint, the shortfall, or the bound that pruned it."""
    tensor_parallel: int = 1
    """Devices per tensor-parallel group."""
    virtual_stages: int = 1
    """Stages per pipeline rank."""
    data_parallel_mode: str = "ddp"
    """One of `DATA_PARALLEL_MODES`."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'selective', 'full', or 'mixed' (chosen per block)."""
    expert_parallel: int = 1
    """Expert-parallel group size (`Mesh.ep`)."""
    context_parallel: int = 1
    """Context-parallel group size (`Mesh.cp`)."""


QUIET_STRATEGIES = frozenset({"param", "follow", "replicate", "input"})
"""Strategies a per-block or per-stage count of tp splits leaves out (views that follow a split,
replicated ops, parameters and inputs)."""


@dataclass(frozen=True, kw_only=True)
class NodeSplit:
    """How one node runs on its tensor-parallel group (passes/tensor_parallel/assignment.py's
    NodePlacement, its placements written as text: 'R', 'S(0)', 'P')."""

    strategy: str
    """The op's strategy (passes/tensor_parallel/strategy.py), e.g. 'colwise', 'rowwise', 'param'."""
    output: str
    """Placement of the node's value on the group."""
    inputs: tuple[tuple[str, str], ...]
    """(input node, placement the strategy reads it in)."""
    grad_sync: tuple[str, ...] = ()
    """Parameters whose gradients are summed over the group (Megatron's f on a replicated weight)."""
    scaled_bias: str | None = None
    """A bias added once over the group's partial sums (divided by tp on each rank)."""


@dataclass(frozen=True, kw_only=True)
class PlannedCollective:
    """One collective the tensor-parallel splits need, priced with cost_models.comm."""

    kind: str
    """'all_reduce', 'all_gather', 'reduce_scatter', or 'grad_all_reduce' (Megatron's f, backward)."""
    value: str
    """Graph node whose value is communicated."""
    phase: str
    """'forward' or 'backward'."""
    num_bytes: int
    """Full (unsharded) size of the buffer."""
    seconds: float
    """α–β time of the collective on the tp group's link."""


@dataclass(frozen=True, kw_only=True)
class TensorParallelPlan:
    """The tensor-parallel axis of a plan: every node's split and the collectives they imply."""

    tp: int
    """Ranks of each tensor-parallel group."""
    nodes: dict[str, NodeSplit]
    """Node name -> split, for every tensor-valued node of the graph the plan's stages name; empty
    while a layer stack analysed once has not been traced whole (see `block_strategies`)."""
    predicted_seconds: float
    """The strategy ILP's objective: compute (divided where split) + collectives, forward and backward."""
    collectives: tuple[PlannedCollective, ...]
    param_bytes_per_device: int
    """Parameter bytes each rank of the group holds."""
    status: str = "OPTIMAL"
    """Solver status ('OPTIMAL', 'FEASIBLE', or 'GIVEN' for hand-made plans)."""
    solve_seconds: float = 0.0
    block_strategies: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per block, how many of its ops each strategy splits (the report's summary while `nodes` is empty)."""
    analysed_layers: str | None = None
    """'3 of 80' when a layer stack was analysed once and its splits restated for every layer."""
    sequence_parallel: bool = False
    """Whether the activations between split regions are sharded on the sequence dimension
    (Megatron-SP: reduce-scatter / all-gather instead of all-reduce; norms on 1/tp of the tokens)."""

    @classmethod
    def of(cls, assignment: Any) -> "TensorParallelPlan | None":
        """The plan's form of a `TPAssignment` (anything with its `to_dict()`); None for None."""
        return None if assignment is None else cls.from_dict(assignment.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorParallelPlan":
        nodes = {name: NodeSplit(strategy=x["strategy"], output=x["output"],
                                 inputs=tuple((n, p) for n, p in x["inputs"]),
                                 grad_sync=tuple(x.get("grad_sync", ())), scaled_bias=x.get("scaled_bias"))
                 for name, x in d.get("nodes", {}).items()}
        return cls(tp=d["tp"], nodes=nodes, predicted_seconds=d["predicted_seconds"],
                   collectives=tuple(PlannedCollective(**c) for c in d.get("collectives", ())),
                   param_bytes_per_device=d["param_bytes_per_device"], status=d.get("status", "OPTIMAL"),
                   solve_seconds=d.get("solve_seconds", 0.0), block_strategies=dict(d.get("block_strategies") or {}),
                   analysed_layers=d.get("analysed_layers"), sequence_parallel=d.get("sequence_parallel", False))

    def to_dict(self) -> dict[str, Any]:
        """The form `TPAssignment.from_dict` reads (and the Plan's JSON holds)."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A complete partition of one model for one cluster."""

    model_class: str
    batch_size: int
    """Samples per step (the example batch)."""
    num_microbatches: int
    """Microbatches per step of each pipeline (each data-parallel replica)."""
    schedule: str
    optimizer: str
    mesh: Mesh
    cluster: dict[str, Any]
    """Cluster.to_dict() of the devices planned for."""
    stages: tuple[StagePlan, ...]
    predicted_step_seconds: float
    bubble_fraction: float
    """Share of the step a device idles with equal stages: (R - 1) / (m + R - 1) for GPipe and 1F1B,
    (R - 1) / (m·v + R - 1) interleaved (`schedules.bubble_fraction`)."""
    idle_devices: tuple[int, ...]
    """Devices the plan leaves unused (faster with fewer stages)."""
    solver: SolverInfo
    candidates: tuple[Candidate, ...]
    tensor_parallel: TensorParallelPlan | None = None
    """Per-node splits on the tp axis; None when tp = 1."""
    virtual_stages: int = 1
    """Stages per pipeline rank: stage s runs on pipeline rank s % mesh.pp."""
    data_parallel_mode: str = "ddp"
    """How replicas hold and synchronise the state: one of `DATA_PARALLEL_MODES`."""
    mixed_precision: str | None = None
    """'bf16': float32 parameters, gradients and optimizer state, every stage's forward and the loss
    under torch.autocast(bfloat16); None: the model computes in its own dtypes."""
    data_parallel_sync_seconds: float = 0.0
    """Exposed data-parallel synchronisation per step, the slowest rank's (`axes.data.data_parallel_sync_seconds`):
    part of `predicted_step_seconds`."""
    optimizer_seconds: float = 0.0
    """The optimizer step after the last backward, the slowest rank's (`step_costs.optimizer_seconds`): part of
    `predicted_step_seconds`."""
    compile_kernels: bool = False
    """Each rank runs its stage's regions through TorchInductor (torch.compile), identical blocks
    compiled once (autopart/runtime/kernels.py), and the planner priced fused kernels; False: op by op."""
    experts: ExpertsPlan | None = None
    """The model's mixture-of-experts layers and how their experts are held (None: it has none)."""
    version: int = PLAN_VERSION

    @property
    def num_stages(self) -> int:
        """Model stages: mesh.pp × virtual_stages."""
        return len(self.stages)

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank `pp_rank` runs, first to last."""
        return list(range(pp_rank, self.num_stages, self.mesh.pp))

    @property
    def microbatch_size(self) -> int:
        """Samples per microbatch: the batch over dp / cp groups of replicas and m microbatches each
        (under context parallelism each of a group's cp replicas holds 1/cp of every sample's tokens)."""
        return self.batch_size // (self.mesh.batch_shards * self.num_microbatches)

    def stage_of_node(self) -> dict[str, int]:
        return {name: stage.index for stage in self.stages for name in stage.node_names}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(asdict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"Plan.from_json: not JSON ({error}); pass the text Plan.to_json() wrote") from error
        if not isinstance(data, dict):
            raise InputError(f"Plan.from_json: expected a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise InputError(
                f"Plan.from_json: schema version {version!r} is not supported (this autopart reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-plan with autopart.compile or upgrade autopart"
            )
        try:
            return _build(cls, _upgraded(data), "plan")
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"Plan.from_json: malformed plan: {error}") from error


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A plan's JSON object in the current schema. Version 1's candidates name their pipeline ranks
    "num_stages" (now "pipeline_parallel"); versions 1 and 2 name ZeRO-2 'fsdp' (now 'zero2', its
    state sharded over every replica: mesh.dp_shard = dp)."""
    if data["version"] == 1:
        rename = lambda c: {("pipeline_parallel" if k == "num_stages" else k): v for k, v in c.items()}  # noqa: E731
        data = {**data, "version": 2, "candidates": [rename(c) for c in data.get("candidates", [])]}
    if data["version"] == 2:
        data = {**data, "version": 3}
        if data.get("data_parallel_mode") == "fsdp":
            data["data_parallel_mode"] = "zero2"
            if isinstance(data.get("mesh"), dict):
                data["mesh"] = dict(data["mesh"], dp_shard=data["mesh"].get("dp", 1))
        data["candidates"] = [dict(c, data_parallel_mode=DATA_PARALLEL_MODE_ALIASES.get(
            c.get("data_parallel_mode", "ddp"), c.get("data_parallel_mode", "ddp")))
            for c in data.get("candidates", [])]
    if data["version"] == 3:  # the step's parts were not stored: they read as 0
        data = {**data, "version": PLAN_VERSION}
    return data


_NESTED = {"mesh": Mesh, "solver": SolverInfo, "memory": StageMemory, "experts": ExpertsPlan}
_LISTS = {"stages": StagePlan, "candidates": Candidate}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KeyError(f"{where} has unknown fields {unknown}")
    missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
    if missing:
        raise KeyError(f"{where} lacks fields {missing}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if cls is Plan and name == "tensor_parallel" and value is not None:
            value = TensorParallelPlan.from_dict(value)
        elif name in _NESTED and value is not None:
            value = _build(_NESTED[name], value, f"{where}.{name}")
        elif name in _LISTS:
            value = tuple(_build(_LISTS[name], item, f"{where}.{name}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
