"""One GPU, HF decoder families: eager, `torch.compile(model)`, autopart's runner op by op and
autopart's runner with compiled kernels, side by side in one process and run.

    torchrun --nproc_per_node=1 benchmarks/compiled_step.py [--families llama,qwen3] [--out r.json]

Every family at the same shape (bf16 mixed precision: float32 weights under
`torch.autocast(bfloat16)`, fused AdamW, sequence 1024, batch 8, `--layers` × `--hidden`).
Per family and mode: seconds per step (median of `--steps` after `--warmup`), peak memory
(`torch.cuda.max_memory_allocated`), and for the two autopart modes the planner's predicted
step and peak (the preset cluster, and `--cluster`'s calibrated one). Before timing, the
compiled runner's first step is checked against eager autocast on the same weights: the loss
within bf16's rtol 1.6e-2 and every gradient norm-wise within it (as tests/distributed/family_step.py).
The first compiled step's wall time, less a timed step, is reported as compile time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import autopart

BF16_RTOL = 1.6e-2
FAMILIES = ("gpt2", "llama", "mistral", "qwen3", "gemma2", "olmo2", "gpt_neox", "phi")


def build(family: str, layers: int, hidden: int, vocab: int, seq: int) -> torch.nn.Module:
    """An HF causal LM of `family` with random weights, `layers` × `hidden`, 16 heads of 128."""
    import transformers as tf

    heads, inter = hidden // 128, int(hidden * 2.75) // 256 * 256
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=seq, tie_word_embeddings=False)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=seq,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(config)
    if family in ("llama", "mistral", "qwen3", "olmo2"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM)}[family]
        extra = dict(head_dim=128) if family == "qwen3" else {}
        if family == "mistral":
            extra["sliding_window"] = None
        config = cls[0](intermediate_size=inter, num_key_value_heads=max(1, heads // 4), **common, **extra)
        return cls[1](config)
    if family == "gemma2":
        config = tf.Gemma2Config(intermediate_size=inter, num_key_value_heads=max(1, heads // 4), head_dim=128,
                                 attn_logit_softcapping=None, final_logit_softcapping=None,
                                 sliding_window=seq, **common)
        return tf.Gemma2ForCausalLM(config)
    if family == "gpt_neox":
        config = tf.GPTNeoXConfig(intermediate_size=4 * hidden, hidden_dropout=0.0, attention_dropout=0.0, **common)
        return tf.GPTNeoXForCausalLM(config)
    if family == "phi":
        config = tf.PhiConfig(intermediate_size=4 * hidden, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                              **common)
        return tf.PhiForCausalLM(config)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def logits_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def loss_fn(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(output).flatten(0, 1).float(), target.flatten())


def timed(step: Callable[[], None], steps: int, warmup: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of `steps` after `warmup` more)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return first, statistics.median(times)


def fresh() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def plain_mode(model: torch.nn.Module, ids, target, args, compile_model: bool) -> dict[str, Any]:
    """Eager, or `torch.compile(model)`, in the user's own autocast."""
    fresh()
    module = copy.deepcopy(model).cuda()
    run = torch.compile(module) if compile_model else module
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(run(ids), target)
        loss.backward()
        optimizer.step()

    first, seconds = timed(step, args.steps, args.warmup)
    out = {"seconds": seconds, "peak_bytes": torch.cuda.max_memory_allocated(), "first_seconds": first}
    del module, run, optimizer
    return out


def reference_gradients(model: torch.nn.Module, ids, target) -> dict[str, Any]:
    """The first step's loss and gradients of eager autocast, and of float32 (TF32 off): the truth
    both bf16 runs are measured against."""
    out: dict[str, Any] = {}
    for name, autocast in (("autocast", True), ("float32", False)):
        module = copy.deepcopy(model).cuda()
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(module(ids), target)
        loss.backward()
        # kept on the CPU: held on the GPU they would count in the peaks measured next
        out[name] = (float(loss.detach()), {n: p.grad.detach().cpu() for n, p in module.named_parameters()
                                           if p.grad is not None})
        del module, loss
    loss, grads = out["autocast"]
    out["autocast_error"] = gradient_error(grads, out["float32"][1])
    return out


def gradient_error(grads: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The worst norm-wise gradient error against `truth` (each ‖g − t‖ / max(‖t‖, 1% of the
    largest ‖t‖), as tests/distributed/family_step.py), and the parameter it is on."""
    floor = 1e-2 * max(float(g.norm()) for g in truth.values())
    worst, where = 0.0, ""
    for name, grad in grads.items():
        if name in truth:
            error = float((grad.float().cpu() - truth[name]).norm()) / max(float(truth[name].norm()), floor)
            if error > worst:
                worst, where = error, name
    return worst, where


def autopart_mode(model: torch.nn.Module, ids, target, args, compile_kernels: bool,
                                reference: dict[str, Any] | None) -> dict[str, Any]:
    fresh()
    options = dict(example_inputs=(ids.cpu(),), optimizer="adamw", num_microbatches=1, mixed_precision="bf16",
                   compile_kernels=compile_kernels)
    started = time.perf_counter()
    cm = autopart.compile(model, [torch.device("cuda", 0)], **options)
    plan_s = time.perf_counter() - started
    out: dict[str, Any] = {"plan_seconds": plan_s, "predicted_s": cm.plan.predicted_step_seconds,
                           "predicted_peak_bytes": cm.plan.stages[0].memory.total}
    if args.cluster:
        calibrated = autopart.compile(model, args.cluster, **options).plan
        out["calibrated_predicted_s"] = calibrated.predicted_step_seconds
        out["calibrated_predicted_peak_bytes"] = calibrated.stages[0].memory.total
    runner = cm.distributed(timeout_s=1800)
    if reference is not None:  # the first step against eager autocast and float32, before any update
        started = time.perf_counter()
        loss = float(runner.step(ids, target=target, loss_fn=loss_fn))
        torch.cuda.synchronize()
        out["first_step_seconds"] = time.perf_counter() - started
        grads = {name: module.get_parameter(path).grad for module, interface in runner.local_stages
                 for path, name in interface.parameters if module.get_parameter(path).grad is not None}
        ref_loss = reference["autocast"][0]
        versus_autocast, versus_float32 = gradient_error(grads, reference["autocast"][1]), gradient_error(
            grads, reference["float32"][1])
        eager_error = reference["autocast_error"]
        out.update(loss=loss, reference_loss=ref_loss, float32_loss=reference["float32"][0],
                   loss_error=abs(loss - ref_loss) / abs(ref_loss), gradient_error_vs_autocast=versus_autocast,
                   gradient_error_vs_float32=versus_float32, eager_autocast_error_vs_float32=eager_error,
                   # as close to float32 as eager autocast is, within bf16's rtol
                   equivalent=abs(loss - ref_loss) <= BF16_RTOL * abs(ref_loss)
                   and versus_float32[0] <= eager_error[0] + BF16_RTOL)
        runner.zero_grad()
    optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        runner.step(ids, target=target, loss_fn=loss_fn)
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    first, seconds = timed(step, args.steps, args.warmup)
    out.update(seconds=seconds, peak_bytes=torch.cuda.max_memory_allocated(),
               predicted_over_measured_s=out["predicted_s"] / seconds,
               predicted_over_measured_peak=out["predicted_peak_bytes"] / torch.cuda.max_memory_allocated())
    if "calibrated_predicted_s" in out:
        out["calibrated_over_measured_s"] = out["calibrated_predicted_s"] / seconds
        out["calibrated_over_measured_peak"] = out["calibrated_predicted_peak_bytes"] / out["peak_bytes"]
    if runner.kernels is not None:
        out["kernels"] = runner.kernels.summary()
        out["compile_seconds"] = out.get("first_step_seconds", first) - seconds
    del runner, optimizer, cm
    return out


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build(family, args.layers, args.hidden, args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
    target = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
    result: dict[str, Any] = {"family": family, "params": sum(p.numel() for p in model.parameters())}
    reference = None
    for mode in args.modes.split(","):
        try:
            if mode in ("eager", "torch_compile"):
                result[mode] = plain_mode(model, ids, target, args, compile_model=mode == "torch_compile")
            elif mode in ("runner", "compiled_runner"):
                if reference is None:
                    reference = reference_gradients(model, ids, target)
                result[mode] = autopart_mode(model, ids, target, args, mode == "compiled_runner", reference)
        except Exception as error:  # noqa: BLE001 - one failing mode is reported, the others run
            result[mode] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        print(json.dumps({"family": family, "mode": mode, **result[mode]}, default=str), flush=True)
    del model, reference
    fresh()
    return result


def predict_from(path: str, args: argparse.Namespace) -> None:
    """Re-plan the families of a results file on the meta device (no GPU) with the H100 preset and
    with `--cluster`, compiled and op by op, and set each prediction beside the step and peak that
    file measured: what the cost model now says about runs already made."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    run = data["args"]
    clusters = {"preset": "1xH100", **({"calibrated": args.cluster} if args.cluster else {})}
    rows = []
    for result in data["results"]:
        with torch.device("meta"):
            model = build(result["family"], run["layers"], run["hidden"], run["vocab"], run["seq"])
        ids = torch.randint(0, run["vocab"], (run["batch"], run["seq"]))
        row: dict[str, Any] = {"family": result["family"]}
        for mode, compile_kernels in (("runner", False), ("compiled_runner", True)):
            measured = result.get(mode, {})
            if "seconds" not in measured:
                continue
            for label, devices in clusters.items():
                plan = autopart.compile(model, devices, example_inputs=(ids,), optimizer="adamw", num_microbatches=1,
                                        mixed_precision="bf16", compile_kernels=compile_kernels).plan
                row[f"{mode}_{label}_s"] = plan.predicted_step_seconds / measured["seconds"]
                row[f"{mode}_{label}_peak"] = plan.stages[0].memory.total / measured["peak_bytes"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\npredicted / measured ({data['device']}, torch {data['torch']}; measured in {path})")
    keys = [k for k in rows[0] if k != "family"]
    print(f"{'family':<9}" + "".join(f"{k.replace('compiled_runner', 'compiled'):>24}" for k in keys))
    for row in rows:
        print(f"{row['family']:<9}" + "".join(f"{row.get(k, float('nan')):>24.3f}" for k in keys))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"measured_in": path, "device": data["device"], "torch": data["torch"], "rows": rows}, f,
                      indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--modes", default="eager,torch_compile,runner,compiled_runner")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cluster", help="also predict with this saved Cluster (autopart.calibrate() JSON)")
    parser.add_argument("--out", help="write the results as JSON here (after every family)")
    parser.add_argument("--predict-from", help="no GPU: re-plan the families of this results file, predicted / measured")
    args = parser.parse_args()
    if args.predict_from:
        predict_from(args.predict_from, args)
        return
    name = torch.cuda.get_device_name(0)
    results = []
    for family in args.families.split(","):
        results.append(run_family(family, args))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "results": results}, f,
                          indent=2, default=str)
    print(f"\n{name}, torch {torch.__version__}, {args.layers}×{args.hidden}, batch {args.batch}×{args.seq}, bf16 mixed")
    print(f"{'family':<9}{'eager s':>9}{'compile s':>10}{'runner s':>9}{'comp.run s':>11}{'cr/tc':>7}{'cr/run':>7}"
          f"{'pred/meas':>10}{'calib':>7}{'mem p/m':>8}{'ok':>4}")
    for r in results:
        def s(mode: str) -> float:
            return r.get(mode, {}).get("seconds", float("nan"))
        cr = r.get("compiled_runner", {})
        print(f"{r['family']:<9}{s('eager'):>9.4f}{s('torch_compile'):>10.4f}{s('runner'):>9.4f}"
              f"{s('compiled_runner'):>11.4f}{s('torch_compile') / s('compiled_runner'):>7.3f}"
              f"{s('runner') / s('compiled_runner'):>7.3f}{cr.get('predicted_over_measured_s', float('nan')):>10.3f}"
              f"{cr.get('calibrated_over_measured_s', float('nan')):>7.3f}"
              f"{cr.get('predicted_over_measured_peak', float('nan')):>8.3f}{str(cr.get('equivalent', '-'))[:1]:>4}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
