"""Every pipeline plan computes what the single-device model computes.

float32 tolerances (REFERENCES.md, PyTorch's own pipelining tests): forward
rtol 1e-5 / atol 1e-5; loss the same; gradients rtol 1e-5 / atol 4e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autopart
from autopart import zoo
from autopart.core.modes import SCHEDULES, VIRTUAL_SCHEDULES
from random_models import build, programs

FWD = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-5, atol=4e-5)


def assert_plan_matches_model(model, args, kwargs, compiled, main_output, loss_target_seed=1):
    """Forward, loss and every original parameter's gradient equal the single-device run."""
    model.eval()  # dropout off in both runs; the graph was traced with the same modules
    expected = main_output(model(*args, **kwargs))
    got = main_output(compiled.simulate(*args, **kwargs))
    torch.testing.assert_close(got, expected, **FWD)

    torch.manual_seed(loss_target_seed)
    target = torch.randn_like(expected)

    def loss_fn(output, y):
        return F.mse_loss(main_output(output), y)

    loss, grads = compiled.simulate_train_step(*args, target=target, loss_fn=loss_fn, **kwargs)
    model.zero_grad()
    ref_loss = loss_fn(model(*args, **kwargs), target)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **FWD)
    expected_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **GRAD, msg=lambda m: f"{name}: {m}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=programs(),
    num_devices=st.integers(1, 8),
    num_microbatches=st.integers(1, 8),
    microbatch_size=st.integers(1, 3),
    data=st.data(),
)
def test_random_models_match_single_device(program, num_devices, num_microbatches, microbatch_size, data):
    model = build(program)
    batch = num_microbatches * microbatch_size
    x = torch.randn(batch, 4, 8)
    num_stages = data.draw(st.integers(1, num_devices), label="num_stages")
    schedule = data.draw(st.sampled_from(SCHEDULES), label="schedule")
    num_ops = sum(1 for n in autopart.trace(model, (x,)).graph.nodes if n.op == "call_function")
    virtual_stages = 1
    if schedule in VIRTUAL_SCHEDULES:  # stage s on rank s % R, m in whole rounds of about R
        virtual_stages = data.draw(st.integers(2 if schedule == "interleaved_1f1b" else 1, 3), label="v")
        rounds = max(1, num_microbatches // num_stages)
        if num_stages < 2 or num_stages * virtual_stages > num_ops or num_microbatches % rounds:
            schedule, virtual_stages = "1f1b", 1
    if num_stages > num_ops:  # more stages than ops: the planner must say why it cannot
        with pytest.raises(autopart.PlanError, match=f"pipeline_parallel={num_stages}.*only {num_ops} blocks"):
            autopart.compile(model, num_devices, example_inputs=(x,), pipeline_parallel=num_stages)
        return
    compiled = autopart.compile(model, num_devices, example_inputs=(x,), pipeline_parallel=num_stages,
                                num_microbatches=num_microbatches, schedule=schedule,
                                virtual_stages=virtual_stages)
    assert compiled.plan.num_stages == num_stages * virtual_stages and compiled.plan.mesh.pp == num_stages
    assert compiled.plan.num_microbatches == num_microbatches
    assert_plan_matches_model(model, (x,), {}, compiled, lambda out: out)


@pytest.mark.parametrize("family,num_stages,num_microbatches", [
    ("gpt2", 3, 2), ("llama", 4, 4), ("bert", 2, 2), ("t5", 3, 2), ("vit", 2, 2),
    ("transformer_encoder", 3, 4), ("mlp", 4, 8),
])
def test_transformers_models_match_single_device(family, num_stages, num_microbatches):
    entry = zoo.ALL_FAMILIES[family]()
    model = entry.model
    args = entry.args
    batch = args[0].shape[0]
    if batch % num_microbatches:
        pytest.skip("batch does not divide")
    compiled = autopart.compile(model, 4, example_inputs=args, example_kwargs=entry.kwargs,
                                pipeline_parallel=num_stages, num_microbatches=num_microbatches)
    assert compiled.plan.num_stages == num_stages
    assert_plan_matches_model(model, args, entry.kwargs, compiled, entry.main_output)


def test_tied_embedding_is_replicated_and_gradients_summed():
    entry = zoo.gpt2(layers=2)
    compiled = autopart.compile(entry.model, 2, example_inputs=entry.args, pipeline_parallel=2, num_microbatches=2)
    holders = [r for r in range(compiled.num_ranks)
               if any(name == "transformer.wte.weight"
                      for _, name in autopart.core.interfaces.stage_interface(compiled.rank_module(r)).parameters)]
    assert holders == [0, 1], "embedding (stage 0) and tied lm_head (stage 1) each hold a copy"
    copies = [compiled.rank_module(r).get_parameter(path) for r in holders
              for path, name in autopart.core.interfaces.stage_interface(compiled.rank_module(r)).parameters
              if name == "transformer.wte.weight"]
    assert len(copies) == 2 and copies[0] is not copies[1]
    assert_plan_matches_model(entry.model, entry.args, {}, compiled, entry.main_output)


def test_skip_connection_is_relayed_through_middle_stages():
    model = build([("linear", 0), ("linear", 0), ("linear", 0), ("linear", 0), ("skip", 5)])
    x = torch.randn(4, 4, 8)
    compiled = autopart.compile(model, 4, example_inputs=(x,), pipeline_parallel=4, num_microbatches=2)
    # each middle stage passes the model input along rather than stage 0 sending it far
    for rank in range(1, 4):
        interface = autopart.core.interfaces.stage_interface(compiled.rank_module(rank))
        assert all(src.kind == "previous_stage" for src in interface.inputs)
    assert_plan_matches_model(model, (x,), {}, compiled, lambda out: out)


def test_buffers_stay_with_their_users():
    model = build([("linear", 0), ("buffer", 0), ("linear", 0)])
    x = torch.randn(2, 4, 8)
    compiled = autopart.compile(model, 3, example_inputs=(x,), pipeline_parallel=3)
    owners = [r for r in range(3) if any(name == "layers.1.scale" for _, name in
                                         autopart.core.interfaces.stage_interface(compiled.rank_module(r)).buffers)]
    assert len(owners) == 1
    assert_plan_matches_model(model, (x,), {}, compiled, lambda out: out)


def test_split_without_tuple_return_as_on_torch_2_11(monkeypatch):
    """torch 2.11's split_module returns a lone output bare; the pass restores tuples."""
    import autopart.passes.split as split_pass

    monkeypatch.setattr(split_pass, "_HAS_TUPLE_RETURN", False)
    entry = zoo.gpt2(layers=2)
    compiled = autopart.compile(entry.model, 3, example_inputs=entry.args, pipeline_parallel=3, num_microbatches=2)
    assert_plan_matches_model(entry.model, entry.args, {}, compiled, entry.main_output)
