"""One GPU: training steps through autopart's runner against the plain PyTorch loop, and the
planner's predicted step time and peak memory against the measured ones.

    torchrun --nproc_per_node=1 benchmarks/single_gpu_step.py [--cases all] [--out results.json]

Cases (sequence 1024; `--cases` takes a comma-separated subset of the names):

| name | model | precision | optimizer | batch |
|---|---|---|---|---|
| gpt12-fp32 | zoo GPT 12×1024 | float32 | AdamW | 8 |
| gpt24-fp32 | zoo GPT 24×2048 | float32 | AdamW | 4 |
| gpt24-bf16 | zoo GPT 24×2048 | model.to(bfloat16) | SGD | 16 |
| gpt24-mixed | zoo GPT 24×2048 | float32 weights, bf16 autocast | AdamW | 8 |
| llama-bf16 | HF Llama 16×2048 (1.1B) | model.to(bfloat16) | AdamW | 8 |
| llama-mixed | HF Llama 16×2048 (1.1B) | float32 weights, bf16 autocast | AdamW | 8 |

Eager runs the model as a user would (`torch.autocast("cuda", bfloat16)` around forward and
loss for the mixed cases); autopart compiles it for this one device (`mixed_precision="bf16"`
for the mixed cases) and runs `cm.distributed()`. Each side: `--warmup` steps, then the median
of `--steps` timed steps (synchronised), and `torch.cuda.max_memory_allocated` over all of
them. The table gives seconds per step, autopart / eager tokens/s, and predicted / measured
step time and peak memory. On a CPU it measures the CPU (tiny shapes with `--tiny`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

import autopart
from autopart import zoo


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    """'gpt' (autopart.zoo.gpt), 'llama' (transformers' LlamaForCausalLM) or 'mixtral'
    (MixtralForCausalLM: 8 experts, top-2, expert width 2048; benchmarks/moe_step.py)."""
    layers: int
    d_model: int
    batch: int
    optimizer: str
    precision: str
    """'fp32', 'bf16' (the model cast to bfloat16) or 'mixed' (float32 weights, bf16 autocast)."""


CASES = [
    Case("gpt12-fp32", "gpt", 12, 1024, 8, "adamw", "fp32"),
    Case("gpt24-fp32", "gpt", 24, 2048, 4, "adamw", "fp32"),
    Case("gpt24-bf16", "gpt", 24, 2048, 16, "sgd", "bf16"),
    Case("gpt24-mixed", "gpt", 24, 2048, 8, "adamw", "mixed"),
    Case("llama-bf16", "llama", 16, 2048, 8, "adamw", "bf16"),
    Case("llama-mixed", "llama", 16, 2048, 8, "adamw", "mixed"),
]
VOCAB = {"gpt": 50304, "llama": 32000, "mixtral": 32000}


def build(case: Case, seq: int) -> torch.nn.Module:
    if case.family == "gpt":
        model = zoo.gpt(layers=case.layers, d_model=case.d_model, heads=16, vocab=VOCAB["gpt"], seq=seq,
                        batch=1, attn_bias=False).model
    elif case.family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(vocab_size=VOCAB["mixtral"], hidden_size=case.d_model, intermediate_size=2048,
                               num_hidden_layers=case.layers, num_attention_heads=32, num_key_value_heads=8,
                               num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=seq)
        model = MixtralForCausalLM(config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=VOCAB["llama"], hidden_size=case.d_model, intermediate_size=5632,
                             num_hidden_layers=case.layers, num_attention_heads=32, num_key_value_heads=4,
                             max_position_embeddings=seq, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16) if case.precision == "bf16" else model


def logits_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def loss_fn(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(output).flatten(0, 1).float(), target.flatten())


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())


def timed(step: Callable[[], None], steps: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def free_memory(gpu: bool) -> None:
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    peak = (lambda: torch.cuda.max_memory_allocated()) if gpu else (lambda: 0)
    torch.manual_seed(0)
    model = build(case, args.seq)
    vocab = VOCAB[case.family]
    ids = torch.randint(0, vocab, (case.batch, args.seq))
    target = torch.randint(0, vocab, (case.batch, args.seq))
    mixed = case.precision == "mixed"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mixed else contextlib.nullcontext

    free_memory(gpu)
    eager = copy.deepcopy(model).to(device)
    optimizer = make_optimizer(case.optimizer, eager.parameters())
    ids_d, target_d = ids.to(device), target.to(device)

    def eager_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(eager(ids_d), target_d)
        loss.backward()
        optimizer.step()

    eager_s = timed(eager_step, args.steps, args.warmup, sync)
    eager_peak = peak()
    phases = eager_phases(eager, optimizer, lambda: loss_fn(eager(ids_d), target_d), autocast, gpu)
    del eager, optimizer
    free_memory(gpu)

    started = time.perf_counter()
    options = dict(example_inputs=(ids,), optimizer=case.optimizer, num_microbatches=1,
                   mixed_precision="bf16" if mixed else None)
    compiled = autopart.compile(model, [device] if gpu else 1, **options)
    compile_s = time.perf_counter() - started
    calibrated = autopart.compile(model, args.cluster, **options).plan if args.cluster else None
    runner = compiled.distributed(timeout_s=900)
    runner_optimizer = make_optimizer(case.optimizer, runner.parameters())

    def autopart_step() -> None:
        runner_optimizer.zero_grad(set_to_none=True)
        runner.step(ids, target=target, loss_fn=loss_fn)
        runner_optimizer.step()

    autopart_s = timed(autopart_step, args.steps, args.warmup, sync)
    autopart_peak = peak()
    stage = compiled.plan.stages[0]
    result = {
        "case": case.name, "params": sum(p.numel() for p in model.parameters()), "batch": case.batch,
        "seq": args.seq, "optimizer": case.optimizer, "precision": case.precision,
        "eager_s": eager_s, "autopart_s": autopart_s, "speed_ratio": eager_s / autopart_s,
        "predicted_s": compiled.plan.predicted_step_seconds,
        "predicted_over_measured_s": compiled.plan.predicted_step_seconds / autopart_s,
        "eager_peak_bytes": eager_peak, "autopart_peak_bytes": autopart_peak,
        "predicted_peak_bytes": stage.memory.total,
        "predicted_over_measured_peak": stage.memory.total / autopart_peak if autopart_peak else None,
        "predicted_memory": {k: getattr(stage.memory, k) for k in
                             ("params", "grads", "optimizer", "buffers", "activations", "boundary")},
        "compile_s": compile_s, "plan": {"mesh": str(compiled.plan.mesh), "schedule": compiled.plan.schedule},
        "eager_phases_bytes": phases,
    }
    if calibrated is not None:
        result["calibrated_predicted_s"] = calibrated.predicted_step_seconds
        result["calibrated_predicted_over_measured_s"] = calibrated.predicted_step_seconds / autopart_s
    del runner, runner_optimizer, compiled, model
    free_memory(gpu)
    return result


def eager_phases(model, optimizer, loss_of: Callable[[], torch.Tensor], autocast, gpu: bool) -> dict[str, int]:
    """Peak bytes of one more eager step, phase by phase (allocated at the start of each phase, and the
    peak within it): where the step's peak lies, against the planner's stage memory."""
    if not gpu:
        return {}
    out: dict[str, int] = {}
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    out["start"] = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with autocast():
        loss = loss_of()
    torch.cuda.synchronize()
    out["forward_peak"], out["forward_end"] = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    out["backward_peak"], out["backward_end"] = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    torch.cuda.synchronize()
    out["optimizer_peak"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="all", help="comma-separated case names, or 'all'")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2-layer d 128 models, sequence 64 (CPU smoke run)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--cluster", help="also predict with this saved Cluster (autopart.calibrate() JSON)")
    args = parser.parse_args()
    cases = CASES if args.cases == "all" else [c for c in CASES if c.name in args.cases.split(",")]
    if args.tiny:
        cases = [Case(c.name, c.family, 2, 128, 2, c.optimizer, c.precision) for c in cases]
        args.seq = 64
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    results = []
    for case in cases:
        try:
            results.append(run_case(case, args, device))
        except Exception as error:  # noqa: BLE001 - a failing case is reported, the others still run
            results.append({"case": case.name, "error": f"{type(error).__name__}: {str(error)[:500]}"})
            free_memory(device.type == "cuda")
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{name}, torch {torch.__version__}, sequence {args.seq}")
    print(f"{'case':<13}{'params':>8}{'eager s':>9}{'autopart s':>11}{'speed':>7}{'pred/meas s':>12}"
          f"{'peak GiB':>9}{'pred/meas mem':>14}")
    if args.cluster:
        print(f"(predicted with the calibrated cluster {args.cluster}: "
              + ", ".join(f"{r['case']} {r['calibrated_predicted_over_measured_s']:.3f}"
                          for r in results if "calibrated_predicted_over_measured_s" in r) + ")")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<13} failed: {r['error'][:100]}")
            continue
        ratio = r["predicted_over_measured_peak"]
        ratio = "-" if ratio is None else f"{ratio:.3f}"
        print(f"{r['case']:<13}{r['params'] / 1e6:>7.0f}M{r['eager_s']:>9.4f}{r['autopart_s']:>11.4f}"
              f"{r['speed_ratio']:>7.3f}{r['predicted_over_measured_s']:>12.3f}{r['autopart_peak_bytes'] / 2**30:>9.2f}"
              f"{ratio:>14}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": name, "torch": torch.__version__, "results": results}, f, indent=2)
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
