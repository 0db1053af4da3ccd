"""Context parallelism in the planner: its degrees, its price (the key/value exchange and the
gathered copy attention keeps), the search choosing it where a sample does not divide, and the
infeasible error naming it (autopart/axes/context.py)."""

from __future__ import annotations

import pytest
import torch

import autopart
from autopart.axes.context import context_exchange_seconds, context_parallel_choices, gathered_kv_bytes
from autopart.core.errors import InputError
from autopart.core.plan import Plan
from autopart.core.request import PlanRequest
from autopart.core.setting import Setting
from autopart import passes
from autopart.cost_models import Cluster, DeviceSpec, all_gather_seconds, reduce_scatter_seconds
from autopart.frontend.source import ModelSource
from autopart.zoo import llama


def _tiny_llama(seq: int, batch: int = 1, layers: int = 1):
    z = llama(layers=layers, seq=seq, batch=batch)
    z.model.config.max_position_embeddings = seq
    return z


def test_choices_need_equal_chunks_a_dividing_batch_and_long_enough_chunks():
    request = PlanRequest(batch_size=2)
    assert context_parallel_choices(request, 8, 16384) == [4]  # 2 groups of 4 take the batch of 2
    assert context_parallel_choices(PlanRequest(batch_size=8), 8, 8192) == [1, 2]  # chunks of 2048+ tokens
    assert context_parallel_choices(PlanRequest(batch_size=8), 8, 16384) == [1, 2, 4]
    assert context_parallel_choices(PlanRequest(batch_size=8), 8, 0) == [1]  # no attention: nothing to split
    with pytest.raises(InputError, match="context_parallel=3 must divide the 8 data-parallel replicas"):
        context_parallel_choices(PlanRequest(batch_size=8, context_parallel=3), 8, 8192)
    assert context_parallel_choices(PlanRequest(batch_size=8, context_parallel=8), 8, 64) == [8]  # fixed: 4-token chunks


def test_attention_blocks_carry_their_keys_and_values_and_cp_prices_their_exchange():
    z = _tiny_llama(seq=256, batch=2)
    compiled = autopart.compile(z.model, "4xH100", example_inputs=z.args, data_parallel=4, context_parallel=2,
                                reuse_layers=False)
    assert compiled.plan.mesh.cp == 2 and compiled.plan.mesh.batch_shards == 2
    assert compiled.plan.microbatch_size * compiled.plan.mesh.batch_shards * compiled.plan.num_microbatches == 2
    cluster = Cluster.parse("4xH100")
    source = ModelSource.of(z.model, z.args, {}, cluster, None)
    graph = passes.coarsen(source.costed_graph(1), cluster)
    layer = [b for b in graph.blocks if b.attention_kv_bytes]
    assert len(layer) == 1  # one decoder layer, one attention
    # keys and values: one sample × 2 kv heads × 256 tokens × head dim 16, float32
    assert layer[0].attention_kv_bytes == 2 * (1 * 2 * 256 * 16 * 4)
    assert layer[0].attention_sequence == 256
    setting = Setting(dp=4, cp=2)
    fwd, bwd = context_exchange_seconds(graph, cluster, setting, num_ranks=1, num_stages=1, scale=1.0, training=True)
    b = graph.blocks.index(layer[0])
    link = cluster.link_for_group([0, 1])
    assert fwd[b, 0] == pytest.approx(all_gather_seconds(2 * layer[0].attention_kv_bytes, 2, link))
    assert bwd[b, 0] == pytest.approx(reduce_scatter_seconds(2 * layer[0].attention_kv_bytes, 2, link))
    assert fwd.sum() == fwd[b, 0]  # only the attention block exchanges
    assert gathered_kv_bytes(layer[0], setting, "none") == layer[0].attention_kv_bytes
    assert gathered_kv_bytes(layer[0], setting, "full") == 0
    assert gathered_kv_bytes(layer[0], Setting(dp=4), "none") == 0


def test_the_search_splits_a_sequence_when_replicas_outnumber_the_samples(tmp_path):
    z = _tiny_llama(seq=8192, batch=1)
    compiled = autopart.compile(z.model, "4xH100", example_inputs=z.args, pipeline_parallel=1, tensor_parallel=1,
                                data_parallel=2, reuse_layers=False)
    plan = compiled.plan
    assert plan.mesh.cp == 2 and plan.mesh.dp == 2 and plan.microbatch_size == 1
    assert "cp=2 (each sequence over 2 replicas, the batch over 1 group)" in compiled.report()
    html = tmp_path / "report.html"
    compiled.save_html(str(html))
    assert "cp=2 (each sequence over 2 replicas" in html.read_text()
    again = Plan.from_json(plan.to_json())
    assert again.mesh.cp == 2


def test_the_infeasible_error_names_context_parallelism():
    z = _tiny_llama(seq=256, batch=1)
    small = DeviceSpec(name="small", memory_bytes=2**20, memory_bandwidth=1e12,
                       peak_flops_by_dtype=(("float32", 1e14),))
    with pytest.raises(autopart.PlanError, match=r"context_parallel \(tried 1\) splits each sequence"):
        autopart.compile(z.model, Cluster.homogeneous(2, small), example_inputs=z.args, context_parallel=1,
                         reuse_layers=False)
