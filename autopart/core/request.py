"""What the user asked for: every choice of `autopart.compile`, as one frozen, typed record.

`autopart.compile` checks its keywords and builds one `PlanRequest`; the planner reads the
choices from it (None: the planner chooses) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopart.core.modes import DataParallelMode, MixedPrecision, RecomputeMode, Schedule


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What the user fixed (None: the planner chooses)."""

    batch_size: int
    """Samples in the example batch: one step."""
    pipeline_parallel: int | None = None
    """Pipeline ranks (each runs `virtual_stages` stages); None lets the planner choose."""
    num_microbatches: int | None = None
    """Microbatches per pipeline (per data-parallel replica)."""
    data_parallel: int | None = None
    """Replicas of the pipeline; None lets the planner choose."""
    tensor_parallel: int | None = None
    """Devices per tensor-parallel group; None lets the planner choose."""
    sequence_parallel: bool | None = None
    """Shard the activations between tp regions on the sequence dim (Megatron-SP): True for the
    residual stream of every layer, False never, None lets the strategy ILP choose per op."""
    tp_plan: tuple[tuple[str, str], ...] = ()
    """(module pattern, 'colwise' | 'rowwise' | 'vocab') pairs that fix layers' splits (`tp_plan_dict`)."""
    schedule: Schedule | None = None
    virtual_stages: int | None = None
    """Stages per pipeline rank (interleaved schedules); None lets the planner choose."""
    data_parallel_mode: DataParallelMode | None = None
    """One of plan.DATA_PARALLEL_MODES ('fsdp' reads as 'zero2'); None lets the planner choose."""
    expert_parallel: int | None = None
    """Replicas each mixture-of-experts layer's experts are split over (axes/expert.py); None lets the
    planner choose (1 for a model without experts)."""
    context_parallel: int | None = None
    """Replicas each sequence is split over (axes/context.py); None lets the planner choose (1 for a
    model without attention over a sequence)."""
    recompute: RecomputeMode | None = None
    """'none', 'selective' or 'full' for every block; None lets the planner choose per block."""
    optimizer: str = "adam"
    mixed_precision: MixedPrecision | None = None
    """'bf16' or None (passes/autocast_values.py): the graph's costs are already priced for it."""
    compile_kernels: bool = False
    """Price and run each rank's stage as TorchInductor's fused kernels (Plan.compile_kernels)."""
    training: bool = True
    """False plans inference: no backward, gradients or optimizer state."""
    max_microbatches: int = 512
    """Largest microbatch count tried when the planner chooses (Megatron-LM's published runs use
    up to 512 per pipeline: GPT-1T, batch 3072 over 6 replicas, microbatches of one)."""
    reuse_layers: bool = True
    """Analyse a stack of identical layers once (three of them), restating the costs per layer."""
    verbose: bool = False
    """Print the search's progress (best so far) on stderr."""

    @property
    def tp_plan_dict(self) -> dict[str, str] | None:
        """`tp_plan` as the mapping the user gave (None when empty)."""
        return dict(self.tp_plan) or None
