"""The search's decision record: one point of the layout space (`Layout`), and what a layout chose
besides its mesh and pipeline cuts (`Setting`: how replicas hold the state, how blocks recompute)."""

from __future__ import annotations

from dataclasses import dataclass

from autopart.core.modes import DataParallelMode, RecomputeMode, Schedule, recompute_label, shards_state
from autopart.core.plan import Candidate


@dataclass(frozen=True, kw_only=True)
class Setting:
    """How the replicas hold the state and how each block keeps its activations."""

    dp: int = 1
    """Data-parallel replicas."""
    mode: DataParallelMode = "ddp"
    """One of plan.DATA_PARALLEL_MODES ('ddp' whenever dp = 1)."""
    dp_shard: int = 1
    """Replicas among which FSDP shards the state (Mesh.dp_shard)."""
    ep: int = 1
    """Replicas among which each mixture-of-experts layer's experts are split (Mesh.ep)."""
    cp: int = 1
    """Replicas among which each sequence is split (Mesh.cp)."""
    recompute: tuple[RecomputeMode, ...] = ()
    """Per block of the graph: 'none', 'selective' or 'full'; () = all 'none'."""

    def recompute_of(self, b: int) -> str:
        return self.recompute[b] if self.recompute else "none"

    @property
    def shards(self) -> int:
        """How many ways the optimizer state and master weights are split (1 without FSDP)."""
        return self.dp_shard if shards_state(self.mode) and self.dp > 1 else 1

    @property
    def recompute_label(self) -> str:
        """'none', 'selective', 'full', or 'mixed' when blocks differ."""
        return recompute_label(self.recompute)


@dataclass(frozen=True, order=True)
class Layout:
    """One point of the search space (ranks: pipeline ranks; stages = ranks × virtual stages)."""

    tensor_parallel: int
    data_parallel: int
    num_ranks: int
    num_microbatches: int
    schedule: Schedule
    virtual_stages: int
    data_parallel_mode: DataParallelMode
    dp_shard: int = 1
    """Replicas FSDP shards the state over (`Mesh.dp_shard`)."""
    expert_parallel: int = 1
    """Replicas the experts are split over (`Mesh.ep`)."""
    context_parallel: int = 1
    """Replicas each sequence is split over (`Mesh.cp`)."""

    @property
    def setting(self) -> Setting:
        return Setting(dp=self.data_parallel, mode=self.data_parallel_mode, dp_shard=self.dp_shard,
                       ep=self.expert_parallel, cp=self.context_parallel)

    def tried(self) -> dict:
        """The layout as Candidate fields."""
        return dict(data_parallel=self.data_parallel, pipeline_parallel=self.num_ranks,
                    num_microbatches=self.num_microbatches, schedule=self.schedule,
                    tensor_parallel=self.tensor_parallel, virtual_stages=self.virtual_stages,
                    data_parallel_mode=self.data_parallel_mode, expert_parallel=self.expert_parallel,
                    context_parallel=self.context_parallel)

    def candidate(self, **fields) -> Candidate:
        return Candidate(**self.tried(), **fields)

    def describe(self) -> str:
        mode = f" ({self.data_parallel_mode})" if self.data_parallel > 1 else ""
        v = f"×v{self.virtual_stages}" if self.virtual_stages > 1 else ""
        ep = f" ep={self.expert_parallel}" if self.expert_parallel > 1 else ""
        ep += f" cp={self.context_parallel}" if self.context_parallel > 1 else ""
        return (f"dp={self.data_parallel}{mode}{ep} pp={self.num_ranks}{v} tp={self.tensor_parallel} "
                f"m={self.num_microbatches} {self.schedule}")
