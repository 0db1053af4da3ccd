"""Lower bounds on a layout's step and on its memory, before any problem is built.

The layout search (autopart/search.py) bounds every layout, and every mesh
shape (tp, dp, pp) at once over all its layouts, from a few arrays per block
graph. Each bound is at most what the planner charges (tests/test_search.py
checks them against solved steps):

- compute: a step lasts at least factor × the slowest stage's slot, factor =
  m + R − 1 for GPipe and 1F1B, m·v + R − 1 (m ≥ R) or v·R − 1 + m for
  interleaved 1F1B (all exact, `schedules.step_factor`), m·v for zero bubble
  (each rank does all its m·v stage passes, the split dearer). The slot is at least the largest block,
  the average stage, and x layers of the model's repeated layer, where x is the
  fewest layers the fullest stage can hold when the L layers are spread over S
  stages, each stage taking at most as many as fit in its memory;
- memory: stage s keeps k_s microbatches in flight (the schedule's count), so
  one layer there needs at least the bytes the pipeline ILP charges it
  (`PipelineProblem.block_memory`) with its activations kept as the cheapest
  recompute policy allowed keeps them ('full' unless the user fixed one);
  stages hold floor(capacity / that) layers at most, and all L must fit. Blocks
  other than the layers, boundary buffers and what a stage reserves once
  (a recomputed block's rebuilt activations, ZeRO-3's gathered units) are left
  out, which only makes the bound weaker, never wrong;
- time: recomputation only adds backward time, so the bounds price none;
- data-parallel synchronisation: the slowest rank moves at least the average
  rank's bytes (`step_costs.sync_lower_bound`, for whole shapes at once here;
  0 under ZeRO-3, which may hide all but its first gather);
- optimizer step: the slowest rank streams at least 1/R of the trainable bytes
  (`step_costs.optimizer_seconds`), a 1/dp_shard shard under FSDP.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np

from autopart.planner.block_arrays import time_table
from autopart.cost_models import Cluster, Link, optimizer_step_bytes, p2p_seconds
from autopart.core.errors import PlanError
from autopart.core.blocks import BlockGraph
from autopart.core.modes import reshards_parameters
from autopart.axes.data import data_parallel_mode_choices
from autopart.axes.pipeline import MAX_VIRTUAL_STAGES, microbatch_choices
from autopart.core.request import PlanRequest
from autopart.planner.recompute_choice import block_recompute, least_keeping_recompute
from autopart.core.problems import _in_flight
from autopart.planner.step_costs import (
    activation_bytes,
    block_gradient_bytes,
    block_state_bytes,
    keeps_model_outputs,
    loss_backward_bytes,
    returned_output_bytes,
    unique_parameters,
)
from autopart.axes.data import unsharded_fraction
from autopart.core.setting import Setting


def factor_bound(schedule: str, num_ranks: int, num_microbatches: int, virtual_stages: int) -> float:
    """A lower bound on `schedules.step_factor` (exact for GPipe and 1F1B)."""
    m, v, r = num_microbatches, virtual_stages, num_ranks
    if schedule in ("gpipe", "1f1b"):
        return float(m + r - 1)
    if schedule == "interleaved_1f1b":
        return float(m * v + r - 1 if m >= r else v * r - 1 + m)  # exact (schedules.step_factor)
    return float(m * v)


class BoundModel:
    """Bounds for the layouts of one block graph (one tp size) on one cluster of tp groups."""

    def __init__(self, graph: BlockGraph, cluster: Cluster, request: PlanRequest, traced_batch_size: int) -> None:
        self.graph, self.cluster, self.request = graph, cluster, request
        self.least_memory_policy = least_keeping_recompute(request)
        """The recompute policy that keeps the least: the bounds' activations are kept as it keeps them."""
        names = list(dict.fromkeys(d.name for d in cluster.devices))
        tables = np.stack([time_table(graph, name) for name in names])  # [devices, 4, n]
        self._fwd = tables[:, 0:2]
        self._bwd = tables[:, 2:4] if request.training else None
        self._batch = request.batch_size / traced_batch_size
        self._nodes = np.asarray(cluster.node_of_device)
        self._trainable = sum(b.trainable_param_bytes for b in graph.blocks)
        self._params = sum(b.param_bytes for b in graph.blocks)
        self._unique_trainable = sum(size for _, size, train, _ in unique_parameters(graph.blocks) if train)
        self._capacity = np.array([d.memory_bytes for d in cluster.devices], dtype=np.float64)
        self._memory = np.cumsum(self._capacity)
        self._bandwidth = np.maximum.accumulate([d.achieved_bandwidth for d in cluster.devices])
        self._layers = _repeated_layer(graph)
        self._layer_set = set(self._layers.tolist())
        edges = set(graph.edges)
        self._chain = all((b, b + 1) in edges for b in range(len(graph.blocks) - 1))
        layer_blocks = [graph.blocks[b] for b in self._layers]
        self._layer_trainable = min((b.trainable_param_bytes for b in layer_blocks), default=0)
        self._layer_params = min((b.param_bytes for b in layer_blocks), default=0)
        self._cut_count, self._cut_bytes = _least_cut(graph) if self._chain else (None, 0.0)
        self.compute_bound = lru_cache(maxsize=None)(self._compute_bound)
        self.extra_bound = lru_cache(maxsize=None)(self._extra_bound)
        self.held_bytes = lru_cache(maxsize=None)(self._held_bytes)
        self._layer_bytes_cached = lru_cache(maxsize=None)(self._layer_bytes)
        self.in_flight = lru_cache(maxsize=None)(self._in_flight)
        self.end_block_bytes = lru_cache(maxsize=None)(self._end_block_bytes)
        self.fastest_hop = lru_cache(maxsize=None)(self._fastest_hop)
        # layers with the same signature hold the same bytes: one of each kind of layer is enough
        kinds = {(b.param_bytes, b.expert_param_bytes, b.trainable_param_bytes, b.buffer_bytes, b.saved_bytes, b.model_output_bytes,
                  b.model_output_float32_bytes, b.recomputable, b.kept_bytes("full", False),
                  b.kept_bytes("selective", False)): b for b in (graph.blocks[i] for i in self._layers)}
        self._layer_kinds = list(kinds.values())

    # ------------------------------------------------------------------ time

    def per_block(self, scale: float) -> np.ndarray:
        """[n] seconds of one microbatch of each block at its fastest device (forward + backward)."""
        fwd = self._fwd[:, 0] + scale * self._fwd[:, 1]
        if self._bwd is None:
            return fwd.min(axis=0)
        return (fwd + (self._bwd[:, 0] + scale * self._bwd[:, 1])).min(axis=0)

    def _compute_bound(self, dp: int, num_ranks: int, m: int, schedule: str, v: int, layers: int = 0) -> float:
        """factor × the slowest stage's slot (s): at least the largest block, the average stage with
        its boundaries, and `layers` repeated layers plus one boundary; `layers` defaults to the
        fewest the fullest of R·v stages holds, ceil(L / S)."""
        scale = self._batch / dp / m
        per = self.per_block(scale)
        stages = num_ranks * v
        cut = self._cut_seconds(num_ranks, v, scale) if stages > 1 else 0.0
        slot = max(float(per.max()), (float(per.sum()) + 2 * (stages - 1) * cut) / stages)
        if self._layers.size:
            count = layers or -(-self._layers.size // stages)
            slot = max(slot, count * float(per[self._layers].min()) + cut)
        return factor_bound(schedule, num_ranks, m, v) * slot

    def _cut_seconds(self, num_ranks: int, v: int, scale: float) -> float:
        """The least one side of any pipeline boundary spends on the values crossing it (forward and
        backward): the fewest crossing values' latency and bytes over the fastest link a boundary
        of this pipeline uses."""
        if not self._cut_count:  # None: not a chain; 0: a boundary nothing crosses
            return 0.0
        fastest = self.fastest_hop(num_ranks, v > 1)
        directions = 2.0 if self.request.training else 1.0
        return directions * self._cut_count * p2p_seconds(scale * self._cut_bytes / self._cut_count, fastest)

    def _fastest_hop(self, num_ranks: int, wraps: bool) -> Link:
        """A link with the least α and the most β of the links between consecutive pipeline ranks (and
        back to rank 0 when stages wrap around the ranks)."""
        hops = [self.cluster.link(r, (r + 1) % num_ranks) for r in range(num_ranks if wraps else num_ranks - 1)]
        return Link(latency_s=min(link.latency_s for link in hops), bandwidth=max(link.bandwidth for link in hops))

    def _extra_bound(self, setting: Setting, num_ranks: int, num_stages: int) -> float:
        """Data-parallel synchronisation and optimizer step, bounded below: the fullest rank holds at
        least the average rank's bytes and at least ceil(L / R) repeated layers."""
        request, dp, mode = self.request, setting.dp, setting.mode
        if not request.training:
            return 0.0
        per_rank = -(-self._layers.size // num_ranks)
        sync = 0.0
        if dp > 1 and not (mode == "ddp" and num_stages == 1) and not reshards_parameters(mode):
            grads = max(self._trainable / num_ranks, per_rank * self._layer_trainable)
            params = max(self._params / num_ranks, per_rank * self._layer_params)
            ids = np.arange(dp)[:, None] * num_ranks + np.arange(num_ranks)[None, :]
            spans = (self._nodes[ids] != self._nodes[ids[0]][None, :]).any(axis=0)
            links = [self.cluster.inter_node_link if s else self.cluster.intra_node_link for s in spans]
            fastest = max(link.bandwidth for link in links)
            # ZeRO-2: all-gather (of the gathered copies' size) + reduce-scatter; DDP: all-reduce
            moved = (params * unsharded_fraction(request, setting) + grads) if mode == "zero2" else 2 * grads
            # ring collectives (cost_models.comm): 2(p − 1) latencies, all-gather + reduce-scatter or all-reduce
            latency = 2 * (dp - 1) * min(link.latency_s for link in links) if moved > 0 else 0.0
            sync = (dp - 1) / dp * moved / fastest + latency
        trainable = max(self._unique_trainable / num_ranks, per_rank * self._layer_trainable)
        step = optimizer_step_bytes(int(trainable), request.optimizer) / setting.shards
        return sync + step / float(self._bandwidth[num_ranks - 1])

    def layout_bound(self, layout) -> tuple[float, float]:
        """(lower bound on the step, bytes by which memory surely falls short (≤ 0: it may fit))."""
        dp, ranks, v, m = layout.data_parallel, layout.num_ranks, layout.virtual_stages, layout.num_microbatches
        short = self.memory_shortfall_of(layout.setting, ranks)
        fewest = 0
        if short <= 0 and self._layers.size:
            short, fewest = self._layer_packing(layout)
        bound = (self.compute_bound(dp, ranks, m, layout.schedule, v, fewest)
                 + self.extra_bound(layout.setting, ranks, ranks * v))
        return bound, short

    def shape_bound(self, dp: int, num_ranks: int, schedules: list[str], ep: int = 1, cp: int = 1) -> float:
        """A bound for every layout of the shape (dp, pp ranks, ep, cp); inf when none can fit in memory."""
        modes = [setting for setting in (Setting(dp=dp, mode=mode, dp_shard=shard, ep=ep, cp=cp) for mode, shard in
                                         data_parallel_mode_choices(self.request, dp, self.cluster, num_ranks))
                 if self.memory_shortfall_of(setting, num_ranks) <= 0]
        families = []
        if any(s in ("gpipe", "1f1b") for s in schedules):
            families += [(s, 1) for s in schedules if s in ("gpipe", "1f1b")]
        if num_ranks >= 2:
            lowest = {"interleaved_1f1b": 2, "zero_bubble": 1}
            families += [(s, v) for s in schedules if s in lowest
                         for v in range(lowest[s], MAX_VIRTUAL_STAGES + 1)]
        ms = microbatch_choices(self.request, dp // cp)
        if not modes or not families or not self._may_fit(dp, num_ranks, max(ms), modes, families):
            return float("inf")
        compute = min(self.compute_bound(dp, num_ranks, m, s, v) for m in ms for s, v in families)
        return compute + min(self.extra_bound(setting, num_ranks, num_ranks) for setting in modes)

    # ------------------------------------------------------------------ memory

    def _kept(self, block) -> str:
        """The least-keeping policy allowed, as it applies to `block`."""
        return block_recompute(block, self.least_memory_policy)

    def _held_bytes(self, setting: Setting, keeps: bool, pipelined: bool) -> float:
        request = self.request
        scale = self._batch / setting.dp  # returned outputs: m microbatches of scale / m each
        return float(sum(block_state_bytes(b, request, setting) + block_gradient_bytes(b, request, setting, 1, pipelined)
                         + returned_output_bytes(b, request, 1, scale, keeps) for b in self.graph.blocks))

    def memory_shortfall_of(self, setting: Setting, num_ranks: int) -> float:
        """Bytes by which the blocks' state and gradients alone exceed the R devices' memory (≤ 0: may fit).
        One rank means one stage (virtual stages need two ranks)."""
        capacity = float(self._memory[num_ranks - 1])
        held = self.held_bytes(setting, keeps_model_outputs(num_ranks, setting.dp), num_ranks > 1)
        return held - capacity * (1 + 1e-9)

    def layer_bytes(self, setting: Setting, m: int, stages: int) -> tuple[float, float, float, float]:
        return self._layer_bytes_cached(setting, m, keeps_model_outputs(stages, setting.dp), stages > 1)

    def _layer_bytes(self, setting: Setting, m: int, keeps: bool, pipelined: bool
                     ) -> tuple[float, float, float, float]:
        """(state, gradients, activations, transient) bytes of one repeated layer per microbatch of
        `m`, each the least over the layers (`planner.build_problem`'s terms)."""
        request, scale = self.request, self._batch / setting.dp / m
        blocks = self._layer_kinds
        state = min(block_state_bytes(b, request, setting) + returned_output_bytes(b, request, m, scale, keeps)
                    for b in blocks)
        grads = min(block_gradient_bytes(b, request, setting, m, pipelined) for b in blocks)
        act = min(activation_bytes(b, request, setting, self._kept(b)) * scale for b in blocks)
        transient = min(loss_backward_bytes(b) * scale if request.training else 0.0 for b in blocks)
        return state, grads, act, transient

    def _in_flight(self, schedule: str, num_ranks: int, m: int, v: int) -> np.ndarray | None:
        try:
            counts = _in_flight(schedule, num_ranks, m, v, self.request.training)
        except PlanError:  # m not in whole rounds: no such layout
            return None
        return np.array([counts[s] for s in range(num_ranks * v)], dtype=np.float64)

    def _stage_layers(self, setting: Setting, num_ranks: int, m: int, schedule: str, v: int,
                      relaxed: bool = False) -> np.ndarray | None:
        """[S] most repeated layers each stage can hold (memory / one layer's bytes there)."""
        k = self.in_flight(schedule, num_ranks, m, v)
        if k is None:
            return None
        state, grads, act, transient = self.layer_bytes(setting, m, num_ranks * v)
        if relaxed:  # parts of the charge that never grow with m (for a bound over all m at once);
            # gradients do under ZeRO-3 (accumulated unreduced): the fewest, at m = 1
            grads = min(grads, self.layer_bytes(setting, 1, num_ranks * v)[1])
            need = np.maximum(state + k * act, state + grads)
        else:  # exactly PipelineProblem.block_memory
            steady = (m > k).astype(np.float64)
            need = np.maximum(state + steady * grads + k * act + transient, state + grads + np.maximum(k - 1, 0) * act)
        capacity = self._capacity[np.arange(num_ranks * v) % num_ranks] / v
        if not relaxed and self._chain:  # a chain's first and last blocks sit on the first and last stage
            capacity = capacity - self._end_blocks(setting, m, k, num_ranks * v)
        fits = np.full(need.shape, np.inf)
        charged = need > 0
        fits[charged] = np.floor(capacity[charged] / need[charged] * (1 + 1e-12))
        return np.where(capacity < 0, -1.0, fits)

    def _end_blocks(self, setting: Setting, m: int, k: np.ndarray, stages: int) -> np.ndarray:
        """[S] bytes the chain's first block takes from stage 0 and its last from stage S − 1 (the
        pipeline ILP's charge), where they are not repeated layers (those are counted as layers)."""
        taken = np.zeros(k.size)
        for first, (state, grads, act, transient) in self.end_block_bytes(setting, m, stages):
            stage = 0 if first else k.size - 1
            kb = k[stage]
            steady = 1.0 if m > kb else 0.0
            taken[stage] += max(state + steady * grads + kb * act + transient,
                                state + grads + max(kb - 1, 0) * act)
        return taken

    def _end_block_bytes(self, setting: Setting, m: int, stages: int) -> list[tuple[bool, tuple]]:
        """(first?, (state, gradients, activations, transient) bytes) of the chain's end blocks that
        are not repeated layers, per microbatch of `m` (cached: the same for every schedule)."""
        request, scale = self.request, self._batch / setting.dp / m
        ends = []
        for b in dict.fromkeys((0, len(self.graph.blocks) - 1)):  # one block: both ends, counted once
            first = b == 0
            if b in self._layer_set:
                continue
            block = self.graph.blocks[b]
            state = block_state_bytes(block, request, setting) + returned_output_bytes(
                block, request, m, scale, keeps_model_outputs(stages, setting.dp))
            grads = block_gradient_bytes(block, request, setting, m, stages > 1)
            act = activation_bytes(block, request, setting, self._kept(block)) * scale
            transient = loss_backward_bytes(block) * scale if request.training else 0.0
            ends.append((first, (state, grads, act, transient)))
        return ends

    def _layer_packing(self, layout) -> tuple[float, int]:
        """(shortfall, fewest layers on the fullest stage): the L repeated layers over the stages."""
        fits = self._stage_layers(layout.setting, layout.num_ranks, layout.num_microbatches, layout.schedule,
                                  layout.virtual_stages)
        total = self._layers.size
        if fits is None:
            return 0.0, 0
        room = float(np.minimum(np.maximum(fits, 0), total).sum())
        if room < total or fits.min() < 0:  # fits < 0: the end blocks alone overflow their stage
            state, grads, act, transient = self.layer_bytes(layout.setting, layout.num_microbatches,
                                                            layout.num_ranks * layout.virtual_stages)
            return max(total - room, 1) * (state + grads + act), 0
        low, high = -(-total // fits.size), total  # fewest x with Σ min(fits, x) ≥ L
        while low < high:
            mid = (low + high) // 2
            if np.minimum(fits, mid).sum() >= total:
                high = mid
            else:
                low = mid + 1
        return 0.0, int(low)

    def _may_fit(self, dp: int, num_ranks: int, m: int, modes: list[Setting], families) -> bool:
        """Some layout of the shape may hold the repeated layers. Every layer's charge is at least
        max(state + k·activations, state + gradients), which k_s / m never lets grow with m
        (tests/test_search.py checks k_s / m on the played schedules), so the largest m decides."""
        if not self._layers.size:
            return True
        for setting in modes:
            for schedule, v in families:
                fits = self._stage_layers(setting, num_ranks, m, schedule, v, relaxed=True)
                if fits is None or np.minimum(fits, self._layers.size).sum() >= self._layers.size:
                    return True
        return False


def _repeated_layer(graph: BlockGraph) -> np.ndarray:
    """Indices of the most repeated block signature (the model's layer), if it repeats."""
    counts = Counter(b.signature for b in graph.blocks)
    if not counts:
        return np.zeros(0, dtype=np.int64)
    signature, count = counts.most_common(1)[0]
    if count < 2:
        return np.zeros(0, dtype=np.int64)
    return np.array([i for i, b in enumerate(graph.blocks) if b.signature == signature], dtype=np.int64)


def _least_cut(graph: BlockGraph) -> tuple[int | None, float]:
    """(fewest values, fewest bytes at the traced batch) crossing any cut between two blocks of a
    chain; (None, 0) for a single block."""
    n = len(graph.blocks)
    if n < 2 or not graph.values:
        return None, 0.0
    cuts = np.arange(1, n)[:, None]
    producer = np.array([v.producer for v in graph.values])[None, :]
    last = np.array([max(v.consumers) for v in graph.values])[None, :]
    crossing = (producer < cuts) & (cuts <= last)
    sizes = np.array([v.num_bytes for v in graph.values], dtype=np.float64)
    return int(crossing.sum(axis=1).min()), float((crossing * sizes).sum(axis=1).min())
