"""Context parallelism: each sequence split over consecutive data-parallel replicas.

The axis's degree is `Mesh.cp` (the layout's `context_parallel`, `Setting.cp`). Like expert
parallelism it adds no ranks: cp divides the data-parallel replicas, each group of cp
consecutive replicas (of one pipeline rank and tp index) takes one share of the batch, and each
of them holds 1/cp of every sample's tokens. For causal attention the sequence is cut into
2·cp chunks and replica i of a group holds chunks i and 2·cp − 1 − i, so every rank attends
over the same number of (query, key) pairs (the load balance of Llama 3's context parallelism
and torchtitan's). Every op but attention is sequence-local; attention gathers the keys and
values of the whole sequence over the cp group (passes/context_parallel.py). The replicas keep
whole parameters, and their gradients are reduced over all dp replicas, cp ones included (the
loss of each rank is its share of the mean over all tokens).

Its price: a rank computes batch / dp samples' worth of tokens per step whatever cp is (1/cp of
the tokens of cp times as many samples; attention's (query, key) pairs likewise, balanced), so
the blocks' costs per microbatch are unchanged (`scale_of`). What cp adds lives in the blocks:
each attention op's all-gather of keys and values in the forward and the reduce-scatter of their
gradients in the backward (`context_exchange_seconds`, on each microbatch's critical path: the
local queries wait for the keys), and the gathered copy attention saves for its backward
(`gathered_kv_bytes`). What it saves shows in the microbatch: a sample's activations spread over
cp ranks, so a microbatch of one sample keeps 1/cp of them per rank, where without cp one whole
sample (at 131,072 tokens, gigabytes per layer) is the least a rank can hold.
"""

from __future__ import annotations

import numpy as np

from autopart.axes.base import Axis, GroupRanks, SearchShape, register
from autopart.core.blocks import Block, BlockGraph
from autopart.core.errors import InputError
from autopart.core.plan import Mesh, Plan
from autopart.core.request import PlanRequest
from autopart.core.setting import Setting
from autopart.cost_models import Cluster, all_gather_seconds, reduce_scatter_seconds

MIN_CHUNK_TOKENS = 2048
"""Shortest chunk (of the 2·cp a sequence is cut into) the planner tries on its own, so it offers
cp from 8,192 tokens a sequence on. Shorter chunks leave attention kernels little work per call,
and at 4,096 tokens cp = 2 multiplied DeepSeek-V3's planning time five times (10 s to 51 s) for
plans the cost model found a few percent faster (a microbatch of half a sample: a smaller
bubble). A degree the user fixes needs only equal chunks."""


def splits_sequence(degree: int, sequence_length: int | None, fixed: bool = False) -> bool:
    """Whether cp = `degree` may split a sequence of `sequence_length` tokens (None: not known yet,
    before the trace: any degree may): into 2·cp equal chunks, each of `MIN_CHUNK_TOKENS` or more
    unless the user fixed the degree."""
    if degree == 1 or sequence_length is None:
        return True
    return bool(sequence_length) and sequence_length % (2 * degree) == 0 and (
        fixed or sequence_length // (2 * degree) >= MIN_CHUNK_TOKENS)


def _takes_batch(request: PlanRequest, dp: int, cp: int) -> bool:
    """Whether dp / cp groups split the batch evenly, into the fixed microbatch count if any."""
    if dp % cp or request.batch_size % (dp // cp):
        return False
    m = request.num_microbatches
    return m is None or (m >= 1 and (request.batch_size // (dp // cp)) % m == 0)


def batch_shard_choices(request: PlanRequest, dp: int, sequence_length: int | None) -> list[int]:
    """The groups (dp / cp) that dp replicas may split the batch over, for each cp the search may try."""
    fixed = request.context_parallel
    degrees = [fixed] if fixed is not None else [c for c in range(1, dp + 1) if dp % c == 0]
    return [dp // c for c in degrees if _takes_batch(request, dp, c)
            and splits_sequence(c, sequence_length, fixed is not None)]


def batch_divides(request: PlanRequest, dp: int, sequence_length: int | None) -> bool:
    """Whether some context-parallel degree the search may try makes dp replicas take the batch
    (in dp / cp groups): what the data axis asks before it offers dp."""
    fixed = request.context_parallel
    degrees = [fixed] if fixed is not None else [c for c in range(1, dp + 1) if dp % c == 0]
    return any(_takes_batch(request, dp, c) and splits_sequence(c, sequence_length, fixed is not None)
               for c in degrees)


def context_parallel_choices(request: PlanRequest, dp: int, sequence_length: int) -> list[int]:
    """Degrees that divide the replicas, leave the batch divisible over dp / cp groups and cut the
    sequence into 2·cp equal chunks: the one the user fixed (checked), else every such degree whose
    chunks hold `MIN_CHUNK_TOKENS` or more, 1 first."""
    batch = request.batch_size
    fits = [c for c in range(1, dp + 1) if dp % c == 0 and batch % (dp // c) == 0
            and splits_sequence(c, sequence_length, fixed=True)]
    fixed = request.context_parallel
    if fixed is not None:
        if fixed not in fits:
            raise InputError(
                f"context_parallel={fixed} must divide the {dp} data-parallel replicas, leave the batch of {batch} "
                f"samples divisible over data_parallel / context_parallel groups, and cut the sequence of "
                f"{sequence_length} tokens into 2 × {fixed} equal chunks; choose one of {fits} "
                "(or fix data_parallel to a multiple of it)")
        return [fixed]
    return [c for c in fits if splits_sequence(c, sequence_length) and _takes_batch(request, dp, c)]


def cp_group(setting: Setting, num_ranks: int, rank: int) -> list[int]:
    """Devices (one per tp group) of the first cp group of pipeline rank `rank`: cp consecutive replicas."""
    return [d * num_ranks + rank for d in range(setting.cp)]


def context_exchange_seconds(graph: BlockGraph, cluster: Cluster, setting: Setting, num_ranks: int,
                             num_stages: int, scale: float, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """[num_blocks, num_stages] forward and backward seconds of each block's key/value exchange, one
    microbatch (`scale` of the traced batch per rank) on stage s's cp group; zeros at cp = 1.

    Forward: a ring all-gather of the keys and values to the whole sequence, n = cp ×
    `Block.attention_kv_bytes` × scale bytes gathered (cost_models.comm: (p − 1)α + (p − 1)/p ·
    n/β); backward: the reduce-scatter of their gradients, the same volume. Llama 3's all-gather
    context parallelism exposes it (the local queries wait for the keys), so it is priced on the
    block's critical path and the pipeline cut balances it like compute."""
    fwd = np.zeros((len(graph.blocks), num_stages))
    if setting.cp == 1:
        return fwd, fwd.copy()
    links = [cluster.link_for_group(cp_group(setting, num_ranks, s % num_ranks)) for s in range(num_stages)]
    bwd = fwd.copy()
    for b, block in enumerate(graph.blocks):
        if block.attention_kv_bytes:
            gathered = block.attention_kv_bytes * scale * setting.cp
            fwd[b] = [all_gather_seconds(gathered, setting.cp, link) for link in links]
            if training:
                bwd[b] = [reduce_scatter_seconds(gathered, setting.cp, link) for link in links]
    return fwd, bwd


def gathered_kv_bytes(block: Block, setting: Setting, recompute: str) -> float:
    """Bytes (traced batch, per rank) attention keeps beyond the local keys and values: the rest of
    the sequence's, gathered over the cp group, which its backward reads; none when the block is
    recomputed in full (only its input is kept, the gather replays in the backward)."""
    if setting.cp == 1 or recompute == "full" and block.recomputable:
        return 0.0
    return float(block.attention_kv_bytes * (setting.cp - 1))


def _degrees(request: PlanRequest, cluster: Cluster, shape: SearchShape) -> list[int]:
    return context_parallel_choices(request, shape.degrees.get("dp", 1), shape.sequence_length)


def _groups(mesh: Mesh) -> GroupRanks:
    """'cp': each cp consecutive replicas of each (stage, tp index): the key/value exchanges' group."""
    if mesh.cp == 1:
        return {}
    replicas = [[mesh.rank_of(d, stage, t) for d in range(mesh.dp)] for stage in range(mesh.pp)
                for t in range(mesh.tp)]
    return {"cp": [ranks[start:start + mesh.cp] for ranks in replicas for start in range(0, mesh.dp, mesh.cp)]}


def _describe(plan: Plan) -> str:
    """'cp=2 (each sequence over 2 replicas, the batch over 4 groups)'; nothing at cp = 1."""
    mesh = plan.mesh
    if mesh.cp == 1:
        return ""
    groups = f"{mesh.batch_shards} group{'s' * (mesh.batch_shards != 1)}"
    return f"cp={mesh.cp} (each sequence over {mesh.cp} replicas, the batch over {groups})"


CONTEXT = register(Axis(name="cp", title="context parallel", degrees=_degrees, groups=_groups,
                        describe=_describe))
