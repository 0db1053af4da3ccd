"""Which blocks recompute their activations, and how: the planner's choice per block.

A candidate that does not fit with every block keeping its activations is
solved with every block recomputed in full (the least memory). Each stage then
gives blocks back as much as its memory allows: greedily, the change of one
block's mode ('full' → 'selective' → 'none') that saves the most backward time
per byte it adds, while the stage's peak (the larger of its two sums,
`PipelineProblem.stage_memory_terms`, plus its boundary buffers, ZeRO-3 units
and the largest rebuilt block) stays within `RELAX_UP_TO` of its device's
memory. A last solve with the chosen modes may move the cuts (it keeps the
greedy result if it finds nothing better). Galvatron,
Aceso and Mist choose recomputation per layer the same way, as part of the
plan (REFERENCES.md "Memory-saving choices in the field").
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from autopart.core.errors import PlanError
from autopart.core.blocks import BlockGraph
from autopart.planner.assembly import scale_of
from autopart.core.problems import PipelineProblem, PipelineSolution
from autopart.solver import solve_pipeline
from autopart.solver.pipeline_ilp import price_assignment
from autopart.planner.step_costs import fsdp_unit_transient_bytes, recompute_transient_bytes
from autopart.core.setting import Setting

FASTEST_FIRST = ("none", "selective", "full")
"""Modes by backward time, the cheapest first (and by memory, the largest first)."""

RELAX_UP_TO = 0.9
"""Fraction of a stage's memory the relaxation fills at most. It trades a few percent of backward
time for memory, so it stops short of the device's edge: PyTorch's caching allocator loses 5-10%
to fragmentation at a large, changing peak (the recomputed block's activations come and go in
every block's backward), which the byte count of live tensors does not see."""


def recompute_choices(request) -> list[str]:
    """Uniform policies to try per candidate: the one fixed; else 'none', then 'full' (refined per block)."""
    if not request.training:
        return ["none"]
    if request.recompute is not None:
        return [request.recompute]
    return ["none", "full"]


def least_keeping_recompute(request) -> str:
    """The allowed policy that keeps the least (the last `recompute_choices` tries)."""
    return recompute_choices(request)[-1]


def block_recompute(block, policy: str) -> str:
    """`policy` as it applies to `block`: 'none' for a block that cannot replay its forward
    (`Block.recomputable`) and for one that would keep as much as it saves (a head whose only
    saved tensor is its input: replaying it costs a forward and frees nothing)."""
    if policy == "none" or not block.recomputable or block.kept_bytes(policy) >= block.saved_bytes:
        return "none"
    return policy


def uniform_recompute(graph: BlockGraph, policy: str) -> tuple[str, ...]:
    """`policy` for every block (`block_recompute`); () for 'none'."""
    if policy == "none":
        return ()
    return tuple(block_recompute(block, policy) for block in graph.blocks)


def choose_recompute_per_block(graph: BlockGraph, request, build: Callable[[Setting], PipelineProblem],
                               setting: Setting, problem: PipelineProblem, solution: PipelineSolution,
                               traced_batch_size: int) -> tuple[Setting, PipelineProblem, PipelineSolution]:
    """Relax a solution with every block recomputed to the fastest per-block modes that still fit;
    returns the setting, its problem and the solution priced (or re-solved) with them."""
    variants = {mode: build(dataclasses.replace(setting, recompute=uniform_recompute(graph, mode)))
                for mode in FASTEST_FIRST}
    stage_of = np.asarray(solution.stage_of_block)
    modes = list(setting.recompute or ("none",) * len(graph.blocks))
    scale = scale_of(request, traced_batch_size, problem.num_microbatches, setting.dp)
    for s in range(problem.num_stages):
        members = [int(b) for b in np.flatnonzero(stage_of == s)]
        _relax_stage(graph, request, setting, variants, problem, solution, s, members, modes, scale)
    chosen = dataclasses.replace(setting, recompute=tuple(modes) if any(m != "none" for m in modes) else ())
    final = build(chosen)
    priced = price_assignment(final, stage_of, status=solution.status, backend=solution.backend,
                              solve_seconds=solution.solve_seconds)
    if problem.num_stages == 1:
        return chosen, final, priced
    try:
        again = solve_pipeline(final, backend=solution.backend if solution.backend != "dp" else "auto")
    except PlanError:
        return chosen, final, priced
    roomy = all(used + final.reserved_bytes <= RELAX_UP_TO * (cap + final.reserved_bytes)
                for used, cap in zip(again.stage_memory_bytes, final.memory_capacity))
    return (chosen, final, again) if roomy and again.step_seconds < priced.step_seconds else (chosen, final, priced)


def _relax_stage(graph: BlockGraph, request, setting: Setting, variants: dict[str, PipelineProblem],
                 problem: PipelineProblem, solution: PipelineSolution, s: int, members: list[int],
                 modes: list[str], scale: float) -> None:
    """Greedy per-block relaxation of stage `s` (in place on `modes`)."""
    if not members:
        return
    capacity = RELAX_UP_TO * float(problem.memory_capacity[s] + problem.reserved_bytes)
    k = problem.in_flight(s)
    boundary = k * sum(v.num_bytes for v in problem.values
                       if solution.stage_of_block[v.producer] <= s - 1 < max(solution.stage_of_block[c]
                                                                             for c in v.consumers)
                       or solution.stage_of_block[v.producer] <= s < max(solution.stage_of_block[c]
                                                                         for c in v.consumers))
    units = fsdp_unit_transient_bytes([graph.blocks[b] for b in members], request, setting)
    terms = {mode: variants[mode].stage_memory_terms(s) for mode in FASTEST_FIRST}
    seconds = {mode: variants[mode].bwd_seconds[:, s] for mode in FASTEST_FIRST}
    rebuilt = {mode: [recompute_transient_bytes(graph.blocks[b], request, setting, mode) * scale
                      for b in range(len(graph.blocks))] for mode in FASTEST_FIRST}

    choice = {b: modes[b] for b in members}
    first = {b: terms[choice[b]][0][b] for b in members}
    second = {b: terms[choice[b]][1][b] for b in members}
    held = {b: rebuilt[choice[b]][b] for b in members}
    while True:
        total_first, total_second = sum(first.values()), sum(second.values())
        largest = sorted(held.values(), reverse=True)[:2] + [0.0, 0.0]
        current = max(total_first, total_second) + max(largest[0], 0.0)
        best: tuple[float, int, str] | None = None
        for b in members:
            here = FASTEST_FIRST.index(choice[b])
            others = largest[1] if held[b] == largest[0] else largest[0]  # the largest rebuild but b's
            for mode in FASTEST_FIRST[:here]:
                saved = float(seconds[choice[b]][b] - seconds[mode][b])
                if saved <= 0:
                    continue
                after = (max(total_first - first[b] + terms[mode][0][b], total_second - second[b] + terms[mode][1][b])
                         + max(others, rebuilt[mode][b]))
                if after + boundary + units > capacity:
                    continue
                ratio = saved / max(after - current, 1.0)
                if best is None or ratio > best[0]:
                    best = (ratio, b, mode)
        if best is None:
            break
        _, b, mode = best
        choice[b] = mode
        first[b], second[b], held[b] = terms[mode][0][b], terms[mode][1][b], rebuilt[mode][b]
    for b, mode in choice.items():
        modes[b] = mode
