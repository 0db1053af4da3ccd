"""`autopart.verify.verify` fails a plan whose outputs differ from the model's in number,
structure, shape or dtype, and one that drops a parameter's gradient.

Each test compiles a small two-stage plan that verifies, then makes the plan's `simulate`
return something the model does not (a plan with a codegen bug would), and checks that
`verify` names the difference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autopart
from autopart.verify import verify


class TwoHeads(nn.Module):
    """Returns a tuple of two float outputs, so that one can go missing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head_a = nn.Linear(8, 4)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return self.head_a(h), self.head_b(h)


@pytest.fixture
def plan_and_model():
    model = TwoHeads()
    args = (torch.randn(4, 8),)
    compiled = autopart.compile(model, 2, example_inputs=args, pipeline_parallel=2, num_microbatches=2)
    return compiled, model, args


def _returning(monkeypatch, compiled, change) -> None:
    """Make `compiled.simulate` return `change(the true output)`."""
    real = compiled.simulate
    monkeypatch.setattr(compiled, "simulate", lambda *a, **k: change(real(*a, **k)))


def test_the_unchanged_plan_passes(plan_and_model):
    compiled, model, args = plan_and_model
    result = verify(compiled, model, args)
    assert result.num_grads == sum(1 for _ in model.parameters())


def test_fewer_outputs_fail(plan_and_model, monkeypatch):
    compiled, model, args = plan_and_model
    _returning(monkeypatch, compiled, lambda out: (out[0],))
    with pytest.raises(AssertionError, match="returns 1 output"):
        verify(compiled, model, args)


def test_no_outputs_fail(plan_and_model, monkeypatch):
    compiled, model, args = plan_and_model
    _returning(monkeypatch, compiled, lambda out: ())
    with pytest.raises(AssertionError, match="returns 0 output"):
        verify(compiled, model, args)


def test_another_structure_fails(plan_and_model, monkeypatch):
    compiled, model, args = plan_and_model
    _returning(monkeypatch, compiled, lambda out: {"a": out[0], "b": out[1]})
    with pytest.raises(AssertionError, match="structured as"):
        verify(compiled, model, args)


def test_another_shape_fails(plan_and_model, monkeypatch):
    compiled, model, args = plan_and_model
    _returning(monkeypatch, compiled, lambda out: (out[0].reshape(2, 8), out[1]))
    with pytest.raises(AssertionError, match=r"output 0: shape \(2, 8\), the model's \(4, 4\)"):
        verify(compiled, model, args)


def test_another_dtype_fails(plan_and_model, monkeypatch):
    compiled, model, args = plan_and_model
    _returning(monkeypatch, compiled, lambda out: (out[0], out[1].double()))
    with pytest.raises(AssertionError, match="output 1: dtype torch.float64, the model's torch.float32"):
        verify(compiled, model, args)


def test_a_missing_gradient_fails(plan_and_model, monkeypatch):
    compiled, model, args = plan_and_model
    real = compiled.simulate_train_step

    def without_head_b(*a, **k):
        loss, grads = real(*a, **k)
        return loss, {name: g for name, g in grads.items() if not name.startswith("head_b.")}

    monkeypatch.setattr(compiled, "simulate_train_step", without_head_b)
    with pytest.raises(AssertionError, match="no gradient for 2 parameter"):
        verify(compiled, model, args)
