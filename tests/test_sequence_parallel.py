"""Sequence parallelism on the tp axis (Megatron-SP): collective counts, equivalence, the planner's choice.

float32 tolerances as in test_tensor_parallel.py (outputs and loss rtol 1e-5 / atol 1e-5, gradients
rtol 1e-5 / atol 4e-5). The gloo run (tp2 × sp, 3 Adam steps) is in test_distributed.py's style below.
"""

from __future__ import annotations

from collections import Counter
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autopart
from autopart import zoo
from autopart.core import sequence_saves
from autopart.passes import annotate, coarsen
from autopart.passes.tensor_parallel.collectives import PERFORMS, collective_log
from autopart.passes.tensor_parallel.placements import R
from autopart.passes.tensor_parallel.problem import assignment_from_solution, build_tp_problem
from autopart.passes.tensor_parallel.sequence import boundary_placements
from autopart.passes.tensor_parallel.shard import shard_graph
from autopart.frontend.tracing import flatten_inputs
from autopart.solver import solve_tp
from random_models import build, programs
from test_distributed import _finish, _torchrun
from test_pipeline_equivalence import assert_plan_matches_model
from test_tensor_parallel import (
    CLUSTER, _layer_of, assert_equivalent, megatron_plan, solve_with_random_costs, tp_train_step, traced,
)


def megatron_sp(name: str, gm, tp: int):
    """Megatron's splits with sequence parallelism forced on the residual stream, every other
    parameter (the norms') replicated as Megatron keeps them."""
    plan = megatron_plan(name, gm, tp)
    params = {n.target: R for n in gm.graph.nodes if n.op == "get_attr" and n.target not in plan}
    fixed = boundary_placements(gm, coarsen(gm, CLUSTER, depth=0), tp, force=True, fixed={**params, **plan})
    index = build_tp_problem(gm, CLUSTER, tp, 1e12, fixed=fixed, sequence_parallel=True, force_sequence=True)
    return assignment_from_solution(gm, index, solve_tp(index.problem))


@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_sp_block_gathers_and_scatters_twice_each_way_and_never_all_reduces(tp):
    z, gm = traced("gpt")
    a = megatron_sp("gpt", gm, tp)
    assert a.sequence_parallel
    ranks = shard_graph(gm, a, tp)
    params = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    kept_as_shards = []
    pack = sequence_saves._pack

    def counting_pack(tensor):
        packed = pack(tensor)
        if packed is not tensor:
            kept_as_shards.append(tuple(tensor.shape))
        return packed

    with collective_log() as log, mock.patch.object(sequence_saves, "_pack", counting_pack):
        tp_train_step(ranks, flatten_inputs(gm, z.args, z.kwargs), lambda outs: outs[0].square().mean())
    # the qkv and fc linears of each layer (and the head) keep their gathered input as the shard
    assert len(kept_as_shards) == (2 * 2 + 1) * tp, kept_as_shards
    moved = Counter((_layer_of(gm, value), PERFORMS[(kind, phase)], phase)
                    for kind, phase, value in log if value not in params)
    for layer in ("layer0", "layer1"):   # activations: Korthikanti et al.'s g / ḡ pairs, two per layer each way
        assert moved[(layer, "all_gather", "forward")] == 2
        assert moved[(layer, "reduce_scatter", "forward")] == 2
        assert moved[(layer, "reduce_scatter", "backward")] == 2
        assert moved[(layer, "all_gather", "backward")] == 2
        assert moved[(layer, "all_reduce", "forward")] == moved[(layer, "all_reduce", "backward")] == 0
    assert not [k for k in moved if k[1] == "all_reduce"], moved
    # the only all-reduces are of the norms' weight gradients (each rank saw 1/tp of the tokens),
    # as Megatron's finalize_model_grads does for sequence-parallel layer norms
    synced = {value for kind, phase, value in log if value in params}
    assert synced and all("ln" in v for v in synced), synced
    assert_equivalent(z, gm, ranks)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_megatron_sp_computes_hf_models(name):
    z, gm = traced(name)
    a = megatron_sp(name, gm, 2)
    assert a.sequence_parallel
    assert_equivalent(z, gm, shard_graph(gm, a, 2))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(max_layers=4), tp=st.sampled_from([2, 4]), force=st.booleans(), seed=st.integers(0, 2**16))
def test_any_sequence_parallel_plan_of_random_costs_computes_the_model(program, tp, force, seed):
    """Random op costs with sequence shards on offer: every optimum the ILP picks computes the model."""
    model = build(program, width=8)
    model.eval()
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(seed))
    z = zoo.ZooModel(name="random", model=model, args=(x,), kwargs={}, main_output=lambda out: out)
    gm = autopart.trace(model, (x,))
    annotate(gm, CLUSTER)
    fixed = boundary_placements(gm, coarsen(gm, CLUSTER, depth=0), tp, force=force)
    index = build_tp_problem(gm, CLUSTER, tp, 1e12, fixed=fixed, sequence_parallel=True, force_sequence=force)
    a = solve_with_random_costs(gm, index, seed)
    assert_equivalent(z, gm, shard_graph(gm, a, tp))


def test_compiled_llama_with_sp_over_two_stages_equals_one_device():
    entry = zoo.llama()
    compiled = autopart.compile(entry.model, 4, example_inputs=entry.args, example_kwargs=entry.kwargs,
                                pipeline_parallel=2, tensor_parallel=2, num_microbatches=2, sequence_parallel=True)
    assert compiled.plan.tensor_parallel.sequence_parallel
    assert "tp=2 sp" in compiled.report() and "sequence parallel" in compiled.report()
    loaded = autopart.Plan.from_json(compiled.plan.to_json())
    assert loaded.tensor_parallel.sequence_parallel
    assert_plan_matches_model(entry.model, entry.args, entry.kwargs, compiled, entry.main_output)


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_skip_from_the_input_across_a_stage_reads_its_sequence_shard(num_microbatches):
    """The model input x is read by layer 1 (stage 0) and layer 2 (stage 1), so stage 0 relays it; the
    plan has layer 2's residual add read x as its sequence shard: the relayed copy must be sliced too,
    not met whole by the 2-token shard."""
    model = build([("linear", 0), ("skip", 1), ("skip", 2)])
    x = torch.randn(2 * num_microbatches, 4, 8, generator=torch.Generator().manual_seed(0))
    compiled = autopart.compile(model, 4, example_inputs=(x,), pipeline_parallel=2, tensor_parallel=2,
                                num_microbatches=num_microbatches, sequence_parallel=True)
    readers_of_x = [n for stage in compiled.plan.stages[1:] for n in stage.node_names
                    if ("x", "S(1)") in compiled.plan.tensor_parallel.nodes[n].inputs]
    assert readers_of_x, "the plan no longer reads the relayed input as a sequence shard: pick another model"
    assert_plan_matches_model(model, (x,), {}, compiled, lambda out: out)


def test_sequence_parallel_false_keeps_activations_whole():
    entry = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4)
    compiled = autopart.compile(entry.model, 2, example_inputs=entry.args, tensor_parallel=2, pipeline_parallel=1,
                                sequence_parallel=False)
    assert not compiled.plan.tensor_parallel.sequence_parallel
    with pytest.raises(autopart.InputError, match="sequence_parallel='yes'"):
        autopart.compile(entry.model, 2, example_inputs=entry.args, sequence_parallel="yes")


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc,args", [
    (4, ["--stages", "2", "--tp", "2", "--optimizer", "adam"]),
    (2, ["--stages", "1", "--tp", "2", "--mixed-precision", "bf16"]),
], ids=["pp2xtp2-sp-adam", "tp2-sp-bf16"])
def test_sequence_parallel_trains_like_one_device_on_gloo(nproc, args):
    """The residual stream sequence-sharded on real process groups (gathered inputs kept as shards and
    gathered again in backward): 3 optimizer steps equal one device's (bf16: eager autocast's)."""
    code, out = _finish(_torchrun(nproc, *args, "--sequence-parallel"))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == nproc, out[-4000:]


def test_what_would_fit_names_sequence_parallelism_when_it_was_turned_off():
    entry = zoo.gpt(layers=64, d_model=8192, heads=64, vocab=32000, seq=1024, batch=8, device="meta")
    with pytest.raises(autopart.PlanError, match=r"sequence_parallel=None \(or True\)"):
        autopart.compile(entry.model, "8xH100", example_inputs=entry.args, optimizer="adamw",
                         sequence_parallel=False)
