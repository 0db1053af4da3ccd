"""Compile time of a GPT (d_model 1024) for 8 devices: trace + annotate + solve, then the rank modules.

The 24 identical blocks are analysed once (three traced, costs restated for all: autopart/analysis.py),
so compile returns the plan; the whole model is traced and cut into rank modules when they are first
asked for, timed here as "rank modules s".

By default the planner searches dp × pp × tp (target 5 s for 24 layers); with
--tensor-parallel 1 it plans dp × pp only (target 3 s).

Models are built on the meta device (no memory), as a user planning a model too
big for the machine would. Prints a table from 8 to 96 layers and checks the
targets for 24 layers: whole compile within 3 s, the solve within 0.5 s.

    python benchmarks/compile_time.py [--layers 8 24 48 96] [--devices 8xH100]
"""

from __future__ import annotations

import argparse
import sys
import time

import autopart
from autopart import zoo

TARGET_TOTAL_S = 3.0
TARGET_SOLVE_S = 0.5
TARGET_JOINT_S = 5.0  # joint pp x tp search


def compile_once(layers: int, devices: str, batch: int, seq: int, tp: int | None = None):
    entry = zoo.gpt(layers=layers, d_model=1024, heads=16, vocab=50304, seq=seq, batch=batch, device="meta")
    started = time.perf_counter()
    compiled = autopart.compile(entry.model, devices, example_inputs=entry.args, tensor_parallel=tp)
    planned = time.perf_counter() - started
    compiled.rank_modules(0)  # the whole graph, the plan on its nodes, the rank modules
    return compiled, planned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 24, 48, 96])
    parser.add_argument("--devices", default="8xH100")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--tensor-parallel", type=int, default=None,
                        help="fix tp (1: pipeline and data parallel only); default: the planner searches")
    args = parser.parse_args()

    compile_once(2, args.devices, args.batch, args.seq)  # warm up torch.export's lazy imports
    header = (f"{'layers':>6} {'blocks':>6} {'trace s':>8} {'annot s':>8} {'plan s':>7} {'pp ILP s':>8} "
              f"{'ILPs':>5} {'compile s':>9} {'rank modules s':>14}  plan")
    print(header)
    print("-" * len(header))
    ok = True
    for layers in args.layers:
        compiled, total = compile_once(layers, args.devices, args.batch, args.seq, args.tensor_parallel)
        phases = compiled.phase_seconds
        plan = compiled.plan
        codegen = phases.get("whole_model", 0.0) + phases.get("codegen", 0.0) + phases.get("retrace", 0.0)
        mesh = plan.mesh
        print(f"{layers:>6} {sum(len(s.blocks) for s in plan.stages):>6} {phases.get('trace', 0):>8.2f} "
              f"{phases.get('annotate', 0):>8.2f} {phases.get('plan', 0):>7.3f} {plan.solver.plan_seconds:>8.3f} "
              f"{plan.solver.num_problems:>5} {total:>9.2f} {codegen:>14.2f}  "
              f"dp={mesh.dp} pp={mesh.pp} tp={mesh.tp} m={plan.num_microbatches} {plan.schedule}", flush=True)
        if layers == 24:
            pipeline_only = args.tensor_parallel == 1
            target = TARGET_TOTAL_S if pipeline_only else TARGET_JOINT_S
            ok &= total <= target and plan.solver.plan_seconds <= TARGET_SOLVE_S
            print(f"       24 layers: total {total:.2f} s (target {target} s), pipeline ILPs "
                  f"{plan.solver.plan_seconds:.3f} s (target {TARGET_SOLVE_S} s): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
