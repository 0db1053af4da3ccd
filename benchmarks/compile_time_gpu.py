"""One GPU: how long compiling kernels takes for a 32-layer stage of an 8B Llama shape against a
single block of it, with a cold cache, and the stage again from a warm cache.

    python3 benchmarks/compile_time_gpu.py [--layers 32] [--out compile_time_gpu.json]
    python3 benchmarks/compile_time_gpu.py --tiny --layers 2       # a dry run on the CPU

Each measurement is a fresh process (torchrun, one rank) with its own TORCHINDUCTOR_CACHE_DIR:
- `block`: one HF LlamaDecoderLayer (hidden 4096, intermediate 14336, 32/8 heads) under
  `torch.compile`, bf16 autocast, forward and backward at batch 1 × 1024: first call − second;
- `stage 1`: autopart's compiled runner for a one-layer model of that shape (embedding, one
  block, norm, head: vocabulary 128256), one training step: first step − a later one;
- `stage N cold`: the same for N layers, in a new cache directory;
- `stage N warm`: N layers again, in the directory the cold run filled (Inductor's FX-graph
  cache and AOTAutograd's cache; autopart keeps no cache of its own).
The model is built on the meta device and filled on the GPU (`init_fn`), so only the GPU holds it.
`--tiny` runs the same code path at a toy shape (hidden 64, 2 layers by default) on whatever device
there is, the CPU included (Inductor compiles for it, slowly): a dry run of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, vocab=128256, seq=1024),
    "tiny": dict(hidden=64, inter=128, heads=4, kv_heads=2, vocab=256, seq=32),
}
SHAPE = SHAPES["8b"]
"""The shape measured: Llama-3.1-8B's (SHAPES["tiny"] with --tiny)."""


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["inter"],
                       num_hidden_layers=layers, num_attention_heads=SHAPE["heads"],
                       num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=SHAPE["seq"],
                       tie_word_embeddings=False)


def device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child_block() -> dict:
    import torch
    from transformers import LlamaForCausalLM

    on = device()
    with on:
        model = LlamaForCausalLM(config(1))
    layer, rotary = model.model.layers[0], model.model.rotary_emb
    x = torch.randn(1, SHAPE["seq"], SHAPE["hidden"], device=on, requires_grad=True)
    positions = torch.arange(SHAPE["seq"], device=on)[None]
    compiled = torch.compile(layer)

    def call() -> float:
        synchronize()
        started = time.perf_counter()
        with torch.autocast(on.type, dtype=torch.bfloat16):
            embeddings = rotary(x, positions)
            out = compiled(x, position_embeddings=embeddings, attention_mask=None, position_ids=positions)
            out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        synchronize()
        return time.perf_counter() - started

    first, second = call(), call()
    return {"what": "block", "first_s": first, "steady_s": second, "compile_s": first - second}


def child_stage(layers: int) -> dict:
    import torch
    import torch.nn.functional as F

    import autopart
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config(layers))
    ids = torch.randint(0, SHAPE["vocab"], (1, SHAPE["seq"]))
    on = device()
    started = time.perf_counter()
    # SGD: 8B float32 weights and gradients (64 GB) fit one 80 GB GPU; Adam's state would not.
    cm = autopart.compile(model, [on] if on.type == "cuda" else 1, example_inputs=(ids,), optimizer="sgd",
                          num_microbatches=1, mixed_precision="bf16", compile_kernels=True)
    plan_s = time.perf_counter() - started

    def init(name: str, tensor: torch.Tensor) -> None:
        tensor.normal_(0.0, 0.02) if tensor.dim() > 1 else tensor.fill_(1.0 if "norm" in name else 0.0)

    runner = cm.distributed(init_fn=init, timeout_s=1800)

    def loss_fn(output, target):
        logits = output if isinstance(output, torch.Tensor) else output.logits
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

    def step() -> float:
        synchronize()
        begun = time.perf_counter()
        runner.step(ids, target=ids, loss_fn=loss_fn)
        synchronize()
        return time.perf_counter() - begun

    first = step()
    steady = min(step(), step())
    return {"what": f"stage {layers}", "plan_s": plan_s, "first_s": first, "steady_s": steady,
            "compile_s": first - steady, "kernels": runner.kernels.summary(),
            "peak_bytes": torch.cuda.max_memory_allocated() if on.type == "cuda" else None}


def run_child(args: list[str], cache: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__, *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        # the child's own traceback (torchrun prefixes its lines with [rank0]:), not torchrun's wrapper
        text = (done.stdout + done.stderr).splitlines()
        own = [line for line in text if line.startswith("[rank0]:")]
        return {"what": " ".join(args), "error": "\n".join((own or text)[-25:]), "process_s": wall}
    return {**json.loads(lines[-1]), "process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--child", choices=["block", "stage"])
    parser.add_argument("--only", choices=["block", "stage"], help="measure only the block, or only the stages")
    parser.add_argument("--out")
    parser.add_argument("--tiny", action="store_true", help="a toy shape on any device (a dry run of the script)")
    args = parser.parse_args()
    global SHAPE
    SHAPE = SHAPES["tiny" if args.tiny else "8b"]
    if args.child == "block":
        print(json.dumps(child_block()), flush=True)
        return
    if args.child == "stage":
        print(json.dumps(child_stage(args.layers)), flush=True)
        return
    root = tempfile.mkdtemp(prefix="autopart_compile_time_")
    results = []
    runs = [(["--child", "block"], "block"), (["--child", "stage", "--layers", "1"], "one"),
            (["--child", "stage", "--layers", str(args.layers)], "stage"),
            (["--child", "stage", "--layers", str(args.layers)], "stage")]
    if args.only == "block":
        runs = runs[:1]
    elif args.only == "stage":
        runs = runs[2:]
    for child, cache in runs:
        results.append(run_child(child + (["--tiny"] if args.tiny else []), os.path.join(root, cache)))
        results[-1]["cache"] = "warm" if sum(r.get("cache_dir") == cache for r in results[:-1]) else "cold"
        results[-1]["cache_dir"] = cache
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            import torch

            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"device": name, "torch": torch.__version__, "shape": SHAPE, "results": results},
                          f, indent=2)
    block = next((r["compile_s"] for r in results if r.get("what") == "block" and "compile_s" in r), None)
    print("\nwhat              cache  compile s  first step s  steady s  ratio to one block")
    for r in results:
        if "error" in r:
            print(f"{r['what']:<18}{r['cache']:<7} failed: {r['error'][-300:]}")
            continue
        ratio = f"{r['compile_s'] / block:.2f}" if block else "-"
        print(f"{r['what']:<18}{r['cache']:<7}{r['compile_s']:>9.1f}{r['first_s']:>14.1f}{r['steady_s']:>10.3f}  {ratio}")


if __name__ == "__main__":
    main()
