"""A compiled plan is never priced slower than the same plan eager.

Fused kernels (passes/fusion.py) move less memory than the ops they replace, so a block priced as
compiled kernels costs at most its op-by-op time, on one device and under every tensor-parallel
split; a region that stays eager in a compiled plan ('selective' recomputation) is priced op by op;
and the splits op-by-op prices choose, which may keep less activation memory, are offered to a
compiled plan too (planner/mesh_search.py), so a layout that fits eager fits compiled.
Models on the meta device, planned for H100s: no weights, no run.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import autopart
from autopart import zoo
from autopart.core.setting import Setting
from autopart.cost_models import Cluster, get_preset
from autopart.frontend.analysis import analyse
from autopart.planner.mesh_search import tensor_parallel_blocks
from autopart.planner.pricing import build_problem
from autopart.planner.recompute_choice import uniform_recompute
from autopart.core.request import PlanRequest

H100 = get_preset("H100")
CLUSTER = Cluster.homogeneous(4)


def _model(family: str, **shape):
    with torch.device("meta"):
        return getattr(zoo, family)(**{**dict(layers=2, d_model=256, seq=128, batch=4, vocab=512), **shape})


@functools.cache
def _analysis(family: str, fused: bool):
    entry = _model(family)
    return analyse(entry.model, entry.args, entry.kwargs or {}, CLUSTER, torch.bfloat16, fused=fused,
                   reuse_layers=False)


def _blocks(family: str, fused: bool, tp: int, *, eager_splits: bool = False, training: bool = True):
    analysis, cluster = _analysis(family, fused), CLUSTER
    if tp == 1:
        return analysis.blocks
    blocks, _ = tensor_parallel_blocks(analysis.gm, analysis.blocks, cluster, tp, training=training, fixed=None,
                                       eager_splits=eager_splits)
    return blocks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_blocks_cost_at_most_their_eager_time_at_every_tp(family):
    for tp in (1, 2, 4):
        eager = _blocks(family, False, tp)
        same_splits = _blocks(family, True, tp, eager_splits=True)
        own_splits = _blocks(family, True, tp)
        for e, c in zip(eager.blocks, same_splits.blocks, strict=True):
            et, ct = e.time_on(H100.name), c.time_on(H100.name)
            where = f"{family} tp={tp} block {e.name}"
            assert ct.fwd(1.0) <= et.fwd(1.0) * (1 + 1e-9), where
            assert ct.bwd(1.0) <= et.bwd(1.0) * (1 + 1e-9), where
            assert ct.fwd(8.0) <= et.fwd(8.0) * (1 + 1e-9), where  # launches do not scale, the rest does
            assert c.saved_bytes == e.saved_bytes, where  # the same splits keep the same activations
            # a selective region runs op by op compiled or not: its replay and its run are eager's
            assert c.recompute_time_on(H100.name, "selective").fwd(1.0) == pytest.approx(
                e.recompute_time_on(H100.name, "selective").fwd(1.0)), where
            assert c.run_time_on(H100.name, "selective").bwd(1.0) == pytest.approx(et.bwd(1.0)), where

        def total(graph):
            return sum(b.time_on(H100.name).fwd(1.0) + b.time_on(H100.name).bwd(1.0) for b in graph.blocks)

        # the splits compiled prices choose are at least as fast, priced compiled, as eager's
        assert total(own_splits) <= total(same_splits) * (1 + 1e-6)


def test_a_fused_group_shares_its_time_among_its_members_by_their_traffic():
    fused = _analysis("llama", True).gm
    from autopart.passes.fusion import fusion_groups
    from autopart.passes.node_costs import node_cost

    shared = 0
    for group in fusion_groups(fused):
        moving = [n for n in group if node_cost(n).fwd_bytes > 0]
        if len(moving) < 2:
            continue
        per_byte = [node_cost(n).fwd_seconds(H100.name) / node_cost(n).fwd_bytes for n in moving]
        assert max(per_byte) == pytest.approx(min(per_byte))  # each member carries its share, none all of it
        launches = [dict((d, f) for d, f, _ in node_cost(n).launch_seconds)[H100.name] for n in moving]
        assert sum(launches) >= H100.fused_launch_seconds * (1 - 1e-9)  # at least one kernel per group
        shared += 1
    assert shared >= 2


def test_selective_regions_of_a_compiled_plan_are_priced_op_by_op():
    request = PlanRequest(batch_size=4, mixed_precision="bf16", compile_kernels=True)
    problems = {}
    for fused in (False, True):
        graph = _blocks("llama", fused, 1)
        setting = Setting(recompute=uniform_recompute(graph, "selective"))
        problems[fused] = (graph, build_problem(graph, CLUSTER, request, 1, 1, "1f1b", setting, traced_batch_size=4))
    graph, compiled = problems[True]
    _, eager = problems[False]
    selective = [b for b, block in enumerate(graph.blocks) if Setting(
        recompute=uniform_recompute(graph, "selective")).recompute_of(b) == "selective"]
    assert len(selective) >= 2
    for b in selective:
        assert compiled.fwd_seconds[b, 0] == pytest.approx(eager.fwd_seconds[b, 0])
        assert compiled.bwd_seconds[b, 0] == pytest.approx(eager.bwd_seconds[b, 0])


def test_a_layout_that_fits_eager_fits_compiled_and_is_no_slower():
    # Under tp = 4 the splits compiled prices choose for GPT-2 keep about twice the activations of
    # the op-by-op ones (a replicated fused chain keeps its inputs whole): at 300 MiB a device the
    # eager plan fits with recomputation, and the compiled one must too.
    entry = _model("gpt2", layers=4, d_model=512, seq=256, batch=16, vocab=1024)
    cluster = Cluster.homogeneous(4, dataclasses.replace(H100, memory_bytes=300 * 2**20))
    for layout in (dict(tensor_parallel=4, pipeline_parallel=1, data_parallel=1, num_microbatches=1), {}):
        steps = {}
        for compiled in (False, True):
            plan = autopart.compile(entry.model, cluster, example_inputs=entry.args, mixed_precision="bf16",
                                    optimizer="adamw", compile_kernels=compiled, **layout).plan
            steps[compiled] = plan.predicted_step_seconds
        assert steps[True] <= steps[False], (layout, steps)


def test_inference_blocks_under_tensor_parallelism_keep_their_forward_time():
    # restating a block under tp divides its new time by its old one: an inference plan prices the
    # forward alone, so the old time must be the forward alone too, not forward + backward
    unsplit = _blocks("llama", False, 1)
    inference = _blocks("llama", False, 2, training=False)
    layer = next(i for i, b in enumerate(unsplit.blocks) if ".layers." in b.name)
    one = unsplit.blocks[layer].time_on(H100.name).fwd(1.0)
    two = inference.blocks[layer].time_on(H100.name).fwd(1.0)
    assert 0.5 * one < two < 1.5 * one  # about half the compute plus the collectives, not a third of it
