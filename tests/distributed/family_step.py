"""Run under torchrun: one training step of a model family on a 2-rank pipeline, against one device.

Every rank checks the step's loss (rtol 1e-5 / atol 1e-5) and the gradient of every parameter its
stages hold (rtol 1e-5 / atol 4e-5) against the model trained on one device. Prints "OK rank R".

    torchrun --nproc_per_node=2 tests/distributed/family_step.py --family t5 --schedule interleaved_1f1b --virtual-stages 2
"""

from __future__ import annotations

import argparse
import copy

import torch

import autopart
from autopart import zoo

FWD = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-5, atol=4e-5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True, choices=sorted(zoo.ALL_FAMILIES))
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--virtual-stages", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    entry = zoo.ALL_FAMILIES[args.family](layers=4, batch=4)
    reference = copy.deepcopy(entry.model)
    kwargs = entry.kwargs or {}

    def loss_fn(output, _target):
        return entry.main_output(output).float().pow(2).mean()

    compiled = autopart.compile(entry.model, 2, example_inputs=entry.args, example_kwargs=kwargs or None,
                                pipeline_parallel=2, num_microbatches=2, schedule=args.schedule,
                                virtual_stages=args.virtual_stages)
    runner = compiled.distributed(timeout_s=120)
    loss = runner.step(*entry.args, target=None, loss_fn=loss_fn, **kwargs)
    ref_loss = loss_fn(reference(*entry.args, **kwargs), None)
    ref_loss.backward()
    torch.testing.assert_close(loss.cpu(), ref_loss.detach(), **FWD)
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    checked = 0
    for module, interface in runner.local_stages:
        for path, name in interface.parameters:
            grad = module.get_parameter(path).grad
            if name in expected:
                assert grad is not None, f"{name}: no gradient on rank {runner.rank}"
                torch.testing.assert_close(grad, expected[name], **GRAD, msg=lambda m: f"{name}: {m}")
                checked += 1
    assert checked > 0, "no parameter was checked"
    print(f"OK rank {runner.rank} {args.family} {args.schedule} v={args.virtual_stages}: {checked} gradients",
          flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
