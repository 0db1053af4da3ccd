"""Run under torchrun (2 ranks, gloo): how much the last pipeline stage holds during a training step.

A GPT with a large vocabulary (its logits dwarf everything else on the last stage) is cut in two
stages and trained one step with 1F1B and 4 microbatches; the last rank runs the step under a
tracking allocator (every storage an op creates, live until freed) and prints a JSON line with
the peak bytes above what was live before the step, one microbatch's output bytes, and the
stage's parameter bytes (its gradients appear during the step).

    torchrun --nproc_per_node=2 tests/distributed/last_stage_memory.py [--keep-outputs]

`--keep-outputs` runs the schedule as torch.distributed.pipelining does by default
(`return_outputs=True`: every microbatch's output kept to the step's end), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import autopart
from autopart import zoo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from memory_estimate import TrackingMode  # noqa: E402 - benchmarks/ holds the tracking allocator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--vocab", type=int, default=16384)
    args = parser.parse_args()
    torch.manual_seed(0)
    entry = zoo.gpt(layers=2, d_model=32, heads=2, vocab=args.vocab, seq=64, batch=8)
    microbatches = 4
    cm = autopart.compile(entry.model, 2, example_inputs=entry.args, pipeline_parallel=2,
                          num_microbatches=microbatches, schedule="1f1b", data_parallel=1, tensor_parallel=1)
    runner = cm.distributed(timeout_s=120)
    if args.keep_outputs:
        import autopart.runtime.distributed as distributed

        distributed.step_options = lambda: {}  # PyTorch's default: outputs returned, so kept
    target = torch.randint(0, args.vocab, entry.args[0].shape)

    def loss_fn(output, y):
        return F.cross_entropy(output.flatten(0, 1), y.flatten())

    runner.step(*entry.args, target=target, loss_fn=loss_fn)  # warm-up: buffers PipelineStage allocates once
    runner.zero_grad()
    with TrackingMode() as tracker:
        start = tracker.total
        runner.step(*entry.args, target=target, loss_fn=loss_fn)
        peak = tracker.peak - start
    if runner.is_last_stage:
        output_bytes = entry.args[0].shape[0] // microbatches * entry.args[0].shape[1] * args.vocab * 4
        print(json.dumps({"peak_bytes": peak, "output_bytes": output_bytes,
                          "param_bytes": sum(p.numel() * p.element_size() for p in runner.parameters()),
                          "predicted_activations": cm.plan.stages[-1].memory.activations,
                          "keep_outputs": args.keep_outputs}), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
