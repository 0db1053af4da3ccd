"""Activation recomputation: every plan that recomputes computes what the model computes, and the
planner recomputes where memory demands it, block by block, and nowhere else.

Tolerances as in test_pipeline_equivalence.py (float32: forward rtol 1e-5 / atol 1e-5, gradients
rtol 1e-5 / atol 4e-5) and test_mixed_precision.py (bf16: loss rtol 1.6e-2, gradients norm-wise
1.6e-2). Recomputation replays the same ops on the same inputs, so it changes no number: the
float32 tolerances are PyTorch's own pipelining ones, not loosened.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import autopart
from autopart import passes, zoo
from autopart.frontend.analysis import analyse
from autopart.cost_models import Cluster, get_preset
from autopart.core.interfaces import region_info, regions, stage_interface
from autopart.core.plan import PLAN_VERSION
from autopart.core.tp_random import streams_of
from autopart.core.modes import RECOMPUTE_MODES
from autopart.core.modes import SCHEDULES, VIRTUAL_SCHEDULES
from random_models import build, programs
from test_pipeline_equivalence import assert_plan_matches_model

BF16_RTOL = 1.6e-2
MEGATRON = {"layers.*.qkv": "colwise", "layers.*.out": "rowwise"}
GPT_MEGATRON = {"blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
                "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"}


def _recomputed(compiled) -> set[str]:
    return {m for stage in compiled.plan.stages for m in stage.recompute}


def _blocks_freeing_memory(model: nn.Module, x: torch.Tensor, recompute: str, min_blocks: int) -> set[str]:
    """The blocks, as the planner cuts the model at tp = 1, that keep less under `recompute` than they
    save without it: those a forced mode replays (recompute_choice.block_recompute)."""
    analysis = analyse(model, (x,), {}, Cluster.from_devices([get_preset("cpu")]), None, min_blocks=min_blocks)
    return {b.name for b in analysis.restate(analysis.blocks).blocks
            if b.recomputable and b.kept_bytes(recompute) < b.saved_bytes}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(min_layers=2, max_layers=6), recompute=st.sampled_from(RECOMPUTE_MODES[1:]),
       schedule=st.sampled_from(SCHEDULES), num_stages=st.integers(1, 3), tp=st.sampled_from([1, 2]),
       dp=st.sampled_from([1, 2]), num_microbatches=st.sampled_from([1, 2, 4]), data=st.data())
def test_recomputing_plans_match_single_device(program, recompute, schedule, num_stages, tp, dp, num_microbatches,
                                               data):
    """recompute × schedule × pp × tp × dp (and its mode: ZeRO-3 nests every block as a region) on
    random models (chains, skips, branches, tied weights, buffers, norms, attention). Every example
    forces a recompute mode ('none' is every other equivalence test's case), so that CI's
    derandomized examples recompute too."""
    model = build(program)
    x = torch.randn(dp * num_microbatches * 2, 4, 8)
    virtual = 1
    if schedule in VIRTUAL_SCHEDULES:
        virtual = data.draw(st.integers(2 if schedule == "interleaved_1f1b" else 1, 2), label="v")
        if num_stages < 2 or num_microbatches % num_stages:
            schedule, virtual = "1f1b", 1
    plan = MEGATRON if tp > 1 and any(kind == "attention" for kind, _ in program) else None
    mode = data.draw(st.sampled_from(["ddp", "zero2", "zero3"]), label="dp mode") if dp > 1 else None
    try:
        compiled = autopart.compile(model, num_stages * tp * dp, example_inputs=(x,), pipeline_parallel=num_stages,
                                    num_microbatches=num_microbatches, schedule=schedule, virtual_stages=virtual,
                                    tensor_parallel=tp, data_parallel=dp, tp_plan=plan, recompute=recompute,
                                    data_parallel_mode=mode)
    except autopart.PlanError as error:  # fewer blocks than stages: the planner says so
        assert "blocks" in str(error)
        return
    if recompute != "none":
        assert _recomputed(compiled) <= {recompute, "none"}
        if tp == 1:  # exactly the blocks whose replay frees memory (tp restates the blocks' bytes)
            replayed = {b for stage in compiled.plan.stages for b, m in zip(stage.blocks, stage.recompute)
                        if m == recompute}
            assert replayed == _blocks_freeing_memory(model, x, recompute, num_stages * virtual)
        event("replays blocks" if recompute in _recomputed(compiled) else "no block frees memory")
        assert all(regions(m) for s in range(compiled.plan.num_stages) for m in [compiled.stage_module(s)]
                   if recompute in compiled.plan.stages[s].recompute)
    else:
        assert _recomputed(compiled) <= {"none"}
    assert_plan_matches_model(model, (x,), {}, compiled, lambda out: out)


@pytest.mark.parametrize("family,recompute", [("gpt2", "full"), ("llama", "selective"), ("bert", "full"),
                                              ("t5", "selective")])
def test_transformers_models_recompute(family, recompute):
    """HF models: tied embeddings, rotary embeddings under no_grad (a higher-order op in the region),
    masks, encoder-decoder skips."""
    entry = zoo.ALL_FAMILIES[family]()
    compiled = autopart.compile(entry.model, 2, example_inputs=entry.args, example_kwargs=entry.kwargs,
                                pipeline_parallel=2, num_microbatches=2, recompute=recompute)
    assert recompute in _recomputed(compiled)
    assert_plan_matches_model(entry.model, entry.args, entry.kwargs, compiled, entry.main_output)


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("layout", [dict(pipeline_parallel=2, tensor_parallel=1), dict(pipeline_parallel=1, tensor_parallel=2)],
                         ids=["pp2", "tp2"])
def test_recompute_under_mixed_precision_equals_eager_autocast(recompute, layout):
    """The replay runs under the autocast state of the first forward (non-reentrant checkpoint records it)."""
    torch.manual_seed(0)
    entry = zoo.gpt(layers=4, d_model=64, heads=4, vocab=128, seq=16, batch=8, attn_bias=False)
    ids, target = entry.args[0], torch.randint(0, 128, (8, 16))

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    reference = copy.deepcopy(entry.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = loss_fn(reference(ids), target)
    ref_loss.backward()
    cm = autopart.compile(entry.model, 2, example_inputs=(ids,), mixed_precision="bf16", recompute=recompute,
                          num_microbatches=2, tp_plan=GPT_MEGATRON if layout["tensor_parallel"] > 1 else None,
                          **layout)
    assert recompute in _recomputed(cm)
    loss, grads = cm.simulate_train_step(ids, target=target, loss_fn=loss_fn)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=BF16_RTOL, atol=0.0)
    for name, param in reference.named_parameters():
        error = float((grads[name] - param.grad).norm() / param.grad.norm())
        assert error <= BF16_RTOL, f"{name}: gradient off by {error:.2e} norm-wise"


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Tanh()) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_dropout_replays_the_same_mask(recompute):
    """Checkpointing restores the RNG state for the replay: the same seed gives the same gradients
    whether the blocks recompute or keep their activations."""
    model = _Dropout().train()
    x = torch.randn(8, 16)

    def run(mode):
        cm = autopart.compile(model, 2, example_inputs=(x,), pipeline_parallel=2, num_microbatches=2, recompute=mode)
        torch.manual_seed(7)
        return cm, cm.simulate_train_step(x, target=None, loss_fn=lambda out, _: out.square().mean())

    kept, (loss, grads) = run("none")
    replayed, (again_loss, again) = run(recompute)
    assert _recomputed(kept) <= {"none"} and recompute in _recomputed(replayed)
    assert all(regions(replayed.stage_module(s)) for s in range(replayed.plan.num_stages)
               if recompute in replayed.plan.stages[s].recompute)  # the replay is in the rank modules
    torch.manual_seed(8)
    other_seed, _ = replayed.simulate_train_step(x, target=None, loss_fn=lambda out, _: out.square().mean())
    assert other_seed != again_loss  # dropout is active: another seed draws other masks
    torch.testing.assert_close(again_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(again[name], grad, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


class _ShardedDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Tanh(), nn.Linear(64, 16))
                                    for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_dropout_on_tp_shards_replays_the_same_mask(recompute):
    """Dropout on a column-parallel activation draws from the tp rank's own stream
    (autopart/tp_random.py), which PyTorch's checkpoint does not restore: the region rewinds it,
    so the replay redraws the forward's masks and the gradients equal those kept."""
    model = _ShardedDropout().train()
    x = torch.randn(8, 16)

    def run(mode):
        torch.manual_seed(7)  # the streams' seeds derive from it
        cm = autopart.compile(model, 2, example_inputs=(x,), pipeline_parallel=1, tensor_parallel=2,
                              num_microbatches=2, recompute=mode, tp_plan={"layers.*.0": "colwise",
                                                                            "layers.*.3": "rowwise"})
        assert all(streams_of(cm.stage_module(0, t)) for t in range(2))  # the dropout is on shards
        torch.manual_seed(7)
        return cm, cm.simulate_train_step(x, target=None, loss_fn=lambda out, _: out.square().mean())

    _, (loss, grads) = run("none")
    cm, (again_loss, again) = run(recompute)
    assert recompute in _recomputed(cm)
    torch.testing.assert_close(again_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(again[name], grad, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_regions_keep_parameter_paths_and_own_their_block():
    """A recomputed block becomes one submodule at its own path (blocks.1), holding its parameters
    under the paths the stage interface names; a tied weight stays with the stage."""
    entry = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4)
    cm = autopart.compile(entry.model, 4, example_inputs=entry.args, pipeline_parallel=1, data_parallel=2,
                          data_parallel_mode="zero3", recompute="full", num_microbatches=1)
    module = cm.stage_module(0)
    found = dict(regions(module))
    assert {"blocks.0", "blocks.1"} <= set(found)
    assert region_info(found["blocks.1"]).recompute == "full" and region_info(found["blocks.1"]).owns_parameters
    for path, name in stage_interface(module).parameters:
        assert module.get_parameter(path) is not None
    assert module.get_parameter("blocks.1.mlp_fc.weight") is found["blocks.1"].get_parameter("mlp_fc.weight")
    assert not any(info.owns_parameters and "wte" in path for path, info in
                   ((p, region_info(m)) for p, m in found.items()))  # the tied embedding is the stage's
    assert_plan_matches_model(entry.model, entry.args, {}, cm, entry.main_output)


def test_nothing_is_nested_without_recomputation_or_zero3():
    entry = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4)
    cm = autopart.compile(entry.model, 2, example_inputs=entry.args, pipeline_parallel=2, recompute="none")
    assert not any(regions(cm.stage_module(s)) for s in range(2))


def test_a_block_that_writes_a_buffer_is_never_recomputed():
    class Running(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # layers.0 frees its tanh's output when replayed; a lone Linear saves only its input (kept anyway)
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.BatchNorm1d(8),
                                         nn.Linear(8, 8)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    x = torch.randn(8, 8)
    cm = autopart.compile(Running().train(), 1, example_inputs=(x,), recompute="full", num_microbatches=1)
    modes = dict(zip(cm.plan.stages[0].blocks, cm.plan.stages[0].recompute))
    assert modes and modes.get("layers.1") == "none", modes  # BatchNorm's running statistics
    assert modes.get("layers.0") == "full"


# ----------------------------------------------------------------------------- pricing and choice


def _gpt_meta(layers: int = 8, d_model: int = 1024):
    return zoo.gpt(layers=layers, d_model=d_model, heads=16, vocab=32000, seq=1024, batch=1, device="meta",
                   attn_bias=False).model


def test_recomputation_keeps_less_and_replays_more():
    """Per GPT block: full keeps its input only, selective also its matmul and attention outputs;
    full replays the whole forward, selective the rest (norms, GELU, views)."""
    model = _gpt_meta(2)
    cm = autopart.compile(model, "1xH100", example_inputs=(torch.zeros(1, 1024, dtype=torch.long, device="meta"),),
                          optimizer="sgd")
    graph = passes.coarsen(cm.graph, cm.cluster, depth=0)
    block = next(b for b in graph.blocks if b.name == "blocks.1")
    h = 1024 * 1024 * 4  # one [1, 1024, 1024] float32 activation
    assert block.kept_bytes("full") == block.input_bytes == h
    assert block.kept_bytes("full") < block.kept_bytes("selective") < block.kept_bytes("none")
    assert block.selective_saved_bytes == (3 + 1 + 1 + 4 + 1) * h  # qkv, attention, proj, fc, proj outputs
    full = block.recompute_time_on("H100", "full").fwd(1.0)
    selective = block.recompute_time_on("H100", "selective").fwd(1.0)
    assert full == pytest.approx(block.time_on("H100").fwd(1.0)) and 0 < selective < 0.5 * full


def test_the_planner_recomputes_only_where_memory_demands_it():
    """GPT 8×1024 (float32) on one 30 GiB device at 32 × 1024 tokens in one microbatch: keeping every
    activation does not fit, recomputing every block does; the plan recomputes some blocks fully and
    others selectively or not at all, within the device. With 80 GiB it recomputes nothing."""
    model = _gpt_meta(8)
    ids = torch.zeros(32, 1024, dtype=torch.long, device="meta")
    small = dataclasses.replace(get_preset("H100"), memory_bytes=30 * 2**30)
    cm = autopart.compile(model, Cluster.from_devices([small]), example_inputs=(ids,), optimizer="sgd",
                          num_microbatches=1)
    stage = cm.plan.stages[0]
    layers = {mode for mode, block in zip(stage.recompute, stage.blocks) if block.startswith("blocks.")}
    assert "full" in layers and len(layers) > 1, f"chosen per block: {stage.recompute}"
    assert stage.memory.total <= stage.memory.capacity and stage.recompute_seconds > 0
    tried = {(c.recompute, c.status) for c in cm.plan.candidates}
    assert ("none", "infeasible") in tried and ("mixed", "chosen") in tried
    assert "recompute" in cm.report()
    roomy = dataclasses.replace(small, memory_bytes=80 * 2**30)
    plain = autopart.compile(model, Cluster.from_devices([roomy]), example_inputs=(ids,), optimizer="sgd",
                             num_microbatches=1)
    assert plain.plan.stages[0].recompute == ()
    assert plain.plan.predicted_step_seconds < cm.plan.predicted_step_seconds


def test_a_fixed_recompute_mode_applies_to_every_block_and_is_priced():
    model = _gpt_meta(4)
    ids = torch.zeros(8, 1024, dtype=torch.long, device="meta")
    steps, acts = {}, {}
    for mode in RECOMPUTE_MODES:
        plan = autopart.compile(model, "1xH100", example_inputs=(ids,), optimizer="sgd", num_microbatches=1,
                                recompute=mode).plan
        blocks = [m for m, b in zip(plan.stages[0].recompute or ("none",) * 8, plan.stages[0].blocks)
                  if b.startswith("blocks.")]
        assert set(blocks) == {mode}
        steps[mode], acts[mode] = plan.predicted_step_seconds, plan.stages[0].memory.activations
    assert steps["none"] < steps["selective"] < steps["full"]
    assert acts["none"] > acts["selective"] > acts["full"]


@pytest.mark.parametrize("version", [1, 2])
def test_plans_of_schemas_1_and_2_still_load(version):
    """Versions 1 and 2 named ZeRO-2 'fsdp' and recomputed nothing; version 1 also named a
    candidate's pipeline ranks num_stages."""
    entry = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4)
    plan = autopart.compile(entry.model, 2, example_inputs=entry.args, data_parallel=2,
                            data_parallel_mode="zero2").plan
    import json

    old = json.loads(plan.to_json())
    old["version"] = version
    old["data_parallel_mode"] = "fsdp"
    old["mesh"].pop("dp_shard")
    for stage in old["stages"]:
        stage.pop("recompute")
        stage.pop("recompute_seconds")
    for candidate in old["candidates"]:
        candidate.pop("recompute")
        candidate["data_parallel_mode"] = "fsdp" if candidate["data_parallel_mode"] == "zero2" else "ddp"
        if version == 1:
            candidate["num_stages"] = candidate.pop("pipeline_parallel")
    again = autopart.Plan.from_json(json.dumps(old))
    assert again.data_parallel_mode == "zero2" and again.mesh.dp_shard == 2 and again.version == PLAN_VERSION
    assert {c.data_parallel_mode for c in again.candidates} <= {"ddp", "zero2"}
    assert all(s.recompute == () for s in again.stages)


def test_the_gpu_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/recompute_gpu.py --tiny: the planner recomputes at the large batch (on a CPU whose
    memory lies between the two), not at the small one, and every run trains."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "recompute_gpu.py"
    out = tmp_path / "recompute.json"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--steps", "1", "--warmup", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert checks["large_batch_plan_recomputes"] and checks["small_batch_plan_does_not_recompute"]
    assert checks["large_batch_trains"]
