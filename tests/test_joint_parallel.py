"""pp × tp plans from `autopart.compile` equal the single-device model; the planner
splits layers when memory demands it and not when the link makes it slower.

Tolerances as in test_pipeline_equivalence.py (float32): forward rtol 1e-5 /
atol 1e-5, gradients rtol 1e-5 / atol 4e-5.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import autopart
from autopart import zoo
from autopart.cost_models import Cluster, DeviceSpec, Link
from autopart.passes.tensor_parallel.collectives import count_collectives
from random_models import build, programs
from test_pipeline_equivalence import assert_plan_matches_model

GPT_MEGATRON = {"blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
                "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"}
GPT2_MEGATRON = {"transformer.h.*.attn.c_attn": "colwise", "transformer.h.*.attn.c_proj": "rowwise",
                 "transformer.h.*.mlp.c_fc": "colwise", "transformer.h.*.mlp.c_proj": "rowwise"}
LLAMA_MEGATRON = {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise",
                  "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
                  "model.layers.*.mlp.down_proj": "rowwise"}


@pytest.mark.parametrize("num_stages,tp,num_microbatches", [(1, 2, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1)])
def test_gpt_pp_by_tp_matches_single_device(num_stages, tp, num_microbatches):
    entry = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4)
    compiled = autopart.compile(entry.model, num_stages * tp, example_inputs=entry.args, pipeline_parallel=num_stages,
                                tensor_parallel=tp, num_microbatches=num_microbatches, tp_plan=GPT_MEGATRON)
    assert (compiled.plan.mesh.pp, compiled.plan.mesh.tp) == (num_stages, tp)
    assert compiled.plan.tensor_parallel is not None
    assert_plan_matches_model(entry.model, entry.args, {}, compiled, entry.main_output)


def test_megatron_block_costs_two_all_reduces_each_way_per_layer():
    entry = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4)
    compiled = autopart.compile(entry.model, 4, example_inputs=entry.args, pipeline_parallel=2, tensor_parallel=2,
                                num_microbatches=1, tp_plan=GPT_MEGATRON)
    for rank in range(4):  # one layer per stage; embedding and head replicated
        assert count_collectives(compiled.rank_module(rank)) == {"all_reduce": 2, "grad_all_reduce": 2}


@pytest.mark.parametrize("family,plan,tp,num_stages", [
    ("gpt2", GPT2_MEGATRON, 2, 2), ("llama", LLAMA_MEGATRON, 2, 2), ("bert", None, 2, 1),
])
def test_transformers_models_pp_by_tp(family, plan, tp, num_stages):
    entry = zoo.ALL_FAMILIES[family]()
    compiled = autopart.compile(entry.model, num_stages * tp, example_inputs=entry.args,
                                example_kwargs=entry.kwargs, pipeline_parallel=num_stages, tensor_parallel=tp,
                                num_microbatches=2, tp_plan=plan)
    assert compiled.plan.mesh.tp == tp
    assert_plan_matches_model(entry.model, entry.args, entry.kwargs, compiled, entry.main_output)


def _wide_mlp(width: int) -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


def test_layers_too_big_for_one_device_are_split():
    # one MLP of 2 x 8192 x 32768 float32 weights = 2 GiB, x4 with Adam: 8 GiB on 4 GiB devices
    small = DeviceSpec(name="small", memory_bytes=4 * 2**30, memory_bandwidth=2e12,
                       peak_flops_by_dtype=(("float32", 5e13),))
    cluster = Cluster.from_devices([small] * 4)
    x = torch.randn(8, 8192, device="meta")
    compiled = autopart.compile(_wide_mlp(8192), cluster, example_inputs=(x,))
    assert compiled.plan.mesh.tp >= 2, "pipeline cuts alone cannot fit one 8 GiB layer"
    assert all(s.memory.total <= s.memory.capacity for s in compiled.plan.stages)


def test_narrow_layers_on_a_slow_link_stay_whole():
    gpu = DeviceSpec(name="gpu", memory_bytes=80e9, memory_bandwidth=3e12, peak_flops_by_dtype=(("float32", 6e13),))
    slow = Cluster.from_devices([gpu] * 4, intra_node_link=Link(latency_s=2e-5, bandwidth=5e9))
    x = torch.randn(8, 256, device="meta")
    compiled = autopart.compile(_wide_mlp(256), slow, example_inputs=(x,))
    assert compiled.plan.mesh.tp == 1
    tried = {c.tensor_parallel for c in compiled.plan.candidates}
    assert tried >= {1, 2, 4}


def test_joint_plan_round_trips_through_json():
    entry = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4)
    compiled = autopart.compile(entry.model, 4, example_inputs=entry.args, pipeline_parallel=2, tensor_parallel=2,
                                tp_plan=GPT_MEGATRON)
    again = autopart.Plan.from_json(compiled.plan.to_json())
    assert again == compiled.plan


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(min_layers=2, max_layers=5), num_stages=st.integers(1, 2),
       num_microbatches=st.sampled_from([1, 2]), megatron=st.booleans(),
       sequence_parallel=st.sampled_from([None, True, False]))
def test_random_models_pp_by_tp_match_single_device(program, num_stages, num_microbatches, megatron,
                                                    sequence_parallel):
    model = build(program)
    x = torch.randn(2 * num_microbatches, 4, 8)
    plan = {"layers.*.qkv": "colwise", "layers.*.out": "rowwise"} if megatron else None
    if megatron and not any(kind == "attention" for kind, _ in program):
        plan = None
    try:
        compiled = autopart.compile(model, 2 * num_stages, example_inputs=(x,), pipeline_parallel=num_stages,
                                    tensor_parallel=2, num_microbatches=num_microbatches, tp_plan=plan,
                                    sequence_parallel=sequence_parallel)
    except autopart.PlanError as error:  # fewer blocks than stages: the planner says so
        assert "blocks" in str(error)
        return
    assert compiled.plan.mesh.tp == 2
    if sequence_parallel is False:
        assert not compiled.plan.tensor_parallel.sequence_parallel
    assert_plan_matches_model(model, (x,), {}, compiled, lambda out: out)
