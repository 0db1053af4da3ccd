"""The Plan: everything codegen and the runtimes need, and nothing else.

Frozen dataclasses with a versioned JSON form (never pickle). Schema, version 3
(all times in seconds, sizes in bytes, "per microbatch" where stated):

```
{"version": 3, "model_class": str, "batch_size": int, "num_microbatches": int,
 "schedule": "gpipe" | "1f1b" | "interleaved_1f1b" | "zero_bubble", "optimizer": str,
 "mesh": {"pp": int, "tp": int, "dp": int, "dp_shard": int (default 1)}, "virtual_stages": int (default 1),
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
 "predicted_step_seconds": float, "bubble_fraction": float,
 "idle_devices": [int],
 "solver": {"backend", "status", "objective_seconds", "bound_seconds", "solve_seconds",
            "plan_seconds", "num_problems", "num_pruned", "num_shapes_pruned"},
 "candidates": [{"data_parallel", "pipeline_parallel", "num_microbatches", "schedule", "step_seconds" | null,
                 "status", "detail", "tensor_parallel", "virtual_stages", "data_parallel_mode",
                 "recompute"}],
 "tensor_parallel": null | {"tp": int, "nodes": {node: {"strategy", "output", "inputs",
                            "grad_sync", "scaled_bias"}}, "predicted_seconds", "collectives": [...],
                            "param_bytes_per_device", "status", "solve_seconds"}}
```

Older plans still load (`Plan.from_json` upgrades them as it reads them):
version 1 named a candidate's pipeline ranks "num_stages" (now
"pipeline_parallel"); versions 1 and 2 called ZeRO-2 'fsdp' (optimizer state
and master weights sharded, parameters kept whole through the step: now
'zero2') and recompute nothing. "Stages" are model stages throughout:
`Plan.num_stages` = mesh.pp × virtual_stages.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch

from autopart.errors import InputError

PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
"""Schema versions `Plan.from_json` reads (older ones are upgraded on load)."""

DATA_PARALLEL_MODES = ("ddp", "zero2", "zero3", "hsdp")
"""How data-parallel replicas hold and synchronise the training state:
'ddp': each replica holds all of it, gradients are all-reduced (DDP; FSDP2's replicate in a pipeline);
'zero2': optimizer state, master weights and reduced gradients sharded over the replicas, parameters
gathered once per step and kept until the step's last backward (FSDP2 reshard_after_forward=False);
'zero3': everything sharded, each block's parameters gathered for its forward and again for its
backward, then freed (FSDP2 reshard_after_forward=True, one FSDP unit per block);
'hsdp': 'zero3' within each host, replicated across hosts (FSDP2 on a 2-D mesh)."""

DATA_PARALLEL_MODE_ALIASES = {"fsdp": "zero2"}
"""Older names: 'fsdp' was ZeRO-2 before 'zero3' existed."""


def data_parallel_mode_name(mode: str | None) -> str | None:
    """The current name of a data-parallel mode (aliases resolved), or a ValueError naming the choices."""
    if mode is None:
        return None
    mode = DATA_PARALLEL_MODE_ALIASES.get(mode, mode)
    if mode not in DATA_PARALLEL_MODES:
        raise ValueError(f"data_parallel_mode={mode!r} is not known; use one of {DATA_PARALLEL_MODES} or None")
    return mode


def shards_state(mode: str) -> bool:
    """Whether replicas in `mode` shard the optimizer state (FSDP2 in any form)."""
    return mode in ("zero2", "zero3", "hsdp")


def reshards_parameters(mode: str) -> bool:
    """Whether `mode` frees each block's gathered parameters after its forward (ZeRO-3, HSDP)."""
    return mode in ("zero3", "hsdp")

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
        modes = self.recompute or ("none",)
        if len(set(modes)) == 1:
            return modes[0]
        return ", ".join(f"{modes.count(m)} {m}" for m in ("full", "selective", "none") if m in modes)


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
    tensor_parallel: dict[str, Any] | None = None
    """Per-node placements on the tp axis (TPAssignment.to_dict()); None when tp = 1."""
    virtual_stages: int = 1
    """Stages per pipeline rank: stage s runs on pipeline rank s % mesh.pp."""
    data_parallel_mode: str = "ddp"
    """How replicas hold and synchronise the state: one of `DATA_PARALLEL_MODES`."""
    mixed_precision: str | None = None
    """'bf16': float32 parameters, gradients and optimizer state, every stage's forward and the loss
    under torch.autocast(bfloat16); None: the model computes in its own dtypes."""
    compile_kernels: bool = False
    """Each rank runs its stage's regions through TorchInductor (torch.compile), identical blocks
    compiled once (autopart/runtime/kernels.py), and the planner priced fused kernels; False: op by op."""
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
        """Samples per microbatch: the batch over dp replicas and m microbatches each."""
        return self.batch_size // (self.mesh.dp * self.num_microbatches)

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
        data = {**data, "version": PLAN_VERSION}
        if data.get("data_parallel_mode") == "fsdp":
            data["data_parallel_mode"] = "zero2"
            if isinstance(data.get("mesh"), dict):
                data["mesh"] = dict(data["mesh"], dp_shard=data["mesh"].get("dp", 1))
        data["candidates"] = [dict(c, data_parallel_mode=DATA_PARALLEL_MODE_ALIASES.get(
            c.get("data_parallel_mode", "ddp"), c.get("data_parallel_mode", "ddp")))
            for c in data.get("candidates", [])]
    return data


_NESTED = {"mesh": Mesh, "solver": SolverInfo, "memory": StageMemory}
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
        if name in _NESTED:
            value = _build(_NESTED[name], value, f"{where}.{name}")
        elif name in _LISTS:
            value = tuple(_build(_LISTS[name], item, f"{where}.{name}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
