"""Plan GPT-2 (124M, random weights) for 8 H100s, then prove the plan on the CPU.

The plan is made for the cluster; the proof runs every rank of it in this one
process (`simulate`, `simulate_train_step`) and compares outputs, loss and the
gradient of every parameter with the single-device model.

    python examples/demo.py [--devices 8xH100] [--layers 12] [--html report.html]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import autopart
from autopart.verify import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="8xH100", help="cluster to plan for (default 8xH100)")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12: GPT-2 small)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--html", default="report.html", help="where to write the HTML report")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    print(f"GPT-2, {args.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; "
          f"batch {args.batch} x {args.seq} tokens; planning for {args.devices}\n")

    compiled = autopart.compile(model, args.devices, example_inputs=(ids,), verbose=True)
    print(compiled.report())
    compiled.save_html(args.html)
    print(f"\nHTML report: {args.html}")

    print("\nChecking the plan on the CPU (all ranks in this process) against the single-device model:")
    started = time.perf_counter()
    result = verify(compiled, model, (ids,))
    print(f"  forward equal (rtol 1e-5, atol 1e-5); max |diff| {result.max_output_diff:.2e}")
    print(f"  loss equal: {result.loss:.6f} vs {result.reference_loss:.6f}")
    print(f"  gradients of all {result.num_grads} parameters equal (rtol 1e-5, atol 4e-5); "
          f"max |diff| {result.max_grad_diff:.2e}")
    print(f"  checked in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
