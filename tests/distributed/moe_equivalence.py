"""Run under torchrun: train a small HF Mixtral 3 steps with expert parallelism and compare with one device.

Every rank trains the single-device reference itself (same seed, same data) and checks each step's
loss and gradient norm; rank 0 checks the gathered final weights (expert blocks merged along the expert
dim). Under zero2/zero3 with several replicas per expert block (edp > 1) the blocks are FSDP shards
over edp, and the script checks that they are.
Prints "OK rank R" on success.

    torchrun --nproc_per_node=4 tests/distributed/moe_equivalence.py --ep 2 --dp 2 --stages 2 --optimizer adam
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import autopart

FWD = dict(rtol=1e-5, atol=1e-5)
WEIGHTS = dict(rtol=1e-5, atol=4e-5)
BF16_RTOL = 1.6e-2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep", type=int, required=True)
    parser.add_argument("--dp", type=int, required=True)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--dp-mode", default="ddp")
    parser.add_argument("--optimizer", default="adam", choices=["sgd", "adam"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed-precision", action="store_true",
                        help="bf16: compare with eager autocast whose grouped expert matmuls take bf16 operands, "
                             "at bf16 tolerances (tests/test_expert_precision.py)")
    args = parser.parse_args()

    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=64,
                           max_position_embeddings=16)
    model = MixtralForCausalLM(config)
    reference = copy.deepcopy(model)
    batch = 4 * args.dp
    batches = [torch.randint(0, 64, (batch, 8)) for _ in range(args.steps)]
    targets = [torch.randint(0, 64, (batch, 8)) for _ in range(args.steps)]

    def loss_fn(output, target):
        logits = output.logits if hasattr(output, "logits") else output
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    compiled = autopart.compile(model, args.stages * args.dp, example_inputs=(batches[0],),
                                pipeline_parallel=args.stages, data_parallel=args.dp, expert_parallel=args.ep,
                                num_microbatches=args.microbatches, tensor_parallel=1,
                                data_parallel_mode=args.dp_mode,
                                mixed_precision="bf16" if args.mixed_precision else None)
    tolerances = dict(rtol=BF16_RTOL, atol=0.0) if args.mixed_precision else FWD
    if args.mixed_precision:  # the reference: eager autocast, the experts' matmuls on bf16 operands
        from transformers.integrations import moe as hf_moe

        hf_moe._grouped_mm = lambda x, w, offs: torch.ops.transformers.grouped_mm_fallback(
            x.to(torch.bfloat16), w.to(torch.bfloat16), offs=offs)
    assert compiled.plan.mesh.ep == args.ep, compiled.plan.mesh
    runner = compiled.distributed(timeout_s=120)
    experts = runner.expert_parameters()
    assert experts and all(p.shape[0] == config.num_local_experts // args.ep for p in experts), \
        [tuple(p.shape) for p in experts]
    edp = args.dp // args.ep
    if args.dp_mode in ("zero2", "zero3") and edp > 1:  # ZeRO of the expert blocks over edp
        local = [p.to_local() for p in experts]
        assert all(t.shape[0] == config.num_local_experts // args.ep // edp for t in local), \
            [tuple(t.shape) for t in local]
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}
    optimizer = make[args.optimizer](runner.parameters())
    ref_optimizer = make[args.optimizer](reference.parameters())
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = runner.step(batches[step], target=targets[step], loss_fn=loss_fn)
        norm = runner.clip_grad_norm_(0.5)  # over every expert block of the ep group
        optimizer.step()
        ref_optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision):
            ref_loss = loss_fn(reference(batches[step]), targets[step])
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_optimizer.step()
        torch.testing.assert_close(norm.cpu(), ref_norm, **tolerances)
        torch.testing.assert_close(loss.cpu(), ref_loss.detach(), **tolerances)
    full = runner.full_state_dict()
    if runner.rank == 0:
        for name, tensor in reference.named_parameters():
            if args.mixed_precision:  # norm-wise, as every bf16 comparison of the project
                error = float((full[name] - tensor.detach()).norm() / tensor.detach().norm())
                assert error <= BF16_RTOL, f"{name}: weights off by {error:.2e} norm-wise"
            else:
                torch.testing.assert_close(full[name], tensor.detach(), **WEIGHTS, msg=lambda m: f"{name}: {m}")
    print(f"OK rank {runner.rank} stages {runner.stage_indices} ep {args.ep} dp {args.dp} loss {loss.item():.6f}",
          flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
