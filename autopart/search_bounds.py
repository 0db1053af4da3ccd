"""Lower bounds on a layout's step and on its memory, before any problem is built.

The layout search (autopart/search.py) bounds every layout, and every mesh
shape (tp, dp, pp) at once over all its layouts, from a few arrays per block
graph. Each bound is at most what the planner would charge (tests check them
against the solved steps):

- compute: a step lasts at least factor × max(largest block, total work / S)
  slots, blocks at their fastest device, factor = m + R − 1 for GPipe and 1F1B
  (exact), m·v + R − 1 for interleaved 1F1B (exact once m ≥ R, less before), m·v
  for zero bubble (each rank does all its m·v stage passes, the split dearer);
- data-parallel synchronisation: the slowest rank moves at least the average
  rank's bytes (`planner.sync_lower_bound`, computed for whole shapes here);
- optimizer step: the slowest rank streams at least 1/R of the trainable bytes
  (`planner.optimizer_seconds`);
- memory: every stage's peak is at least the state and gradients of its blocks,
  so all of them must fit in the R devices' memory together.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from autopart.block_arrays import time_table
from autopart.cost_models import Cluster, optimizer_step_bytes
from autopart.passes.blocks import BlockGraph
from autopart.planner import (
    MAX_VIRTUAL_STAGES,
    PlanRequest,
    _unique_parameters,
    block_gradient_bytes,
    block_state_bytes,
    data_parallel_mode_choices,
    microbatch_choices,
    returned_output_bytes,
)


def factor_bound(schedule: str, num_ranks: int, num_microbatches: int, virtual_stages: int) -> float:
    """A lower bound on `schedules.step_factor` (exact for GPipe and 1F1B)."""
    m, v, r = num_microbatches, virtual_stages, num_ranks
    if schedule in ("gpipe", "1f1b"):
        return float(m + r - 1)
    if schedule == "interleaved_1f1b":
        return float(m * v + r - 1)
    return float(m * v)


class BoundModel:
    """Bounds for the layouts of one block graph (one tp size) on one cluster of tp groups."""

    def __init__(self, graph: BlockGraph, cluster: Cluster, request: PlanRequest) -> None:
        self.graph, self.cluster, self.request = graph, cluster, request
        names = list(dict.fromkeys(d.name for d in cluster.devices))
        tables = np.stack([time_table(graph, name) for name in names])  # [devices, 4, n]
        self._fwd = tables[:, 0:2]
        self._bwd = tables[:, 2:4] if request.training else None
        self._batch = request.batch_size / request.traced_batch_size
        self._nodes = np.asarray(cluster.node_of_device)
        self._trainable = sum(b.trainable_param_bytes for b in graph.blocks)
        self._params = sum(b.param_bytes for b in graph.blocks)
        self._unique_trainable = sum(size for _, size, train, _ in _unique_parameters(graph.blocks) if train)
        self._memory = np.cumsum([d.memory_bytes for d in cluster.devices])
        self._bandwidth = np.maximum.accumulate([d.achieved_bandwidth for d in cluster.devices])
        self.compute_bound = lru_cache(maxsize=None)(self._compute_bound)
        self.extra_bound = lru_cache(maxsize=None)(self._extra_bound)
        self.held_bytes = lru_cache(maxsize=None)(self._held_bytes)

    # ------------------------------------------------------------------ time

    def per_block(self, scale: float) -> np.ndarray:
        """[n] seconds of one microbatch of each block at its fastest device (forward + backward)."""
        fwd = self._fwd[:, 0] + scale * self._fwd[:, 1]
        if self._bwd is None:
            return fwd.min(axis=0)
        return (fwd + (self._bwd[:, 0] + scale * self._bwd[:, 1])).min(axis=0)

    def _compute_bound(self, dp: int, num_ranks: int, m: int, schedule: str, v: int) -> float:
        per = self.per_block(self._batch / dp / m)
        slot = max(float(per.max()), float(per.sum()) / (num_ranks * v))
        return factor_bound(schedule, num_ranks, m, v) * slot

    def _extra_bound(self, dp: int, num_ranks: int, num_stages: int, mode: str) -> float:
        """Data-parallel synchronisation and optimizer step, bounded below."""
        request = self.request
        if not request.training:
            return 0.0
        sync = 0.0
        if dp > 1 and not (mode == "ddp" and num_stages == 1):
            grads, params = self._trainable / num_ranks, self._params / num_ranks
            ids = np.arange(dp)[:, None] * num_ranks + np.arange(num_ranks)[None, :]
            spans = (self._nodes[ids] != self._nodes[ids[0]][None, :]).any(axis=0)
            links = [self.cluster.inter_node_link if s else self.cluster.intra_node_link for s in spans]
            fastest = max(link.bandwidth for link in links)
            moved = (params + grads) if mode == "fsdp" else 2 * grads
            sync = (dp - 1) / dp * moved / fastest
        shards = dp if mode == "fsdp" else 1
        step = optimizer_step_bytes(int(self._unique_trainable / num_ranks), request.optimizer) / shards
        return sync + step / float(self._bandwidth[num_ranks - 1])

    def layout_bound(self, layout) -> float:
        ranks, v = layout.num_ranks, layout.virtual_stages
        return (self.compute_bound(layout.data_parallel, ranks, layout.num_microbatches, layout.schedule, v)
                + self.extra_bound(layout.data_parallel, ranks, ranks * v, layout.data_parallel_mode))

    def shape_bound(self, dp: int, num_ranks: int, schedules: list[str]) -> float:
        """A bound for every layout of the shape (dp, pp ranks); inf when no dp mode fits in memory."""
        modes = [mode for mode in data_parallel_mode_choices(self.request, dp)
                 if self.memory_shortfall_of(dp, num_ranks, mode) <= 0]
        if not modes:
            return float("inf")
        families = []
        if any(s in ("gpipe", "1f1b") for s in schedules):
            families.append(("1f1b", 1))
        if num_ranks >= 2:
            lowest = {"interleaved_1f1b": 2, "zero_bubble": 1}
            families += [(s, v) for s in schedules if s in lowest
                         for v in range(lowest[s], MAX_VIRTUAL_STAGES + 1)]
        compute = min(self.compute_bound(dp, num_ranks, m, s, v)
                      for m in microbatch_choices(self.request, dp) for s, v in families) if families else 0.0
        return compute + min(self.extra_bound(dp, num_ranks, num_ranks, mode) for mode in modes)

    # ------------------------------------------------------------------ memory

    def _held_bytes(self, dp: int, mode: str) -> float:
        request = self.request
        scale = self._batch / dp  # returned outputs: m microbatches of scale / m each
        return float(sum(block_state_bytes(b, request, dp, mode) + block_gradient_bytes(b, request, dp, mode)
                         + returned_output_bytes(b, request, 1, scale) for b in self.graph.blocks))

    def memory_shortfall_of(self, dp: int, num_ranks: int, mode: str) -> float:
        """Bytes by which the blocks' state and gradients alone exceed the R devices' memory (≤ 0: may fit)."""
        capacity = float(self._memory[num_ranks - 1])
        return self.held_bytes(dp, mode) - capacity * (1 + 1e-9)

    def memory_shortfall(self, layout) -> float:
        return self.memory_shortfall_of(layout.data_parallel, layout.num_ranks, layout.data_parallel_mode)
