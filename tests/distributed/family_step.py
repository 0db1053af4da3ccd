"""Run under torchrun: one training step of a model family through `cm.distributed()`, against eager.

Every rank checks the step's loss and the gradient of every parameter its stages hold against
the same model trained eagerly on the same device (CPU under gloo, or the rank's GPU), in float32
or, with --mixed-precision bf16, in `torch.autocast(bfloat16)`. Prints "OK rank R".

    torchrun --nproc_per_node=2 tests/distributed/family_step.py --family t5 --schedule interleaved_1f1b --virtual-stages 2
    torchrun --nproc_per_node=1 tests/distributed/family_step.py --family llama --stages 1 --mixed-precision bf16

Tolerances. float32: loss rtol 1e-5 / atol 1e-5, gradients rtol 1e-5 / atol 4e-5 (PyTorch's
pipelining tests), TF32 off so that both sides compute in true float32. bf16: the loss within
torch.testing's bf16 rtol (1.6e-2, two bf16 ulps), and each gradient within that rtol norm-wise
(‖g − g_eager‖ ≤ 1.6e-2 max(‖g_eager‖, 1% of the largest gradient norm)): microbatches change matmul shapes, so bf16 sums round in
another order, and a gradient element that cancels to near 0 keeps no relative accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch

import autopart
from autopart import zoo

FWD = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-5, atol=4e-5)
BF16_RTOL = 1.6e-2
# A gradient whose true value is ~0 (a key bias: softmax is shift invariant) is pure rounding
# noise of terms as large as the layer's other gradients; its error is measured against 1% of
# the largest gradient norm instead of its own.
BF16_GRAD_FLOOR = 1e-2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True, choices=sorted(zoo.ALL_FAMILIES))
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--virtual-stages", type=int, default=1)
    parser.add_argument("--stages", type=int, default=2, help="pipeline ranks (torchrun's process count)")
    parser.add_argument("--mixed-precision", choices=["bf16"])
    parser.add_argument("--recompute", choices=["none", "selective", "full"])
    parser.add_argument("--compile-kernels", action="store_true", help="run every rank's stage through torch.compile")
    parser.add_argument("--kernels-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="tp group size (stages = ranks / tp)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    entry = zoo.ALL_FAMILIES[args.family](layers=4, batch=4)
    kwargs = entry.kwargs or {}

    def loss_fn(output, _target):
        return entry.main_output(output).float().pow(2).mean()

    tp = args.tensor_parallel
    compiled = autopart.compile(entry.model, args.stages, example_inputs=entry.args, example_kwargs=kwargs or None,
                                pipeline_parallel=args.stages // tp, num_microbatches=2, schedule=args.schedule,
                                virtual_stages=args.virtual_stages, mixed_precision=args.mixed_precision,
                                recompute=args.recompute, compile_kernels=args.compile_kernels,
                                tensor_parallel=tp, data_parallel=1)
    runner = compiled.distributed(timeout_s=600, kernels_backend=args.kernels_backend)
    device = runner.device
    reference = copy.deepcopy(entry.model).to(device)
    on_device = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    ref_args, ref_kwargs = [on_device(x) for x in entry.args], {k: on_device(v) for k, v in kwargs.items()}
    loss = runner.step(*entry.args, target=None, loss_fn=loss_fn, **kwargs)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.mixed_precision
                else contextlib.nullcontext())
    with autocast:
        ref_loss = loss_fn(reference(*ref_args, **ref_kwargs), None)
    ref_loss.backward()
    if args.mixed_precision:
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=BF16_RTOL, atol=0.0)
    else:
        torch.testing.assert_close(loss, ref_loss.detach(), **FWD)
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    checked, worst = 0, 0.0
    floor = BF16_GRAD_FLOOR * max(float(g.norm()) for g in expected.values())  # see BF16_GRAD_FLOOR
    for module, interface in runner.local_stages:
        for path, name in interface.parameters:
            grad = module.get_parameter(path).grad
            if name not in expected:
                continue
            assert grad is not None, f"{name}: no gradient on rank {runner.rank}"
            assert grad.dtype == expected[name].dtype, f"{name}: gradient in {grad.dtype}, eager {expected[name].dtype}"
            if args.mixed_precision:
                error = float((grad - expected[name]).norm() / max(float(expected[name].norm()), floor))
                worst = max(worst, error)
                assert error <= BF16_RTOL, f"{name}: gradient off by {error:.2e} norm-wise (bf16 rtol {BF16_RTOL})"
            else:
                torch.testing.assert_close(grad, expected[name], **GRAD, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked > 0, "no parameter was checked"
    print(f"OK rank {runner.rank} {args.family} {args.schedule} v={args.virtual_stages} on {device.type} "
          f"{args.mixed_precision or 'fp32'}" + (f" recompute {args.recompute}" if args.recompute else "")
          + (f" tp {tp}" if tp > 1 else "")
          + (f" compiled ({runner.kernels.summary()})" if runner.kernels is not None else "") + ": "
          f"{checked} gradients, loss {loss.item():.6f} vs {ref_loss.item():.6f}"
          + (f", worst gradient error {worst:.2e}" if args.mixed_precision else ""), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
