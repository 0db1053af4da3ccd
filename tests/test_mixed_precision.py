"""bf16 mixed precision: plans equal eager `torch.autocast("cpu", bfloat16)`, and are priced as such.

Tolerances (bf16). Losses: torch.testing's bf16 rtol, 1.6e-2 (two bf16 ulps of 2**-7): a
pipeline, a tp group or another microbatch size sums in another order, and every bf16 result
rounds there. Gradients: norm-wise within that rtol, ‖g − g_eager‖ ≤ 1.6e-2 ‖g_eager‖; a
gradient element is a long sum whose rounding scales with its largest terms, so elements that
cancel keep no relative accuracy of their own. A float32 run also lies within these bounds, so
each test also checks that the plan's logits come out in bf16, as only autocast makes them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import autopart
from autopart import zoo
from autopart.core.interfaces import stage_interface
from autopart.passes.device import device_literals, move_to_device

BF16_RTOL = 1.6e-2


def _loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _eager_autocast(model, ids, target):
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = reference(ids)
        loss = _loss(logits, target)
    loss.backward()
    return logits, loss.detach(), {name: p.grad for name, p in reference.named_parameters()}


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    entry = zoo.gpt(layers=4, d_model=64, heads=4, vocab=128, seq=16, batch=8, attn_bias=False)
    target = torch.randint(0, 128, (8, 16))
    return entry.model, entry.args[0], target


@pytest.mark.parametrize("layout", [
    dict(pipeline_parallel=2, tensor_parallel=1, data_parallel=1, num_microbatches=2),
    dict(pipeline_parallel=1, tensor_parallel=2, data_parallel=1, num_microbatches=1),
    dict(pipeline_parallel=2, tensor_parallel=2, data_parallel=1, num_microbatches=2),
    dict(pipeline_parallel=1, tensor_parallel=1, data_parallel=2, num_microbatches=2),
], ids=["pp2", "tp2", "pp2xtp2", "dp2"])
def test_mixed_precision_plans_equal_eager_autocast(gpt, layout):
    model, ids, target = gpt
    devices = layout["pipeline_parallel"] * layout["tensor_parallel"] * layout["data_parallel"]
    cm = autopart.compile(model, devices, example_inputs=(ids,), mixed_precision="bf16", optimizer="adamw",
                          **layout)
    assert cm.plan.mixed_precision == "bf16"
    logits, ref_loss, ref_grads = _eager_autocast(model, ids, target)
    out = cm.simulate(ids)
    assert out.dtype == logits.dtype == torch.bfloat16
    loss, grads = cm.simulate_train_step(ids, target=target, loss_fn=_loss)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=BF16_RTOL, atol=0.0)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, f"{name}: gradient in {grad.dtype}, not the float32 master dtype"
        error = float((grad - ref_grads[name]).norm() / ref_grads[name].norm())
        assert error <= BF16_RTOL, f"{name}: gradient off by {error:.2e} norm-wise"


def test_plan_records_mixed_precision_and_round_trips(gpt):
    model, ids, _ = gpt
    cm = autopart.compile(model, 2, example_inputs=(ids,), pipeline_parallel=2, mixed_precision="bf16")
    again = autopart.Plan.from_json(cm.plan.to_json())
    assert again.mixed_precision == "bf16" and again == cm.plan
    assert "bf16" in cm.report()
    full = autopart.compile(model, 2, example_inputs=(ids,), pipeline_parallel=2)
    assert full.plan.mixed_precision is None


def test_boundaries_travel_in_the_dtype_their_producer_makes(gpt):
    """A stage's matmul outputs leave in bf16 (half the bytes); the residual stream stays float32."""
    model, ids, _ = gpt
    cm = autopart.compile(model, 2, example_inputs=(ids,), pipeline_parallel=2, mixed_precision="bf16")
    last = next(n for n in cm.graph.graph.nodes if n.op == "output").args[0][0]
    assert last.meta["val"].dtype == torch.bfloat16  # the head's logits
    linears = [n for n in cm.graph.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert linears and all(n.meta["val"].dtype == torch.bfloat16 for n in linears)


def test_mixed_precision_is_priced_faster_and_in_bf16():
    with torch.device("meta"):
        entry = zoo.gpt(layers=2, d_model=1024, heads=16, vocab=50304, seq=1024, batch=8, attn_bias=False)
    ids = torch.randint(0, 50304, (8, 1024))
    steps = {}
    for precision in (None, "bf16"):
        cm = autopart.compile(entry.model, "1xH200", example_inputs=(ids,), mixed_precision=precision,
                              optimizer="adamw", num_microbatches=1)
        steps[precision] = cm.plan.predicted_step_seconds
        stage = cm.plan.stages[0]
        # float32 master state either way: 4 bytes a parameter and Adam's two moments of them
        assert stage.memory.params == 4 * stage.num_params and stage.memory.optimizer == 2 * stage.memory.params
    # H200: float32 (non-tensor) 66.9 TFLOP/s against bf16 989 TFLOP/s; the memory-bound ops stay
    assert steps[None] / steps["bf16"] > 4.0, steps


def test_a_callers_autocast_is_refused_without_mixed_precision(gpt):
    model, ids, target = gpt
    cm = autopart.compile(model, 2, example_inputs=(ids,), pipeline_parallel=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(autopart.InputError, match="mixed_precision"):
        cm.simulate_train_step(ids, target=target, loss_fn=_loss)
    mixed = autopart.compile(model, 2, example_inputs=(ids,), pipeline_parallel=2, mixed_precision="bf16")
    plain_loss, _ = mixed.simulate_train_step(ids, target=target, loss_fn=_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same precision as the plan's: the same result
        inside_loss, _ = mixed.simulate_train_step(ids, target=target, loss_fn=_loss)
    assert torch.equal(plain_loss, inside_loss)


def test_unknown_mixed_precision_names_the_choices(gpt):
    model, ids, _ = gpt
    with pytest.raises(autopart.InputError, match="mixed_precision='fp8'.*bf16"):
        autopart.compile(model, 2, example_inputs=(ids,), mixed_precision="fp8")


def test_pure_bf16_models_keep_working():
    torch.manual_seed(0)
    entry = zoo.gpt(layers=2, d_model=64, heads=4, vocab=128, seq=16, batch=4, attn_bias=False)
    model = entry.model.to(torch.bfloat16)
    ids = entry.args[0]
    cm = autopart.compile(model, 2, example_inputs=(ids,), pipeline_parallel=2)
    out = cm.simulate(ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, model(ids), rtol=BF16_RTOL, atol=BF16_RTOL)


def test_no_device_literal_survives_in_rank_modules():
    """Rotary embeddings and factory ops traced on the CPU must follow the rank's device: every rank
    module of a Llama runs on the meta device once the pass has moved it (a CPU literal left over
    would make a CPU tensor and fail against the meta ones)."""
    torch.manual_seed(0)
    entry = zoo.llama(layers=2, batch=2)
    ids = entry.args[0]
    cm = autopart.compile(entry.model, 2, example_inputs=(ids,), pipeline_parallel=2, num_microbatches=1)
    traced = device_literals(cm.graph)
    assert any(device.type == "cpu" for _, device in traced), "the trace carries no device literal to test"
    previous: list = []
    for stage in range(cm.plan.num_stages):
        module = move_to_device(copy.deepcopy(cm.stage_module(stage)).to("meta"), "meta")
        assert all(device.type == "meta" for _, device in device_literals(module))
        inputs = [ids.to("meta") if source.kind == "model_input" else previous[source.index]
                  for source in stage_interface(module).inputs]
        previous = list(module(*inputs))
        assert all(t.is_meta for t in previous if isinstance(t, torch.Tensor))


def test_autocast_conversions_are_priced_as_kernels_of_their_own():
    """Under autocast a linear on float32 input and weight first converts both to bf16: two
    memory-bound kernels (4 bytes read, 2 written an element) on top of the bf16 matmul."""
    from autopart.cost_models import get_preset, op_seconds
    from autopart.frontend.device_arg import resolve_devices
    from autopart.passes.node_costs import annotate, node_cost

    model = torch.nn.Linear(4096, 4096, bias=False)
    x = torch.randn(2048, 4096)
    cluster = resolve_devices("1xH200")
    h200 = get_preset("H200")
    plain = annotate(autopart.trace(model, (x,)), cluster)
    mixed = annotate(passes_autocast(autopart.trace(model, (x,))), cluster, autocast_dtype=torch.bfloat16)
    linear = [n for n in mixed.graph.nodes if n.target is torch.ops.aten.linear.default][0]
    matmul = op_seconds(2 * 2048 * 4096 * 4096, 0, h200, torch.bfloat16)
    casts = op_seconds(0, 6 * x.numel(), h200, torch.bfloat16) + op_seconds(0, 6 * model.weight.numel(), h200,
                                                                             torch.bfloat16)
    assert node_cost(linear).fwd_seconds("H200") == pytest.approx(matmul + casts, rel=0.05)
    plain_linear = [n for n in plain.graph.nodes if n.target is torch.ops.aten.linear.default][0]
    assert node_cost(plain_linear).fwd_seconds("H200") > 5 * node_cost(linear).fwd_seconds("H200")  # float32 rate


def passes_autocast(gm):
    from autopart.passes.autocast_values import autocast_values

    return autocast_values(gm, torch.bfloat16)


# ----------------------------------------------------------------------------- property test

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from random_models import build, programs  # noqa: E402

GRAD_FLOOR = 1e-2
"""A gradient whose true value is ~0 is rounding noise of terms as large as the model's other
gradients: its error is measured against 1% of the largest gradient norm (as in
tests/distributed/family_step.py)."""


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(min_layers=2, max_layers=5), pp=st.integers(1, 2), tp=st.sampled_from([1, 2]),
       dp=st.sampled_from([1, 2]), microbatches=st.integers(1, 2), schedule=st.sampled_from(["1f1b", "gpipe"]))
def test_random_mixed_precision_plans_equal_eager_autocast(program, pp, tp, dp, microbatches, schedule):
    """pp, tp, pp × tp and dp plans of random models under mixed_precision="bf16" against eager
    torch.autocast("cpu", bfloat16): loss within 1.6e-2, every gradient norm-wise (module docstring)."""
    torch.manual_seed(0)
    model = build(program)
    x = torch.randn(4 * dp * microbatches, 4, 8)
    num_ops = sum(1 for n in autopart.trace(model, (x,)).graph.nodes if n.op == "call_function")
    if pp > num_ops:
        return
    cm = autopart.compile(model, pp * tp * dp, example_inputs=(x,), pipeline_parallel=pp, tensor_parallel=tp,
                          data_parallel=dp, num_microbatches=microbatches, schedule=schedule,
                          mixed_precision="bf16", optimizer="adamw")
    model.eval()
    target = torch.randn_like(model(x))

    def loss_fn(output, y):
        return torch.nn.functional.mse_loss(output.float(), y)

    loss, grads = cm.simulate_train_step(x, target=target, loss_fn=loss_fn)
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = loss_fn(reference(x), target)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=BF16_RTOL, atol=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_dtype = reference(x).dtype
    assert cm.simulate(x).dtype == eager_dtype  # float32 would also pass the bounds: autocast must have run
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected)
    floor = GRAD_FLOOR * max(float(g.norm()) for g in expected.values())
    for name, grad in grads.items():
        error = float((grad - expected[name]).norm()) / max(float(expected[name].norm()), floor)
        assert error <= BF16_RTOL, f"{name}: gradient off by {error:.2e} norm-wise"
