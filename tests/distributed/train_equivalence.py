"""Run under torchrun: train a small model 3 steps on the plan and compare with one device.

Every rank also trains the single-device reference itself (same seed, same
data), so each can check its own parameters. Prints "OK rank R" on success.

    torchrun --nproc_per_node=N tests/distributed/train_equivalence.py --stages S --dp D --optimizer adam
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import autopart
from autopart import zoo

FWD = dict(rtol=1e-5, atol=1e-5)
WEIGHTS = dict(rtol=1e-5, atol=4e-5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="gpt")
    args = parser.parse_args()

    torch.manual_seed(0)
    entry = zoo.gpt(layers=4, d_model=32, heads=4, vocab=64, seq=8, batch=8) if args.model == "gpt" else \
        zoo.ALL_FAMILIES[args.model]()
    model = entry.model
    reference = copy.deepcopy(model)
    batches = [torch.randint(0, 64, (8, 8)) for _ in range(args.steps)]
    targets = [torch.randint(0, 64, (8, 8)) for _ in range(args.steps)]

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    compiled = autopart.compile(model, args.stages * args.dp, example_inputs=(batches[0],),
                                num_stages=args.stages, num_microbatches=args.microbatches,
                                schedule=args.schedule, data_parallel=args.dp)
    runner = compiled.distributed(timeout_s=60)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}
    optimizer = make[args.optimizer](runner.parameters())
    ref_optimizer = make[args.optimizer](reference.parameters())

    for step in range(args.steps):
        optimizer.zero_grad()
        loss = runner.step(batches[step], target=targets[step], loss_fn=loss_fn)
        optimizer.step()
        ref_optimizer.zero_grad()
        ref_loss = loss_fn(reference(batches[step]), targets[step])
        ref_loss.backward()
        ref_optimizer.step()
        torch.testing.assert_close(loss.cpu(), ref_loss.detach(), **FWD)
    final = {name: p.detach() for name, p in reference.named_parameters()}
    for name, tensor in runner.state_dict().items():
        if name in final:
            torch.testing.assert_close(tensor.cpu(), final[name], **WEIGHTS, msg=lambda m: f"{name}: {m}")
    out = runner(batches[0])
    torch.testing.assert_close(out.cpu(), reference(batches[0]), **FWD)
    print(f"OK rank {runner.rank} stage {runner.stage_index} loss {loss.item():.6f}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
