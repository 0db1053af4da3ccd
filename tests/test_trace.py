"""The tracer captures each model family equal to eager, forward and backward."""

from __future__ import annotations

import re

import pytest
import torch

import autopart
from autopart import zoo
from autopart.frontend.tracing import flatten_inputs, io_spec


def _run_graph(gm, entry):
    return gm(*entry.args, **entry.kwargs)


@pytest.mark.parametrize("family", sorted(zoo.ALL_FAMILIES))
def test_trace_matches_eager_forward_and_backward(family):
    entry = zoo.ALL_FAMILIES[family]()
    model = entry.model
    gm = autopart.trace(model, entry.args, entry.kwargs)

    assert io_spec(gm).tracer == "export"
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node.name
        if node.op == "call_function":
            assert "nn_module_stack" in node.meta, node.name
    # parameter names map back to the model's own
    model_names = {name for name, _ in model.named_parameters()}
    graph_names = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert model_names <= graph_names | _tied_aliases(model)

    out_graph = entry.main_output(_run_graph(gm, entry))
    out_graph.pow(2).mean().backward()
    graph_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out_eager = entry.main_output(model(*entry.args, **entry.kwargs))
    out_eager.pow(2).mean().backward()

    torch.testing.assert_close(out_graph, out_eager, rtol=1e-5, atol=1e-5)
    assert graph_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(graph_grads[name], param.grad, rtol=1e-5, atol=4e-5, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5", "mlp"])
def test_traced_module_is_called_as_the_model_is(family):
    """autopart.trace's GraphModule takes the model's own arguments (an HF model without the use_cache
    keyword autopart adds at trace time) and returns the model's own output, as torch.export's
    ep.module() does; its graph stays flat for the passes."""
    entry = zoo.ALL_FAMILIES[family]()
    gm = autopart.trace(entry.model, entry.args, entry.kwargs)
    eager = entry.model(*entry.args, **entry.kwargs)
    got = gm(*entry.args, **entry.kwargs)
    assert type(got) is type(eager)
    torch.testing.assert_close(entry.main_output(got), entry.main_output(eager), rtol=1e-5, atol=1e-5)
    flat = torch.fx.Interpreter(gm).run(*flatten_inputs(gm, entry.args, entry.kwargs))
    assert isinstance(flat, tuple)
    torch.testing.assert_close(entry.main_output(io_spec(gm).unflatten(flat)), entry.main_output(eager),
                               rtol=1e-5, atol=1e-5)


def _tied_aliases(model):
    """Names under which a tied parameter is reachable besides its first name."""
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


def test_no_grad_region_is_inlined_for_llama():
    entry = zoo.llama()
    gm = autopart.trace(entry.model, entry.args)
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    assert not any(n.target is hop for n in gm.graph.nodes if n.op == "call_function")
    assert not any(isinstance(m, torch.fx.GraphModule) for m in gm.children())


def test_untraceable_model_names_class_line_and_fix():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    with pytest.raises(autopart.TraceError) as info:
        autopart.trace(DataDependent(), (torch.randn(3),))
    message = str(info.value)
    assert "DataDependent" in message
    assert "test_trace.py" in message and "if x.sum() > 0" in message
    assert "torch.export" in message and "symbolic_trace" in message
    assert "fix:" in message


def test_wrong_input_shape_says_the_model_raised_with_its_own_message(capfd):
    """Linear(16) fed 3 features: one TraceError quoting the model's own error, no advice about
    control flow, and no pages of fake-tensor logs on stderr."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    for run in (lambda: autopart.trace(model, (torch.randn(8, 3),)),
                lambda: autopart.compile(model, 2, example_inputs=(torch.randn(8, 3),))):
        with pytest.raises(autopart.TraceError) as info:
            run()
        message = str(info.value)
        assert "Sequential raises on the example inputs" in message
        assert re.search(r"mat1 and mat2 shapes cannot be multiplied \(\dx3 and 16x4\)", message)
        assert "control flow" not in message
    err = capfd.readouterr().err
    assert "fake_tensor" not in err and "Traceback" not in err


def test_unsupported_input_type_is_named():
    class Takes(torch.nn.Module):
        def forward(self, x, extra):
            return x

    with pytest.raises(autopart.TraceError, match=r"\(args, kwargs\)\[0\]\[1\].*object"):
        autopart.trace(Takes(), (torch.randn(2), object()))


def test_inputs_without_tensors_are_refused():
    with pytest.raises(autopart.TraceError, match="no tensor"):
        autopart.trace(torch.nn.Identity(), (3,))


def test_non_module_is_refused():
    with pytest.raises(autopart.TraceError, match="nn.Module"):
        autopart.trace(lambda x: x, (torch.randn(2),))


def test_symbolic_trace_fallback_when_export_fails(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("export refused this model")

    monkeypatch.setattr(torch.export, "export", refuse)
    entry = zoo.mlp()
    gm = autopart.trace(entry.model, entry.args)
    assert io_spec(gm).tracer == "symbolic_trace"
    assert all("val" in n.meta for n in gm.graph.nodes if n.op != "output")
    torch.testing.assert_close(_run_graph(gm, entry), entry.model(*entry.args), rtol=1e-5, atol=1e-5)
