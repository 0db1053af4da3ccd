"""Time the pipeline ILP's backends (CP-SAT, pywraplp MIPs) on realistic instances.

Instances: a transformer-shaped chain (embedding, L identical layers with 3%
noise, head) with a few skip values, cut into 2–8 stages; random DAGs of
10–100 blocks with branches and skips; parallel towers. Prints blocks, stages,
backend (auto shows what it picked), seconds (best of `--repeat`, the whole
solve_pipeline call), the time relative to the first backend, status and
objective, then the median/min/max ratio per backend.

    python benchmarks/solver_backends.py [--repeat 3] [--hard] [--backends cpsat mip:SCIP ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from autopart.core.errors import PlanError
from autopart.core.problems import PipelineProblem, ValueFlow
from autopart.cost_models import Link, p2p_seconds
from autopart.solver import solve_pipeline


def transformer_chain(
    num_layers: int, num_stages: int, *, num_skips: int = 3, seed: int = 0,
    num_microbatches: int = 8, schedule: str = "1f1b", heterogeneous: bool = False,
) -> PipelineProblem:
    """Embedding + `num_layers` layers + head of a ~1B-parameter GPT on H100-like stages."""
    rng = np.random.default_rng(seed)
    n = num_layers + 2
    layer_fwd = 4e-3 * (1 + 0.03 * rng.standard_normal(num_layers))
    fwd = np.concatenate([[1.5e-3], layer_fwd, [6e-3]])
    speed = rng.uniform(0.5, 1.0, num_stages) if heterogeneous else np.ones(num_stages)
    fwd_s = fwd[:, None] / speed[None, :]
    act = 8 * 1024 * 2048 * 2  # microbatch 8 × seq 1024 × d 2048 × bf16
    values = [ValueFlow(producer=b, consumers=(b + 1,), num_bytes=act) for b in range(n - 1)]
    for k in range(num_skips):  # e.g. an attention mask or rotary table read by later layers
        p = int(rng.integers(0, n - 2))
        consumers = tuple(sorted(set(rng.integers(p + 1, n, size=3).tolist())))
        values.append(ValueFlow(producer=p, consumers=consumers, num_bytes=act // 8))
    edges = sorted({(v.producer, c) for v in values for c in v.consumers})
    state = np.concatenate([[0.8e9], np.full(num_layers, 0.8e9), [0.8e9]])
    return PipelineProblem(
        block_names=("embed", *(f"layer{i}" for i in range(num_layers)), "head"),
        fwd_seconds=fwd_s, bwd_seconds=2 * fwd_s,
        state_bytes=state, activation_bytes=np.full(n, 12.0 * act),
        edges=tuple(edges), values=tuple(values),
        memory_capacity=np.full(num_stages, 80e9),
        boundary_seconds=_boundary(values, num_stages, Link(latency_s=10e-6, bandwidth=50e9)),
        num_microbatches=num_microbatches, schedule=schedule,
    )


def _boundary(values: list[ValueFlow], num_stages: int, link: Link) -> np.ndarray:
    """[values, stages - 1] seconds to send each value over each link (cost_models.comm)."""
    return np.array([[p2p_seconds(v.num_bytes, link)] * (num_stages - 1) for v in values],
                    dtype=float).reshape(len(values), num_stages - 1)


def random_dag(num_blocks: int, num_stages: int, *, seed: int = 0) -> PipelineProblem:
    """A DAG with branches and skips: each block reads 1–2 of the 4 blocks before it."""
    rng = np.random.default_rng(seed)
    readers: list[list[int]] = [[] for _ in range(num_blocks)]
    for c in range(1, num_blocks):
        window = list(range(max(0, c - 4), c))
        for p in rng.choice(window, size=min(len(window), int(rng.integers(1, 3))), replace=False):
            readers[int(p)].append(c)
    values = [
        ValueFlow(producer=p, consumers=tuple(sorted(r)), num_bytes=int(rng.integers(1, 64)) << 20)
        for p, r in enumerate(readers) if r
    ]
    edges = sorted({(v.producer, c) for v in values for c in v.consumers})
    fwd = rng.uniform(1e-3, 5e-3, num_blocks)[:, None] * np.ones(num_stages)
    return PipelineProblem(
        block_names=tuple(f"b{i}" for i in range(num_blocks)),
        fwd_seconds=fwd, bwd_seconds=2 * fwd,
        state_bytes=rng.uniform(0.1e9, 1e9, num_blocks),
        activation_bytes=rng.uniform(10e6, 200e6, num_blocks),
        edges=tuple(edges), values=tuple(values),
        memory_capacity=np.full(num_stages, 80e9),
        boundary_seconds=_boundary(values, num_stages, Link(latency_s=10e-6, bandwidth=25e9)),
        num_microbatches=16, schedule="1f1b",
    )


def towers(num_towers: int, depth: int, num_stages: int, *, seed: int = 0) -> PipelineProblem:
    """An input block, `num_towers` parallel chains (numbered interleaved), a merge block;
    stage devices of random speed. Ordered DAG partitioning at its hardest."""
    rng = np.random.default_rng(seed)
    n = num_towers * depth + 2
    index = {(t, i): 1 + i * num_towers + t for t in range(num_towers) for i in range(depth)}
    values = []
    for t in range(num_towers):
        chain = [0, *(index[t, i] for i in range(depth)), n - 1]
        values += [ValueFlow(producer=a, consumers=(b,), num_bytes=2**20)
                   for a, b in zip(chain, chain[1:])]
    fwd = rng.uniform(1e-3, 3e-3, n)[:, None] / rng.uniform(1.0, 2.0, num_stages)[None, :]
    return PipelineProblem(
        block_names=tuple(f"b{i}" for i in range(n)), fwd_seconds=fwd, bwd_seconds=2 * fwd,
        state_bytes=np.full(n, 1e9), activation_bytes=np.full(n, 5e7),
        edges=tuple(sorted({(v.producer, c) for v in values for c in v.consumers})),
        values=tuple(values), memory_capacity=np.full(num_stages, 80e9),
        boundary_seconds=_boundary(values, num_stages, Link(latency_s=1e-5, bandwidth=1e10)),
        num_microbatches=8, schedule="1f1b",
    )


def instances(hard: bool = False) -> list[tuple[str, PipelineProblem]]:
    """The benchmark set: chains of 10–100 blocks, random DAGs of 10–100 blocks, two towers;
    with `hard`, also 4 and 3 parallel towers (seconds to minutes to prove optimal)."""
    out = []
    for layers, stages in [(8, 2), (8, 4), (24, 4), (24, 8), (48, 8), (98, 8)]:
        out.append((f"chain{layers + 2}", transformer_chain(layers, stages, seed=layers)))
    out.append(("chain26-het", transformer_chain(24, 8, heterogeneous=True)))
    out.append(("chain26-gpipe", transformer_chain(24, 8, schedule="gpipe", num_microbatches=32)))
    for blocks, stages in [(10, 2), (30, 4), (60, 8), (100, 8)]:
        out.append((f"dag{blocks}", random_dag(blocks, stages, seed=blocks)))
    out.append(("towers2x12", towers(2, 12, 8)))
    if hard:
        out += [("towers4x10", towers(4, 10, 8, seed=1)), ("towers3x30", towers(3, 30, 8, seed=2))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", nargs="+",
                        default=["cpsat", "mip:SCIP", "mip:HIGHS", "mip:CBC", "auto"])
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--hard", action="store_true", help="add the multi-tower DAGs")
    args = parser.parse_args()
    print(f"{'instance':<14}{'blocks':>7}{'stages':>7}  {'backend':<14}{'seconds':>9}"
          f"{'ratio':>8}  {'status':<9}{'objective (s)':>15}")
    ratios: dict[str, list[float]] = {b: [] for b in args.backends[1:]}
    for label, problem in instances(args.hard):
        best: dict[str, float] = {}
        for backend in args.backends:
            times, sol = [], None
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                try:
                    sol = solve_pipeline(problem, backend=backend, time_limit_s=args.time_limit)
                except PlanError as err:
                    print(f"{label}: {backend}: {err}")
                    break
                times.append(time.perf_counter() - t0)
            if sol is None:
                continue
            best[backend] = min(times)
            ratio = best[backend] / best.get(args.backends[0], best[backend])
            plain = backend in (sol.backend, "mip") or backend.replace(":", "/") == sol.backend
            name = sol.backend if plain else f"{backend}/{sol.backend}"
            print(f"{label:<14}{problem.num_blocks:>7}{problem.num_stages:>7}  {name:<14}"
                  f"{best[backend]:>9.4f}{ratio:>7.2f}×  {sol.status:<9}{sol.step_seconds:>15.9f}")
        for other in ratios:
            if other in best and args.backends[0] in best:
                ratios[other].append(best[other] / best[args.backends[0]])
    for other, r in ratios.items():
        if r:
            print(f"{other} / {args.backends[0]} time: median {statistics.median(r):.2f}×, "
                  f"min {min(r):.2f}×, max {max(r):.2f}×")


if __name__ == "__main__":
    main()
