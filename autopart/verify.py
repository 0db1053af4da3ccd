"""Check a compiled plan against the single-device model, numerically, on this machine.

`verify` runs every rank of the plan in one process (`simulate`,
`simulate_train_step`) and the model itself, and compares the forward output,
the loss and the gradient of every parameter with float32 tolerances
(PyTorch's pipelining tests): forward rtol 1e-5 / atol 1e-5, gradients rtol
1e-5 / atol 4e-5. The loss is the mean square of every floating-point output,
so any model can be checked without knowing its task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

FORWARD_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
GRADIENT_TOLERANCE = dict(rtol=1e-5, atol=4e-5)


@dataclass(frozen=True, kw_only=True)
class Verification:
    """What the check measured."""

    max_output_diff: float
    loss: float
    reference_loss: float
    max_grad_diff: float
    num_grads: int


def _float_leaves(output: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _loss(output: Any, _target: Any = None) -> torch.Tensor:
    return sum(x.float().pow(2).mean() for x in _float_leaves(output))


def verify(compiled, model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Verification:
    """Raise AssertionError (naming the tensor) if the plan differs from the model; else the figures."""
    kwargs = dict(kwargs or {})
    model.eval()  # dropout off in both runs
    expected = _float_leaves(model(*args, **kwargs))
    got = _float_leaves(compiled.simulate(*args, **kwargs))
    worst_out = 0.0
    for k, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, **FORWARD_TOLERANCE, msg=lambda m: f"output {k}: {m}")
        worst_out = max(worst_out, (a - b).abs().max().item())
    loss, grads = compiled.simulate_train_step(*args, target=None, loss_fn=_loss, **kwargs)
    model.zero_grad()
    reference = _loss(model(*args, **kwargs))
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), **FORWARD_TOLERANCE)
    worst_grad = 0.0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        torch.testing.assert_close(grads[name], param.grad, **GRADIENT_TOLERANCE, msg=lambda m: f"{name}: {m}")
        worst_grad = max(worst_grad, (grads[name] - param.grad).abs().max().item())
    return Verification(max_output_diff=worst_out, loss=loss.item(), reference_loss=reference.item(),
                        max_grad_diff=worst_grad, num_grads=len(grads))
