"""Identical layers analysed once give the plan the whole model's analysis gives.

`autopart.compile` traces a copy with three layers of a model's stack of identical layers,
restates block costs and tp splits for every layer, and traces the whole model only when
rank modules are asked for (autopart/analysis.py). On small models both ways are run and
their plans compared: stage cuts by block name, every cost, memory, mesh, schedule, and,
once the whole graph exists, every node's stage and tp placement.
"""

from __future__ import annotations

from types import SimpleNamespace

import json

import pytest
import torch
from torch import nn

import autopart
from autopart import zoo
from autopart.frontend.analysis import analyse
from autopart.cost_models import Cluster
from autopart.passes.layer_stack import find_layer_stack, shortened
from autopart.axes.tensor import tensor_parallel_choices
from autopart.verify import verify


def _comparable(plan: autopart.Plan) -> dict:
    """The plan less what depends on the analysis's own clock and bookkeeping."""
    data = json.loads(plan.to_json())
    data["solver"] = {k: data["solver"][k] for k in ("backend", "status", "objective_seconds", "num_problems")}
    data.pop("candidates")
    tp = data["tensor_parallel"]
    if tp is not None:
        for key in ("predicted_seconds", "solve_seconds", "status", "analysed_layers"):
            tp.pop(key, None)
        tp["collectives"] = sorted(json.dumps(c, sort_keys=True) for c in tp["collectives"])
    return data


CASES = [
    ("gpt", "8xH100", dict(pipeline_parallel=3, num_microbatches=2)),
    ("gpt", 4, dict(pipeline_parallel=2, tensor_parallel=2)),
    ("llama", "8xH100", dict(pipeline_parallel=2, tensor_parallel=2, num_microbatches=2)),
    ("llama", "8xH100", dict(tensor_parallel=4, mixed_precision="bf16")),
    ("gpt2", "8xH100", dict(pipeline_parallel=8, num_microbatches=4)),
    ("bert", 4, dict(pipeline_parallel=2, tensor_parallel=2)),
    ("vit", "2x2xH100", {}),
    ("qwen2", "2x4xH100", dict(mixed_precision="bf16")),
    ("transformer_encoder", 4, dict(pipeline_parallel=4)),
]


@pytest.mark.parametrize("family,devices,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_reused_analysis_plans_like_the_whole_model(family, devices, kwargs):
    entry = zoo.ALL_FAMILIES[family](layers=6)
    whole = autopart.compile(entry.model, devices, example_inputs=entry.args, example_kwargs=entry.kwargs,
                             reuse_layers=False, **kwargs)
    reused = autopart.compile(entry.model, devices, example_inputs=entry.args, example_kwargs=entry.kwargs, **kwargs)
    before = _comparable(reused.plan)
    assert all(not stage.node_names for stage in reused.plan.stages)  # the whole graph is not traced yet
    reused.rank_modules(0)  # traces the whole model: node names and tp placements on its nodes
    assert _comparable(reused.plan) == before  # the compiled plan itself never changes
    after = _comparable(reused.graph_plan)
    expected = _comparable(whole.plan)
    assert after == expected
    for stage in before["stages"]:  # the plan before tracing already had every cut and cost
        stage.pop("node_names")
    for stage in expected["stages"]:
        stage.pop("node_names")
    before.pop("tensor_parallel"), expected.pop("tensor_parallel")
    assert before == expected


def test_reused_plan_computes_the_model():
    entry = zoo.llama(layers=5)
    compiled = autopart.compile(entry.model, 4, example_inputs=entry.args, pipeline_parallel=2, tensor_parallel=2,
                                num_microbatches=2)
    assert compiled.plan.tensor_parallel.analysed_layers == "3 of 5"
    result = verify(compiled, entry.model, entry.args)
    assert result.max_output_diff <= 1e-5 and result.max_grad_diff <= 4e-5
    assert all(stage.node_names for stage in compiled.graph_plan.stages)


def test_report_before_the_whole_graph_counts_tp_splits_per_block():
    entry = zoo.gpt(layers=6, d_model=64, heads=4, vocab=128, seq=16, batch=4)
    reused = autopart.compile(entry.model, 4, example_inputs=entry.args, pipeline_parallel=2, tensor_parallel=2)
    whole = autopart.compile(entry.model, 4, example_inputs=entry.args, pipeline_parallel=2, tensor_parallel=2,
                             reuse_layers=False)
    split = [line for line in reused.report().splitlines() if "tp split" in line]
    assert split == [line for line in whole.report().splitlines() if "tp split" in line]


def test_stack_detection():
    assert find_layer_stack(zoo.llama(layers=6).model).path == "model.layers"  # layer_idx differs, allowed
    assert find_layer_stack(zoo.llama(layers=3).model) is None  # no more layers than the copy keeps
    # layer 0 holds the relative attention bias: a kind of its own (its bias, read by every later
    # layer, does not restate layer by layer, so the analysis then traces every layer)
    assert find_layer_stack(zoo.t5(layers=6).model).kinds == (0, 1, 1, 1, 1, 1)
    assert find_layer_stack(zoo.mlp(depth=6).model) is None  # Linear, GELU, Linear, ...
    tied = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
    for layer in tied[1:]:
        layer.weight = tied[0].weight
    assert find_layer_stack(tied) is None  # a parameter shared across layers


def test_the_copy_shares_parameters_and_traces_three_layers():
    model = zoo.gpt(layers=24, d_model=64, heads=4, vocab=128, seq=16, batch=4).model
    stack = find_layer_stack(model)
    copy = shortened(model, stack)
    assert len(copy.blocks) == 3 and len(model.blocks) == 24
    assert copy.blocks[2] is model.blocks[2] and copy.wte.weight is model.wte.weight
    args = (torch.randint(0, 128, (4, 16)),)
    analysis = analyse(model, args, {}, Cluster.parse("8xH100"), None)
    assert analysis.num_blocks == len(analysis.restate(analysis.blocks).blocks) == 24 + 5
    assert sum(1 for n in analysis.gm.graph.nodes if n.op == "call_function") < 200


def test_depth_scales_the_plan_not_the_analysis(monkeypatch):
    """The same model at 8 and 64 layers: the graph compile analyses (traced and costed) has the same
    number of nodes, while the plan places every block of the whole model."""
    analysed_nodes = []
    real_analyse = autopart.api.analyse

    def recording(*args, **kwargs):
        analysis = real_analyse(*args, **kwargs)
        analysed_nodes.append(len(analysis.gm.graph.nodes))
        return analysis

    monkeypatch.setattr(autopart.api, "analyse", recording)
    for layers in (8, 64):
        entry = zoo.gpt(layers=layers, d_model=256, heads=4, vocab=512, seq=64, batch=16, device="meta")
        compiled = autopart.compile(entry.model, "2x8xH100", example_inputs=entry.args)
        assert sum(len(s.blocks) for s in compiled.plan.stages) == layers + 5
        assert all(len(stage.blocks) for stage in compiled.plan.stages)
    assert len(analysed_nodes) == 2 and analysed_nodes[0] == analysed_nodes[1], analysed_nodes
    eight = zoo.gpt(layers=8, d_model=256, heads=4, vocab=512, seq=64, batch=16, device="meta")
    whole = autopart.trace(eight.model, eight.args)
    assert analysed_nodes[0] < len(whole.graph.nodes)  # three layers analysed, not eight


def test_tp_groups_stay_within_a_host_and_hosts_are_priced():
    assert tensor_parallel_choices(Cluster.parse("2x6xH100"), None, None) == [1, 2, 3, 6]
    assert tensor_parallel_choices(Cluster.parse("4x4xH100"), None, None) == [1, 2, 4]
    entry = zoo.gpt(layers=8, d_model=512, heads=8, vocab=512, seq=256, batch=32, device="meta")
    one = autopart.compile(entry.model, "16xH100", example_inputs=entry.args, data_parallel=16, pipeline_parallel=1,
                           tensor_parallel=1, num_microbatches=1, data_parallel_mode="ddp")
    two = autopart.compile(entry.model, "2x8xH100", example_inputs=entry.args, data_parallel=16, pipeline_parallel=1,
                           tensor_parallel=1, num_microbatches=1, data_parallel_mode="ddp")
    assert one.plan.cluster["node_of_device"] == [0] * 8 + [1] * 8  # "16xH100" is two hosts of 8 too
    slow = Cluster.parse("2x8xH100")
    fast = Cluster.from_devices(slow.devices, node_of_device=(0,) * 16)
    three = autopart.compile(entry.model, fast, example_inputs=entry.args, data_parallel=16, pipeline_parallel=1,
                             tensor_parallel=1, num_microbatches=1, data_parallel_mode="ddp")
    assert two.plan.predicted_step_seconds > three.plan.predicted_step_seconds  # all-reduce over InfiniBand


def test_progress_on_stderr_only_when_verbose_or_slow(capfd, monkeypatch):
    """A quick compile is silent; verbose shows every phase; a search that runs a second or more
    shows its progress without being asked (here on a clock that runs 0.3 s a reading)."""
    entry = zoo.gpt(layers=12, d_model=256, heads=4, vocab=512, seq=64, batch=64, device="meta")
    with monkeypatch.context() as patch:
        clock = iter(range(10**9))
        patch.setattr(autopart.planner.search, "time", SimpleNamespace(perf_counter=lambda: 0.3 * next(clock)))
        autopart.compile(entry.model, "4x8xH100", example_inputs=entry.args)
    slow = capfd.readouterr().err
    assert "layouts solved" in slow and "identical layers" not in slow and "best so far" not in slow
    autopart.compile(entry.model, "4x8xH100", example_inputs=entry.args)
    quick = capfd.readouterr().err
    assert quick == "" or all("layouts solved" in line for line in quick.splitlines())  # unless CI's CPU is slow
    autopart.compile(entry.model, "4x8xH100", example_inputs=entry.args, verbose=True)
    err = capfd.readouterr().err
    assert "12 identical layers (blocks): analysed 3" in err
    assert "search" in err and "best" in err and "layouts solved" in err


def test_a_tp_plan_naming_one_layer_analyses_every_layer():
    entry = zoo.gpt(layers=6, d_model=64, heads=4, vocab=128, seq=16, batch=4)
    plan = {"blocks.*.attn_qkv": "colwise", "blocks.4.mlp_fc": "colwise"}
    compiled = autopart.compile(entry.model, 4, example_inputs=entry.args, pipeline_parallel=2, tensor_parallel=2,
                                tp_plan=plan)
    assert all(stage.node_names for stage in compiled.plan.stages)  # the whole model was traced
    assert compiled.plan.tensor_parallel.analysed_layers is None
