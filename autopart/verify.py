"""Check a compiled plan against the single-device model, numerically, on this machine.

`verify` runs every rank of the plan in one process (`simulate`,
`simulate_train_step`) and the model itself, and compares the forward output,
the loss and the gradient of every parameter with float32 tolerances
(PyTorch's pipelining tests): forward rtol 1e-5 / atol 1e-5, gradients rtol
1e-5 / atol 4e-5. The loss is the mean square of every floating-point output,
so any model can be checked without knowing its task.

A plan with bf16 mixed precision is checked against the model under eager
`torch.autocast(bfloat16)`: loss within torch.testing's bf16 rtol (1.6e-2),
outputs and gradients norm-wise within it, ‖x − x_eager‖ ≤ 1.6e-2 ‖x_eager‖
(another microbatch split or tp group sums in another order, and every bf16
result rounds there; tests/test_mixed_precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import contextlib
import functools

import torch
import torch.utils._pytree as pytree

FORWARD_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
GRADIENT_TOLERANCE = dict(rtol=1e-5, atol=4e-5)
BF16_RTOL = 1.6e-2
"""torch.testing's bf16 rtol, norm-wise for outputs and gradients under mixed precision."""


@dataclass(frozen=True, kw_only=True)
class Verification:
    """What the check measured."""

    max_output_diff: float
    """Largest |difference| of an output element (mixed precision: the worst norm-wise relative error)."""
    loss: float
    reference_loss: float
    max_grad_diff: float
    """Largest |difference| of a gradient element (mixed precision: the worst norm-wise relative error)."""
    num_grads: int


def _float_leaves(output: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _loss(output: Any, _target: Any = None) -> torch.Tensor:
    return sum(x.float().pow(2).mean() for x in _float_leaves(output))


def verify(compiled, model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Verification:
    """Raise AssertionError (naming the tensor) if the plan differs from the model; else the figures."""
    kwargs = dict(kwargs or {})
    # the model as autopart traced it: with the keywords tracing set (use_cache=False), whose outputs
    # the plan returns, so that every output can be compared
    model_kwargs = {**dict(compiled.io.default_kwargs), **kwargs}
    mixed = compiled.plan.mixed_precision is not None
    eager = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mixed else contextlib.nullcontext
    # mixed precision: one norm-wise bound for outputs and gradients; float32: elementwise, each its own
    check_output = _close_norm_wise if mixed else functools.partial(_close, tolerance=FORWARD_TOLERANCE)
    check_gradient = _close_norm_wise if mixed else functools.partial(_close, tolerance=GRADIENT_TOLERANCE)
    model.eval()  # dropout off in both runs
    with eager():
        reference_output = model(*args, **model_kwargs)
    expected = _float_leaves(reference_output)
    got = _float_leaves(_same_structure(compiled.simulate(*args, **kwargs), reference_output))
    worst_out = max((check_output(a, b, f"output {k}") for k, (a, b) in enumerate(zip(got, expected))),
                    default=0.0)
    loss, grads = compiled.simulate_train_step(*args, target=None, loss_fn=_loss, **kwargs)
    model.zero_grad()
    with eager():
        reference = _loss(model(*args, **model_kwargs))
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), **(dict(rtol=BF16_RTOL, atol=0.0) if mixed
                                                            else FORWARD_TOLERANCE))
    expected_grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    missing = sorted(set(expected_grads) - set(grads))
    assert not missing, (f"the plan returns no gradient for {len(missing)} parameter(s) the model trains, "
                         f"first {missing[0]!r}")
    worst_grad = max((check_gradient(grads[name], grad, name) for name, grad in expected_grads.items()),
                     default=0.0)
    return Verification(max_output_diff=worst_out, loss=loss.item(), reference_loss=reference.item(),
                        max_grad_diff=worst_grad, num_grads=len(grads))


def _same_structure(got: Any, expected: Any) -> Any:
    """`got` if it has `expected`'s structure (the same containers, keys and number of leaves) and
    every tensor leaf its shape and dtype, and every other leaf is equal; else AssertionError naming
    the first difference. Values are compared afterwards, within the tolerances."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    assert len(got_leaves) == len(expected_leaves), (
        f"the plan returns {len(got_leaves)} output(s), the model {len(expected_leaves)}")
    assert got_spec == expected_spec, (
        f"the plan's output is structured as {got_spec}, the model's as {expected_spec}")
    for k, (a, b) in enumerate(zip(got_leaves, expected_leaves)):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"output {k}: the plan returns {type(a).__name__}, the model a tensor"
            assert a.shape == b.shape, f"output {k}: shape {tuple(a.shape)}, the model's {tuple(b.shape)}"
            assert a.dtype == b.dtype, f"output {k}: dtype {a.dtype}, the model's {b.dtype}"
        else:
            assert type(a) is type(b) and a == b, f"output {k}: {a!r}, the model's {b!r}"
    return got


def _close(got: torch.Tensor, expected: torch.Tensor, what: str, *, tolerance: dict) -> float:
    """float32: elementwise within `tolerance`; the largest |difference|."""
    torch.testing.assert_close(got, expected, **tolerance, msg=lambda m: f"{what}: {m}")
    return (got - expected).detach().abs().max().item() if got.numel() else 0.0


def _close_norm_wise(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """bf16 mixed precision: ‖got − expected‖ ≤ BF16_RTOL ‖expected‖ (in float32); the relative error."""
    got, expected = got.detach().float(), expected.detach().float()
    error = float((got - expected).norm() / max(float(expected.norm()), 1e-30))
    assert error <= BF16_RTOL, f"{what}: off by {error:.2e} norm-wise (bf16 rtol {BF16_RTOL})"
    return error
