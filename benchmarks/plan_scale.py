"""Planning time and memory for Llama-shaped models from 1B to 405B on 8 to 4096 H100s.

Each model is built on the meta device from its published configuration
(Hugging Face config.json of meta-llama/Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B,
Llama-3.1-405B: hidden size, intermediate size, layers, attention and key-value
heads, vocabulary 128256, tied embeddings for 1B only) and planned with
`autopart.compile` for clusters of 8 GPUs per host ("1x8xH100" ... "512x8xH100"),
bf16 autocast over float32 state, AdamW, global batch 1024 sequences of 4096
tokens (Llama 3's 4M-token batch). Each plan runs in its own process, so the
peak memory is the planner's alone (the process's maximum resident set, torch
included).

Columns: compile = `autopart.compile` wall time; search = the layout search
(`Plan.solver.plan_seconds`); peak = maximum RSS; mesh dp × pp × tp (m
microbatches, schedule, dp mode, blocks recomputed); step = predicted step time; MFU = the traced
graph's FLOPs per step / (step × devices used × 989.4 TFLOP/s, the H100's dense
bf16 peak). "does not fit" means no layout holds the model, even with every block
recomputed and the state fully sharded; the planner's reason follows on the next line.

    python benchmarks/plan_scale.py [--models 1b 8b 70b 405b] [--hosts 1 8 64 512] [--batch 1024]
    python benchmarks/plan_scale.py --layers 20 40 80 160      # one model, time against depth
    python benchmarks/plan_scale.py --models 405b --hosts 512 --sequence-parallel off auto   # sp's effect
    python benchmarks/plan_scale.py --models 70b --hosts 64 --batch 16 --seq 131072   # long context: cp

"sp" after the mesh: the plan shards the activations between tp regions on the sequence
(Megatron-SP, compile(sequence_parallel=...)).
    python benchmarks/plan_scale.py --eager ...                # priced op by op (compile_kernels=False)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

COMPILE_KERNELS = True
"""Plans priced as compiled kernels (the default on GPUs); `--eager` prices them op by op."""

CONFIGS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False),
    "405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                 num_key_value_heads=8, tie_word_embeddings=False),
}
SEQ = 4096
VOCAB = 128256
H100_BF16_PEAK = 989.4e12  # dense, cost_models/devices.py


SEQUENCE_PARALLEL = {"auto": None, "on": True, "off": False}


def plan_one(model_name: str, hosts: int, batch: int, layers: int | None, sp: str = "auto", seq: int = SEQ,
             cp: int | None = None) -> dict:
    """Build the model on the meta device and plan it; what the table prints."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import autopart

    config = dict(CONFIGS[model_name])
    if layers:
        config["num_hidden_layers"] = layers
    started = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=seq, **config))
        ids = torch.randint(0, VOCAB, (batch, seq))
    built = time.perf_counter()
    row = dict(model=model_name, layers=config["num_hidden_layers"], devices=f"{hosts}x8xH100", batch=batch, seq=seq)
    try:
        compiled = autopart.compile(model, row["devices"], example_inputs=(ids,), mixed_precision="bf16",
                                    optimizer="adamw", sequence_parallel=SEQUENCE_PARALLEL[sp], context_parallel=cp,
                                    compile_kernels=COMPILE_KERNELS)
    except autopart.PlanError as error:
        row.update(fits=False, why=str(error).splitlines()[0][:160])
        plan = None
    else:
        row["fits"] = True
        plan = compiled.plan
    row["compile_s"] = time.perf_counter() - built
    row["build_s"] = built - started
    row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if plan is not None:
        mesh = plan.mesh
        flops = sum(s.fwd_flops + s.bwd_flops for s in plan.stages) * plan.num_microbatches * mesh.dp
        row.update(search_s=plan.solver.plan_seconds, solves=plan.solver.num_problems,
                   mesh=f"{mesh.dp}×{mesh.pp}×{mesh.tp}" + (" sp" if plan.tensor_parallel is not None
                                                            and plan.tensor_parallel.sequence_parallel else "")
                   + (f" cp={mesh.cp}" if mesh.cp > 1 else ""),
                   m=plan.num_microbatches,
                   schedule=plan.schedule + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""),
                   mode=plan.data_parallel_mode, step_s=plan.predicted_step_seconds,
                   recompute=_recompute(plan),
                   mfu=flops / (plan.predicted_step_seconds * mesh.num_devices * H100_BF16_PEAK),
                   phases={k: round(v, 3) for k, v in compiled.phase_seconds.items()})
    return row


def _recompute(plan) -> str:
    """'none', or the count of blocks per recompute mode ('80 full, 2 selective')."""
    modes = [m for s in plan.stages for m in s.recompute if m != "none"]
    return ", ".join(f"{modes.count(m)} {m}" for m in ("full", "selective") if m in modes) or "none"


def _run(model_name: str, hosts: int, batch: int, layers: int | None, sp: str = "auto", seq: int = SEQ,
         cp: int | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", model_name, str(hosts), str(batch), str(layers or 0), sp, str(seq),
               str(cp or 0)]
    command += [] if COMPILE_KERNELS else ["--eager"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return dict(model=model_name, devices=f"{hosts}x8xH100", fits=False, why=done.stderr.strip()[-160:],
                    compile_s=float("nan"), peak_mib=float("nan"), layers=layers, batch=batch)
    return json.loads(done.stdout.strip().splitlines()[-1])


HEADER = ("| model | layers | devices | compile s | search s | solves | peak MiB | mesh dp×pp×tp | m | schedule "
          "| dp mode | recompute | step s | MFU |")


def _print_header() -> None:
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))


def _print(r: dict) -> None:
    if r.get("fits"):
        print(f"| {r['model']} | {r['layers']} | {r['devices']} | {r['compile_s']:.2f} | {r['search_s']:.2f} | "
              f"{r['solves']} | {r['peak_mib']:.0f} | {r['mesh']} | {r['m']} | {r['schedule']} | {r['mode']} | "
              f"{r['recompute']} | {r['step_s']:.3f} | {r['mfu']:.1%} |")
    else:
        print(f"| {r['model']} | {r['layers']} | {r['devices']} | {r['compile_s']:.2f} | - | - | "
              f"{r['peak_mib']:.0f} | does not fit | | | | | | |")
        print(f"|   | | | | | | | {r.get('why', '')[:150]} | | | | | | |")
    sys.stdout.flush()


def main() -> int:
    global COMPILE_KERNELS
    if "--eager" in sys.argv:  # priced op by op (compile_kernels=False) instead of as compiled kernels
        sys.argv.remove("--eager")
        COMPILE_KERNELS = False
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model_name, hosts, batch, layers = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(plan_one(model_name, hosts, batch, layers or None, sys.argv[6], int(sys.argv[7]),
                                  int(sys.argv[8]) or None)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--hosts", nargs="+", type=int, default=[1, 8, 64, 512])
    parser.add_argument("--batch", type=int, default=1024, help="global batch in sequences")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence (131072: Llama 3's long context)")
    parser.add_argument("--context-parallel", nargs="+", default=["auto"],
                        help="compile(context_parallel=...): auto (None, the planner chooses) or a degree; "
                             "several print a row each")
    parser.add_argument("--layers", nargs="+", type=int, default=None,
                        help="plan the first model at these depths (time against layer count)")
    parser.add_argument("--sequence-parallel", nargs="+", default=["auto"], choices=list(SEQUENCE_PARALLEL),
                        help="compile(sequence_parallel=...): auto (None, the planner chooses), on, off; "
                             "several print a row each, side by side")
    args = parser.parse_args()
    _print_header()
    if args.layers:
        for layers in args.layers:
            _print(_run(args.models[0], args.hosts[0], args.batch, layers, seq=args.seq))
        return 0
    for model_name in args.models:
        for hosts in args.hosts:
            for sp in args.sequence_parallel:
                for cp in args.context_parallel:
                    row = _run(model_name, hosts, args.batch, None, sp, args.seq, None if cp == "auto" else int(cp))
                    if len(args.sequence_parallel) > 1:
                        row["model"] = f"{model_name}, sp {sp}"
                    if len(args.context_parallel) > 1:
                        row["model"] = f"{row['model']}, cp {cp}"
                    _print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
