"""The layout search: its bounds never exceed what a layout costs, and pruning never changes the answer.

Every layout of small search spaces is solved one by one (the exhaustive oracle: the old
planner's nested loops) and compared with the best-first search, with mesh shapes pruned
whole as on large clusters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import autopart
from autopart import zoo
from autopart.planner import search as search_module
from autopart.frontend.analysis import analyse
from autopart.cost_models import Cluster
from autopart.core.errors import PlanError
from autopart.planner.mesh_search import tensor_parallel_blocks
from autopart.axes.tensor import group_cluster, tensor_parallel_choices
from autopart.planner.choices import smallest_microbatch
from autopart.axes.data import data_parallel_choices
from autopart.axes.pipeline import pipeline_choices, schedule_choices
from autopart.core.request import PlanRequest
from autopart.planner.pricing import PricingBasis, price_candidate
from autopart.core.schedules import interleaved_in_flight, microbatches_per_round
from autopart.planner.search import TPOption, _layouts_of_shape, _Shape, search
from autopart.planner.bounds import BoundModel


class Residual(nn.Module):
    def __init__(self, num_layers: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                                    for _ in range(num_layers))
        self.head = nn.Linear(width, 3 * width)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def _options(model, args, cluster, request, tp_sizes):
    analysis = analyse(model, args, {}, cluster, None)
    budget = min(d.memory_bytes for d in cluster.devices)
    options = []
    for tp in tp_sizes:
        graph = analysis.blocks if tp == 1 else tensor_parallel_blocks(
            analysis.gm, analysis.blocks, cluster, tp, training=True, fixed=None, memory_budget_bytes=budget)[0]
        options.append(TPOption(tp=tp, graph=analysis.restate(graph), cluster=group_cluster(cluster, tp)))
    return options


def _exhaustive(options, request, traced):
    """Every layout priced in the old planner's loop order; the first strictly best wins."""
    best, rows = None, []
    schedules = schedule_choices(request)
    for index, option in enumerate(options):
        model = BoundModel(option.graph, option.cluster, request, traced)
        for dp in sorted(data_parallel_choices(request, option.cluster), reverse=True):
            for ranks in pipeline_choices(request, option.cluster, len(option.graph.blocks), dp):
                shape_bound = model.shape_bound(dp, ranks, schedules)
                for _, layout in _layouts_of_shape(option, _Shape(index, dp, ranks), request, schedules, []):
                    bound, short = model.layout_bound(layout)
                    basis = PricingBasis(graph=option.graph, cluster=option.cluster, request=request,
                                         traced_batch_size=traced)
                    priced = price_candidate(basis, layout)
                    rows.append((layout, bound, short, shape_bound, priced.step))
                    if priced.step is not None and (best is None or priced.step < best[1] * (1 - 1e-9)):
                        best = (layout, priced.step)
    return best, rows


def _residual(num_layers: int, width: int, batch: int, seq: int):
    with torch.device("meta"):
        return Residual(num_layers, width), (torch.randn(batch, seq, width),)


CASES = [
    ("residual-8", lambda: _residual(8, 256, 32, 64), "8xH100", {}),
    ("residual-12-2hosts", lambda: _residual(12, 512, 64, 128), "2x4xH100", {}),
    ("gpt-6-bf16", lambda: (lambda e: (e.model, e.args))(zoo.gpt(layers=6, d_model=256, heads=4, vocab=512, seq=64,
                                                                 batch=16, device="meta")), "2x4xH100",
     dict(mixed_precision="bf16")),
    ("residual-6-tight", lambda: _residual(6, 1024, 64, 256),
     Cluster.from_devices([dataclasses.replace(autopart.cost_models.get_preset("H100"), memory_bytes=int(0.3e9))] * 8),
     {}),
]


@pytest.mark.parametrize("name,build,devices,kwargs", CASES, ids=[c[0] for c in CASES])
def test_search_finds_the_exhaustive_optimum_and_bounds_hold(name, build, devices, kwargs, monkeypatch):
    model, args = build()
    cluster = autopart.frontend.device_arg.resolve_devices(devices)
    request = PlanRequest(batch_size=args[0].shape[0], optimizer="adamw", mixed_precision=kwargs.get("mixed_precision"))
    traced = smallest_microbatch(request, cluster)
    args = (args[0][:traced],)
    options = _options(model, args, cluster, request, tensor_parallel_choices(cluster, None, None))
    best, rows = _exhaustive(options, request, traced)
    for layout, bound, short, shape_bound, step in rows:
        if step is not None:  # a bound never exceeds the layout's priced step; a fitting layout is never ruled out
            assert bound <= step * (1 + 1e-9), layout
            assert shape_bound <= step * (1 + 1e-9), layout
            assert short <= 0, layout
    monkeypatch.setattr(search_module, "EAGER_SHAPES", 0)  # prune whole shapes, as on large clusters
    got = search(options, request, "model", traced_batch_size=traced).plan
    assert best is not None
    layout, step = best
    assert got.predicted_step_seconds == pytest.approx(step, rel=1e-9)
    assert (got.mesh.dp, got.mesh.pp, got.num_microbatches, got.schedule, got.virtual_stages,
            got.data_parallel_mode) == (layout.data_parallel, layout.num_ranks, layout.num_microbatches,
                                        layout.schedule, layout.virtual_stages, layout.data_parallel_mode)
    assert got.solver.num_problems < len(rows)


def test_in_flight_per_microbatch_never_grows_with_m():
    """k_s / m does not grow with m on any stage (what the shape-level memory test relies on)."""
    for ranks in range(2, 9):
        for v in (2, 3, 4):
            previous = None
            for m in range(1, 65):
                try:
                    microbatches_per_round(ranks, m)
                except PlanError:
                    continue
                k = interleaved_in_flight(ranks, m, v)
                ratio = np.array([k[s] / m for s in range(ranks * v)])
                assert previous is None or np.all(ratio <= previous + 1e-12)
                previous = ratio


def test_large_cluster_plans_with_few_solves():
    """A 48-layer model on 64 hosts of 8: thousands of layouts, a handful solved."""
    entry = zoo.gpt(layers=48, d_model=1024, heads=16, vocab=50304, seq=1024, batch=256, device="meta")
    compiled = autopart.compile(entry.model, "64x8xH100", example_inputs=entry.args, mixed_precision="bf16",
                                optimizer="adamw")
    solver = compiled.plan.solver
    assert solver.num_problems < 0.25 * (solver.num_problems + solver.num_pruned)
    assert solver.num_shapes_pruned > 100
    assert compiled.plan.mesh.num_devices <= 512
    assert len(compiled.plan.candidates) <= solver.num_problems + search_module.MAX_LISTED_PRUNED


def test_a_tighter_tp_budget_that_splits_alike_is_not_searched_again(monkeypatch):
    """52B parameters with AdamW cannot fit 8 H100s. The tp budgets tighten level by level, but the
    strategy ILP splits every op alike under each: one search proves it, not one per level."""
    from autopart.planner import mesh_search

    searched = []
    real = mesh_search.search

    def recording(options, *args, **kwargs):
        searched.append([(o.tp, o.graph) for o in options])
        return real(options, *args, **kwargs)

    monkeypatch.setattr(mesh_search, "search", recording)
    # the searches the advice runs afterwards on more devices and smaller batches (fit_advice.py) are not counted
    monkeypatch.setattr(autopart.api, "with_fit_advice", lambda error, *args: error)
    entry = zoo.gpt(layers=64, d_model=8192, heads=64, vocab=32000, seq=1024, batch=8, device="meta")
    with pytest.raises(PlanError, match="no pipeline plan fits 8 device"):
        autopart.compile(entry.model, "8xH100", example_inputs=entry.args, optimizer="adamw")
    assert [[tp for tp, _ in options] for options in searched] == [[1, 2, 4, 8]]
