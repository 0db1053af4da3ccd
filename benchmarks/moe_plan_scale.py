"""Planning time for mixture-of-experts and mixed-layer models at their published sizes, on the meta device.

Models (Hugging Face configurations of deepseek-ai/DeepSeek-V3, mistralai/Mixtral-8x22B-v0.1 and
google/gemma-3-27b: hidden and expert sizes, layers, heads, vocabulary; DeepSeek-V3 without its
multi-token-prediction module), bf16 autocast over float32 state, AdamW, sequences of 4096:

| name | model | devices | batch |
|---|---|---|---|
| deepseek-v3 | 671B: 3 dense + 58 MoE layers, 256 routed experts top-8 + 1 shared, MLA | 256x8xH100 | 15360 (DeepSeek-V3's) |
| deepseek-v3-published | the same, with the published layout fixed: pp 16 × ep 64 of dp 128, ZeRO (zero2) | 256x8xH100 | 15360 |
| mixtral-8x22b | 141B: 56 layers, 8 experts top-2 | 8x8xH100 | 1024 |
| gemma3-27b | 62 layers, five sliding-window (1024) to one global | 8x8xH100 | 1024 |

Each plan runs in its own process. Columns: compile = `autopart.compile` wall time; layers
traced (the copy's) of the model's; mesh dp × pp × tp × ep, microbatches, schedule, dp mode,
recomputation per block; step = predicted step time. The published layout is priced by the same planner with pipeline_parallel,
data_parallel, expert_parallel and data_parallel_mode fixed (microbatches, schedule, cuts and
recomputation chosen, as DeepSeek chose its own); zero2 stands in for DeepSeek's ZeRO-1 (it also
shards the gradients, so it holds less).

    python benchmarks/moe_plan_scale.py [--cases deepseek-v3 deepseek-v3-published mixtral-8x22b gemma3-27b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SEQ = 4096
CASES = {
    "deepseek-v3": dict(family="deepseek", devices="256x8xH100", batch=15360, fixed={}),
    "deepseek-v3-published": dict(family="deepseek", devices="256x8xH100", batch=15360,
                                  fixed=dict(pipeline_parallel=16, data_parallel=128, expert_parallel=64,
                                             tensor_parallel=1, data_parallel_mode="zero2")),
    "mixtral-8x22b": dict(family="mixtral", devices="8x8xH100", batch=1024, fixed={}),
    "gemma3-27b": dict(family="gemma3", devices="8x8xH100", batch=1024, fixed={}),
}


def build(family: str):
    import torch

    with torch.device("meta"):
        if family == "deepseek":
            from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

            config = DeepseekV3Config(
                vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, num_key_value_heads=128,
                n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=SEQ)
            return DeepseekV3ForCausalLM(config), 129280
        if family == "mixtral":
            from transformers import MixtralConfig, MixtralForCausalLM

            config = MixtralConfig(vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                                   num_attention_heads=48, num_key_value_heads=8, num_local_experts=8,
                                   num_experts_per_tok=2, max_position_embeddings=SEQ)
            return MixtralForCausalLM(config), 32768
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                                  num_attention_heads=32, num_key_value_heads=16, head_dim=128, sliding_window=1024,
                                  max_position_embeddings=SEQ)
        return Gemma3ForCausalLM(config), 262208


def plan_one(name: str) -> dict:
    import torch

    import autopart
    from autopart.core.modes import recompute_counts

    case = CASES[name]
    model, vocab = build(case["family"])
    with torch.device("meta"):
        ids = torch.randint(0, vocab, (case["batch"], SEQ))
    row = dict(case=name, devices=case["devices"], batch=case["batch"],
               params_b=sum(p.numel() for p in model.parameters()) / 1e9)
    started = time.perf_counter()
    try:
        compiled = autopart.compile(model, case["devices"], example_inputs=(ids,), mixed_precision="bf16",
                                    optimizer="adamw", **case["fixed"])
    except autopart.PlanError as error:
        row.update(fits=False, why=str(error).splitlines()[0][:200], compile_s=time.perf_counter() - started)
        return row
    plan, mesh = compiled.plan, compiled.plan.mesh
    row.update(fits=True, compile_s=time.perf_counter() - started, mesh=f"{mesh.dp}×{mesh.pp}×{mesh.tp}×{mesh.ep}",
               m=plan.num_microbatches, schedule=plan.schedule + (f" v{plan.virtual_stages}"
                                                                  if plan.virtual_stages > 1 else ""),
               mode=plan.data_parallel_mode, step_s=plan.predicted_step_seconds,
               recompute=recompute_counts(tuple(m for stage in plan.stages for m in stage.recompute)),
               analysed=plan.tensor_parallel.analysed_layers if plan.tensor_parallel else None,
               phases={k: round(v, 2) for k, v in compiled.phase_seconds.items()},
               experts=plan.experts.ep if plan.experts else None)
    return row


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(plan_one(sys.argv[2])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    print("| case | params | devices | compile s | mesh dp×pp×tp×ep | m | schedule | dp mode | recompute | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        done = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            print(f"| {name} | | | failed: {done.stderr.strip()[-200:]} | | | | | | |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if not r["fits"]:
            print(f"| {name} | {r['params_b']:.0f}B | {r['devices']} | {r['compile_s']:.1f} | does not fit: "
                  f"{r['why']} | | | | | |", flush=True)
            continue
        print(f"| {name} | {r['params_b']:.0f}B | {r['devices']} | {r['compile_s']:.1f} | {r['mesh']} | {r['m']} | "
              f"{r['schedule']} | {r['mode']} | {r['recompute']} | {r['step_s']:.2f} |", flush=True)
        print(f"|   | phases {r['phases']} | | | | | | | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
