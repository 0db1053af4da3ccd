"""Tensor parallelism: Megatron's collective counts, equivalence with the single-device model, the ILP.

float32 tolerances (REFERENCES.md, PyTorch's own pipelining tests): outputs and
loss rtol 1e-5 / atol 1e-5; gradients rtol 1e-5 / atol 4e-5.

What is counted in the Megatron layout of zoo.gpt (per layer, forward: the
all-reduces after the attention and MLP row-parallel linears; backward: the f
all-reduces before the qkv and fc column-parallel linears). Outside the layers,
counted separately: the vocabulary-parallel embedding's forward all-reduce, the
column-parallel (tied) head's forward all-gather of the logits, and the f
all-reduce before the head in backward.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import autopart
from autopart import zoo
from autopart.cost_models import Cluster, Link
from autopart.cost_models.devices import CPU
from autopart.core.errors import PlanError
from autopart.passes import annotate
from autopart.passes.tensor_parallel.assignment import TPAssignment
from autopart.passes.tensor_parallel.collectives import attach_process_group, collective_log, count_collectives
from autopart.passes.tensor_parallel.placements import R, Shard
from autopart.passes.tensor_parallel.problem import assignment_from_solution, build_tp_problem
from autopart.passes.tensor_parallel.shard import shard_graph
from autopart.passes.tensor_parallel.user_plan import MEGATRON_PLANS, plan_placements
from autopart.passes.tensor_parallel.view_rules import merge_split_placement, view_shapes_map
from autopart.runtime.spmd import gather_gradients, run_ranks, simulate_tp
from autopart.core.problems import SharedCost, TPProblem
from autopart.solver import brute_force_tp, solve_tp
from autopart.solver.strategy_ilp import choice_by_elimination, evaluate
from autopart.frontend.tracing import flatten_inputs
from random_models import build, programs

@dataclass(frozen=True, kw_only=True)
class TPStep:
    """One simulated training step over a tp group's rank modules."""

    loss: torch.Tensor
    """Rank 0's loss (every rank computes the same)."""
    grads: dict[str, torch.Tensor]
    """Original parameter name -> full gradient, rebuilt from the ranks' slices."""
    outputs: list[Any]
    """Rank 0's flat outputs, detached."""


def tp_train_step(rank_modules, flat_inputs, loss_fn) -> TPStep:
    """Forward, `loss_fn(flat outputs)` on every rank, backward; gradients keyed by original name."""
    for m in rank_modules:
        m.zero_grad(set_to_none=True)
    with torch.enable_grad():
        outputs = run_ranks(rank_modules, flat_inputs)
        losses = [loss_fn(outs) for outs in outputs]
        torch.autograd.backward(losses)
    return TPStep(loss=losses[0].detach(), grads=gather_gradients(rank_modules),
                  outputs=[o.detach() if isinstance(o, torch.Tensor) else o for o in outputs[0]])


def choose_tp_strategies(gm, cluster, tp: int, memory_budget_bytes: float, *, fixed=None) -> TPAssignment:
    """The cheapest strategy per op on a tp group of `cluster`'s first `tp` devices (the strategy
    problem built by the pass, answered by the solver, read back as placements)."""
    index = build_tp_problem(gm, cluster, tp, memory_budget_bytes, fixed=fixed)
    return assignment_from_solution(gm, index, solve_tp(index.problem))


FWD = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-5, atol=4e-5)
CLUSTER = Cluster.homogeneous(4, "H100")


@functools.lru_cache(maxsize=None)
def traced(name: str, layers: int = 2):
    """A zoo model (seeded) and its annotated graph, shared by the tests."""
    torch.manual_seed(0)
    z = getattr(zoo, name)(layers=layers)
    z.model.eval()   # dropout off; the zoo configs use p = 0 anyway
    gm = autopart.trace(z.model, z.args, z.kwargs)
    annotate(gm, CLUSTER)
    return z, gm


def megatron_plan(name: str, gm, tp: int) -> dict:
    plan = dict(MEGATRON_PLANS[name])
    if name == "llama" and 2 % tp:   # 2 kv heads cannot be split 4 ways: k/v stay replicated
        plan = {k.replace("[qkv]_proj", "q_proj"): v for k, v in plan.items()}
    return plan_placements(gm, plan)


def assert_equivalent(z, gm, ranks, seed: int = 1) -> None:
    """Outputs, loss and every parameter's gradient of the simulated ranks equal the model's."""
    flat = flatten_inputs(gm, z.args, z.kwargs)
    expected = z.main_output(z.model(*z.args, **z.kwargs))
    got = simulate_tp(ranks, flat)
    torch.testing.assert_close(got[0], expected, **FWD)
    target = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed))
    step = tp_train_step(ranks, flat, lambda outs: F.mse_loss(outs[0], target))
    z.model.zero_grad()
    ref_loss = F.mse_loss(z.main_output(z.model(*z.args, **z.kwargs)), target)
    ref_loss.backward()
    torch.testing.assert_close(step.loss, ref_loss.detach(), **FWD)
    names = dict(z.model.named_parameters(remove_duplicate=False))
    covered = {id(names[n]) for n in step.grads}
    assert covered == {id(p) for p in z.model.parameters() if p.grad is not None}
    for name, grad in step.grads.items():
        torch.testing.assert_close(grad, names[name].grad, **GRAD, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- Megatron counts


def _layer_of(gm, value: str) -> str:
    node = next(n for n in gm.graph.nodes if n.name == value)
    paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    match = next((re.match(r"blocks\.(\d+)", p) for p in paths if re.match(r"blocks\.(\d+)", p)), None)
    return f"layer{match.group(1)}" if match else (paths[-1] if paths else "<root>")


@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_gpt_needs_two_all_reduces_per_layer_each_way(tp):
    z, gm = traced("gpt")
    a = choose_tp_strategies(gm, CLUSTER, tp, 1e12, fixed=megatron_plan("gpt", gm, tp))
    ranks = shard_graph(gm, a, tp)
    # Collective nodes of a rank module, by the module of the value they move.
    counts = Counter()
    for node in ranks[0].graph.nodes:
        if node.op == "call_module" and node.target.startswith("tp_comm_"):
            sub = ranks[0].get_submodule(node.target)
            counts[(_layer_of(gm, sub.value), sub.kind)] += 1
    per_layer = {("layer0", "all_reduce"): 2, ("layer0", "grad_all_reduce"): 2,
                 ("layer1", "all_reduce"): 2, ("layer1", "grad_all_reduce"): 2}
    outside = {("wte", "all_reduce"): 1, ("lm_head", "all_gather"): 1, ("ln_f", "grad_all_reduce"): 1}
    assert counts == Counter({**per_layer, **outside})
    assert count_collectives(ranks) == {"all_reduce": 5, "grad_all_reduce": 5, "all_gather": 1}
    # Calls that move data in a simulated training step: the same, two each way per layer.
    flat = flatten_inputs(gm, z.args, z.kwargs)
    with collective_log() as log:
        tp_train_step(ranks, flat, lambda outs: outs[0].square().mean())
    calls = Counter((_layer_of(gm, value), kind, phase) for kind, phase, value in log)
    for layer in ("layer0", "layer1"):
        assert calls[(layer, "all_reduce", "forward")] == 2
        assert calls[(layer, "grad_all_reduce", "backward")] == 2
    assert sum(calls.values()) == 4 * 2 + 3
    assert calls[("wte", "all_reduce", "forward")] == calls[("lm_head", "all_gather", "forward")] == 1
    assert calls[("ln_f", "grad_all_reduce", "backward")] == 1


def _gloo_rank(rank, modules, flat, target, outdir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=len(modules))
    from torch.distributed.tensor.debug import CommDebugMode

    module = modules[rank]
    attach_process_group(module, dist.group.WORLD)
    with warnings.catch_warnings(), CommDebugMode() as comm:
        warnings.simplefilter("ignore")
        out = module(*flat)
        forward = {str(k): v for k, v in comm.get_comm_counts().items()}
        F.mse_loss(out[0], target).backward()
        total = {str(k): v for k, v in comm.get_comm_counts().items()}
    torch.save({"out": out[0].detach(), "forward": forward, "total": total,
                "grads": {n: p.grad for n, p in module.named_parameters()}}, f"{outdir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_rank_modules_run_on_gloo_like_the_simulation():
    """The same rank modules on a real process group: CommDebugMode counts and values."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tp = 2
    z, gm = traced("gpt")
    ranks = shard_graph(gm, TPAssignment.from_dict(choose_tp_strategies(
        gm, CLUSTER, tp, 1e12, fixed=megatron_plan("gpt", gm, tp)).to_dict()), tp)   # JSON round trip too
    flat = flatten_inputs(gm, z.args, z.kwargs)
    target = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(3))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        # spawn, not fork: a process whose autograd engine has run cannot fork safely (torch 2.11 refuses).
        torch.multiprocessing.start_processes(_gloo_rank, args=(ranks, flat, target, outdir, port), nprocs=tp,
                                              start_method="spawn")
        results = [torch.load(f"{outdir}/rank{r}.pt", weights_only=False) for r in range(tp)]
    step = tp_train_step(ranks, flat, lambda outs: F.mse_loss(outs[0], target))
    for r, res in enumerate(results):
        # Megatron's f and g all-reduce through the functional collective (traceable by Dynamo)
        allreduce = sum(v for k, v in res["forward"].items() if "allreduce" in str(k) or "all_reduce" in str(k))
        assert allreduce == 2 * 2 + 1   # two per layer + the embedding's
        assert sum(v for k, v in res["total"].items()
                   if "allreduce" in str(k) or "all_reduce" in str(k)) == 2 * (2 * 2 + 1)
        torch.testing.assert_close(res["out"], step.outputs[0], **FWD)
        for name, grad in res["grads"].items():   # each rank's slice, as in the simulation
            torch.testing.assert_close(grad, ranks[r].get_parameter(name).grad, **GRAD)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["gpt", "gpt2", "llama", "bert"])
def test_megatron_layout_computes_the_model(name, tp):
    z, gm = traced(name)
    a = choose_tp_strategies(gm, CLUSTER, tp, 1e12, fixed=megatron_plan(name, gm, tp))
    assert any(d.strategy == "rowwise" for d in a.nodes.values())
    assert_equivalent(z, gm, shard_graph(gm, a, tp))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(max_layers=5), tp=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
def test_any_optimal_plan_of_random_costs_computes_the_model(program, tp, seed):
    """Random op costs make the ILP pick varied strategies; every pick must compute the model."""
    model = build(program, width=8)
    model.eval()
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(seed))
    z = zoo.ZooModel(name="random", model=model, args=(x,), kwargs={}, main_output=lambda out: out)
    gm = autopart.trace(model, (x,))
    annotate(gm, CLUSTER)
    a = solve_with_random_costs(gm, build_tp_problem(gm, CLUSTER, tp, 1e12), seed)
    assert_equivalent(z, gm, shard_graph(gm, a, tp))


def solve_with_random_costs(gm, index, seed: int) -> TPAssignment:
    """The strategy problem `index` solved with random op and shared costs (allowed strategies only),
    so that the ILP picks varied strategies, read back as placements of `gm`."""
    rng = np.random.default_rng(seed)
    problem = dataclasses.replace(
        index.problem,
        node_seconds=tuple(np.where(np.isfinite(c), rng.random(c.size), np.inf) for c in index.problem.node_seconds),
        shared=tuple(dataclasses.replace(s, seconds=0.1 * rng.random()) for s in index.problem.shared))
    return assignment_from_solution(gm, dataclasses.replace(index, problem=problem), solve_tp(problem, time_limit_s=5))


# ----------------------------------------------------------------------------- the chooser


def test_huge_mlp_that_does_not_fit_is_split():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 4096), nn.GELU(), nn.Linear(4096, 256))
    x = torch.randn(64, 256)
    gm = autopart.trace(model, (x,))
    cluster = Cluster.homogeneous(2, "H100")
    annotate(gm, cluster)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    a = choose_tp_strategies(gm, cluster, 2, memory_budget_bytes=0.6 * total)
    assert a.param_bytes_per_device <= 0.6 * total
    strategies = sorted(d.strategy for n, d in a.nodes.items() if n.startswith("linear"))
    assert strategies == ["colwise", "rowwise"]   # Megatron's MLP: one all-reduce each way
    assert sorted((c.kind, c.phase) for c in a.collectives) == [("all_reduce", "forward")]
    z = zoo.ZooModel(name="mlp", model=model, args=(x,), kwargs={}, main_output=lambda out: out)
    assert_equivalent(z, gm, shard_graph(gm, a, 2))
    with pytest.raises(PlanError, match="short"):
        choose_tp_strategies(gm, cluster, 2, memory_budget_bytes=0.3 * total)


def test_narrow_layers_on_a_slow_link_stay_replicated():
    torch.manual_seed(0)
    z = zoo.gpt(layers=2, d_model=32, heads=4)
    gm = autopart.trace(z.model, z.args)
    slow = Link(latency_s=1e-3, bandwidth=1e8)
    cluster = Cluster(devices=(CPU, CPU), node_of_device=(0, 0), intra_node_link=slow, inter_node_link=slow)
    annotate(gm, cluster)
    a = choose_tp_strategies(gm, cluster, 2, memory_budget_bytes=1e12)
    assert all(d.output == R and not d.grad_sync for d in a.nodes.values())
    assert a.collectives == ()


def test_identical_layers_share_variables():
    sizes = []
    for layers in (2, 6):
        z = zoo.gpt(layers=layers, device="meta")
        gm = autopart.trace(z.model, z.args)
        annotate(gm, CLUSTER)
        sizes.append(build_tp_problem(gm, CLUSTER, 4, 1e12).problem.num_groups)
    assert sizes[0] == sizes[1]


def _random_problem(rng: np.random.Generator) -> TPProblem:
    groups = int(rng.integers(2, 6))
    sizes = rng.integers(1, 5, size=groups)
    cost = tuple(np.where(rng.random(k) < 0.1, np.inf, rng.random(k)) for k in sizes)
    memory = tuple(rng.integers(0, 10, size=k).astype(float) for k in sizes)
    edges, mats = [], []
    for u in range(groups):
        for v in range(u + 1, groups):
            if rng.random() < 0.5:
                edges.append((u, v))
                mats.append(np.where(rng.random((sizes[u], sizes[v])) < 0.15, np.inf,
                                     rng.random((sizes[u], sizes[v])) * (rng.random() < 0.7)))
    shared = []
    for _ in range(int(rng.integers(0, 4))):
        triggers = tuple({(int(g), int(rng.integers(sizes[g]))) for g in rng.integers(0, groups, size=2)})
        g = int(rng.integers(groups))
        source = (g, int(rng.integers(sizes[g]))) if rng.random() < 0.5 else None
        shared.append(SharedCost(seconds=float(rng.random()), triggers=triggers, source=source))
    return TPProblem(group_names=tuple(f"g{i}" for i in range(groups)), node_seconds=cost, param_bytes=memory,
                     edges=tuple(edges), edge_seconds=tuple(mats), shared=tuple(shared),
                     memory_budget_bytes=float(rng.integers(5, 30)))


@pytest.mark.parametrize("method", ["cpsat", "auto"])
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), unbounded=st.booleans())
def test_ilp_optimum_equals_brute_force(method, seed, unbounded):
    """CP-SAT, and variable elimination where it answers (any budget that does not bind), find the optimum."""
    problem = _random_problem(np.random.default_rng(seed))
    if unbounded:
        problem = dataclasses.replace(problem, memory_budget_bytes=float("inf"))
    try:
        expected = brute_force_tp(problem)
    except PlanError:
        with pytest.raises(PlanError):
            solve_tp(problem, method=method)
        return
    got = solve_tp(problem, method=method)
    assert got.status == "OPTIMAL"
    assert got.param_bytes <= problem.memory_budget_bytes
    assert got.objective_seconds == pytest.approx(expected.objective_seconds, rel=1e-6, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_variable_elimination_answers_when_the_budget_does_not_bind(seed):
    """Without a binding memory row the strategy problem is solved by elimination alone, exactly."""
    problem = dataclasses.replace(_random_problem(np.random.default_rng(seed)), memory_budget_bytes=float("inf"))
    try:
        expected = brute_force_tp(problem)
    except PlanError:
        assert choice_by_elimination(problem) is None   # every choice forbidden somewhere
        return
    choice = choice_by_elimination(problem)
    assert choice is not None
    assert evaluate(problem, choice)[0] == pytest.approx(expected.objective_seconds, rel=1e-6, abs=1e-9)


def test_variable_elimination_leaves_a_binding_budget_to_cp_sat():
    """Two groups, the fast choice holds 10 bytes, the budget 5: elimination declines, CP-SAT answers."""
    problem = TPProblem(group_names=("a", "b"), node_seconds=(np.array([1.0, 2.0]), np.array([1.0])),
                        param_bytes=(np.array([10.0, 4.0]), np.array([1.0])), edges=(), edge_seconds=(),
                        memory_budget_bytes=5.0)
    assert choice_by_elimination(dataclasses.replace(problem, memory_budget_bytes=11.0)) == (0, 0)
    assert choice_by_elimination(problem) is None
    assert solve_tp(problem).choice == (1, 0)


def test_ilp_on_a_small_graph_equals_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    gm = autopart.trace(model, (torch.randn(8, 16),))
    annotate(gm, CLUSTER)
    problem = build_tp_problem(gm, CLUSTER, 2, 1e12).problem
    assert solve_tp(problem).objective_seconds == pytest.approx(brute_force_tp(problem).objective_seconds, rel=1e-6)


# ----------------------------------------------------------------------------- views


def test_a_shard_follows_attention_heads_through_views():
    def moved(xs, ys, p, tp=2):
        return merge_split_placement(view_shapes_map(xs, ys), p, xs, ys, tp)

    assert moved((4, 16, 64), (4, 16, 4, 16), Shard(2)) == Shard(2)            # [b,s,h*d] → [b,s,h,d]
    assert moved((4, 16, 4, 16), (4, 16, 64), Shard(2)) == Shard(2)            # and back
    assert moved((4, 16, 192), (4, 16, 3, 4, 16), Shard(2, 3)) == Shard(3)     # fused qkv → heads
    assert moved((4, 16, 64), (64, 64), Shard(1)) == Shard(0, 4)               # sequence into rows
    assert moved((4, 16, 64), (4, 16, 2, 32), Shard(2), tp=4) is None          # 2 heads, 4 ranks


class _CpuFlashAttention(nn.Module):
    """Attention through the CPU flash SDPA overload (argument order differs from the public op)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.view(b, t, 4, 8).transpose(1, 2) for y in self.qkv(x).split(d, -1))
        y = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, True)[0]
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def test_cpu_flash_attention_splits_by_heads():
    torch.manual_seed(0)
    model, x = _CpuFlashAttention(), torch.randn(2, 8, 32)
    gm = autopart.trace(model, (x,))
    annotate(gm, CLUSTER)
    a = choose_tp_strategies(gm, CLUSTER, 2, 1e12, fixed=plan_placements(gm, {"qkv": "colwise", "out": "rowwise"}))
    attention = next(d for n, d in a.nodes.items() if n.startswith("_scaled_dot_product_flash"))
    assert (attention.strategy, attention.output) == ("heads", Shard(1))
    z = zoo.ZooModel(name="flash", model=model, args=(x,), kwargs={}, main_output=lambda out: out)
    assert_equivalent(z, gm, shard_graph(gm, a, 2))
