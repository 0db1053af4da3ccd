"""Run under torchrun: train a small model 3 steps on the plan and compare with one device.

Every rank also trains the single-device reference itself (same seed, same
data), so each can check its own parameters. Prints "OK rank R" on success.

    torchrun --nproc_per_node=N tests/distributed/train_equivalence.py --stages S --dp D --optimizer adam
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F

import autopart
from autopart import zoo

FWD = dict(rtol=1e-5, atol=1e-5)
WEIGHTS = dict(rtol=1e-5, atol=4e-5)
# bf16 autocast: torch.testing's bf16 rtol (1.6e-2, two bf16 ulps of 2**-7) for losses; a
# pipeline or a tp group sums in another order than the one device (and microbatches change
# the matmul shapes), and each bf16 result rounds there too. The forward's bf16 logits are
# compared norm-wise with that rtol: each logit is a sum whose rounding error scales with its
# largest terms, so a logit that cancels to near 0 has no relative accuracy of its own.
# Weights after 3 SGD steps of lr 0.1: that rtol on updates that move them by about 1e-2,
# so an atol of 1e-3.
MIXED_FWD = dict(rtol=1.6e-2, atol=1e-2)
MIXED_WEIGHTS = dict(rtol=1.6e-2, atol=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel group size (Megatron layout)")
    parser.add_argument("--sequence-parallel", action="store_true", help="shard the residual stream on the "
                        "sequence between tp regions (Megatron-SP)")
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--virtual-stages", type=int, default=1, help="stages per pipeline rank")
    parser.add_argument("--dp-mode", choices=["ddp", "fsdp", "zero2", "zero3", "hsdp"],
                        help="how replicas synchronise (None: planner)")
    parser.add_argument("--hosts", type=int, default=1, help="pretend the processes sit on this many hosts "
                        "(consecutive ranks per host), for HSDP")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], help="activation recomputation "
                        "of every block (None: planner)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--compile-kernels", action="store_true", help="run the stages through torch.compile")
    parser.add_argument("--kernels-backend", default="aot_eager", help="torch.compile backend for --compile-kernels")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpoint", help="also check a save/load round trip in this directory")
    parser.add_argument("--fail-rank", type=int, help="this rank dies or hangs in the second step")
    parser.add_argument("--fail-mode", choices=["exit", "hang"], default="exit")
    parser.add_argument("--timeout", type=float, default=60.0, help="the runner's timeout_s")
    parser.add_argument("--mixed-precision", choices=["bf16"], help="plan bf16 autocast; the reference runs "
                        "in torch.autocast('cpu', bfloat16)")
    args = parser.parse_args()
    fwd_tol, weight_tol = (MIXED_FWD, MIXED_WEIGHTS) if args.mixed_precision else (FWD, WEIGHTS)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.mixed_precision else contextlib.nullcontext

    torch.manual_seed(0)
    # no q/k/v bias: the key bias's true gradient is 0, and Adam would amplify its float noise
    entry = zoo.gpt(layers=4, d_model=32, heads=4, vocab=64, seq=8, batch=8, attn_bias=False)
    model = entry.model
    reference = copy.deepcopy(model)
    batches = [torch.randint(0, 64, (8, 8)) for _ in range(args.steps)]
    targets = [torch.randint(0, 64, (8, 8)) for _ in range(args.steps)]

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    megatron = {"blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
                "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"}
    devices = args.stages * args.dp * args.tp
    cluster = devices if args.hosts == 1 else _hosts(devices, args.hosts)
    compiled = autopart.compile(model, cluster, example_inputs=(batches[0],),
                                pipeline_parallel=args.stages, num_microbatches=args.microbatches,
                                schedule=args.schedule, virtual_stages=args.virtual_stages,
                                data_parallel=args.dp, data_parallel_mode=args.dp_mode, tensor_parallel=args.tp,
                                tp_plan=megatron if args.tp > 1 else None, mixed_precision=args.mixed_precision,
                                recompute=args.recompute, sequence_parallel=True if args.sequence_parallel else None,
                                compile_kernels=args.compile_kernels)
    if args.sequence_parallel:
        assert compiled.plan.tensor_parallel.sequence_parallel, compiled.plan.tensor_parallel
    if args.recompute not in (None, "none"):
        assert any(m == args.recompute for s in compiled.plan.stages for m in s.recompute), compiled.plan.stages
    runner = compiled.distributed(timeout_s=args.timeout, kernels_backend=args.kernels_backend)
    if args.compile_kernels:
        assert runner.kernels is not None and runner.kernels.compiled, runner.kernels
    if compiled.plan.data_parallel_mode in ("zero3", "hsdp"):  # one FSDP unit per block, and the stage's
        from torch.distributed.fsdp import FSDPModule

        units = [m for stage in runner.pipeline_stages for m in stage.submod.modules() if isinstance(m, FSDPModule)]
        assert len(units) > 2, f"ZeRO-3 wraps every block: {len(units)} FSDP units"
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}
    optimizer = make[args.optimizer](runner.parameters())
    ref_optimizer = make[args.optimizer](reference.parameters())

    if args.fail_rank == runner.rank:
        _fail_in_second_step(runner, args.fail_mode)
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = runner.step(batches[step], target=targets[step], loss_fn=loss_fn)
        optimizer.step()
        ref_optimizer.zero_grad()
        with autocast():
            ref_loss = loss_fn(reference(batches[step]), targets[step])
        ref_loss.backward()
        ref_optimizer.step()
        torch.testing.assert_close(loss.cpu(), ref_loss.detach(), **fwd_tol)
    final = {name: p.detach() for name, p in reference.named_parameters()}
    full = runner.full_state_dict()  # tp slices merged, on rank 0
    if runner.rank == 0:
        for name, tensor in final.items():
            assert full[name].dtype == tensor.dtype, f"{name}: master weights {full[name].dtype}, not {tensor.dtype}"
            torch.testing.assert_close(full[name], tensor, **weight_tol, msg=lambda m: f"{name}: {m}")
    out = runner(batches[0])
    with autocast():
        expected = reference(batches[0])
    assert out.dtype == expected.dtype, f"output dtype {out.dtype}, eager autocast gives {expected.dtype}"
    if args.mixed_precision:  # bf16 logits: a logit is a cancelling sum, compared norm-wise (see MIXED_FWD)
        error = float((out.cpu().float() - expected.float()).norm() / expected.float().norm())
        assert error <= MIXED_FWD["rtol"], f"forward output off by {error:.2e} (norm-wise) from eager autocast"
    else:
        torch.testing.assert_close(out.cpu(), expected, **fwd_tol)
    if args.checkpoint:
        _check_checkpoint(runner, final, args.checkpoint)
    print(f"OK rank {runner.rank} stages {runner.stage_indices} {compiled.plan.schedule} "
          f"{compiled.plan.data_parallel_mode} loss {loss.item():.6f}", flush=True)
    torch.distributed.destroy_process_group()


def _hosts(devices: int, hosts: int):
    """`devices` CPU processes on `hosts` hosts of equal size (consecutive ranks per host)."""
    from autopart.cost_models import Cluster, get_preset
    from autopart.cost_models.links import LOOPBACK

    return Cluster(devices=(get_preset("cpu"),) * devices, node_of_device=tuple(i * hosts // devices for i in range(devices)),
                   intra_node_link=LOOPBACK, inter_node_link=LOOPBACK)


def _check_checkpoint(runner, final: dict[str, torch.Tensor], directory: str) -> None:
    """Full state dict on rank 0, save/load bit-exact, and a mismatching checkpoint refused."""
    full = runner.full_state_dict()
    if runner.rank == 0:
        assert set(full) >= set(final), sorted(set(final) - set(full))[:3]
    saved = {k: v.clone() for k, v in runner.state_dict().items()}
    runner.save(directory)
    with torch.no_grad():
        for param in runner.parameters():
            param.add_(1.0)
    runner.load(directory)
    for name, tensor in runner.state_dict().items():
        assert torch.equal(tensor, saved[name]), f"{name} not bit-exact after save/load"
    bad = {k: v.cpu() for k, v in saved.items()}
    name = next(iter(bad))
    bad[name] = bad[name][..., :1]
    try:
        runner.load_full_state_dict(bad)
    except autopart.InputError as error:
        assert name in str(error) and "shape" in str(error), error
    else:
        raise AssertionError("a checkpoint of the wrong shape was accepted")
    print(f"CHECKPOINT OK rank {runner.rank}", flush=True)


def _fail_in_second_step(runner, mode: str) -> None:
    """Make this rank die (exit) or hang (sleep) in its second forward."""
    import os
    import time

    calls = {"n": 0}
    adapter = runner.adapters[0]
    original = adapter.forward

    def forward(*args):
        calls["n"] += 1
        if calls["n"] == runner.plan.num_microbatches + 1:
            if mode == "exit":
                os._exit(17)
            time.sleep(3600)
        return original(*args)

    adapter.forward = forward


if __name__ == "__main__":
    main()
