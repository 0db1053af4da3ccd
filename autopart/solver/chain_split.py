"""The exact dynamic program over contiguous splits: the answer for chains, a hint for DAGs.

A split that keeps the topological order contiguous (stage s holds blocks
i_s..i_{s+1}−1) is found exactly in O(S·(n−S+1)²) over the cut positions. When the
blocks form a chain every valid split is contiguous, so this is the optimum
(`solve_pipeline(backend='auto')` returns it without building a model);
otherwise it is the ILP's hint and upper bound.
"""

from __future__ import annotations

import numpy as np

from autopart.solver.pipeline_costs import PipelineCosts


def contiguous_split(costs: PipelineCosts, *, objective: str = "time") -> np.ndarray | None:
    """Best split into S non-empty contiguous runs of blocks 0..n-1, or None.

    objective 'time': minimise max_s T_s subject to M_s ≤ capacity_s;
    'overflow': minimise max_s (M_s − capacity_s). Exact over contiguous splits
    (all splits of a chain) in O(S·(n−S+1)²). Returns the stage per block.
    """
    num_blocks, num_stages = costs.compute.shape
    if num_stages > num_blocks:
        return None
    # cut i: blocks < i left of the boundary; value v crosses it iff p_v < i ≤ last consumer.
    cuts = np.arange(num_blocks + 1)[:, None]
    last = np.array([max(c, default=-1) for c in costs.consumers], dtype=np.int64)
    cross = ((costs.producer[None, :] < cuts) & (cuts <= last[None, :])).astype(np.float64)
    cut_seconds = cross @ costs.value_seconds  # [n+1, S-1]
    cut_bytes = cross @ costs.value_memory  # [n+1, S]
    zeros = np.zeros((num_blocks + 1, 1))
    cut_seconds = np.hstack([zeros, cut_seconds, zeros])  # column s+1: boundary s
    prefix_t = np.vstack([np.zeros((1, num_stages)), np.cumsum(costs.compute, axis=0)])
    prefix_m = np.vstack([np.zeros((1, num_stages)), np.cumsum(costs.block_memory, axis=0)])
    # After s stages the cut sits in [s, s + width - 1] (every stage holds a block): stage s
    # starts at i in that band and ends at j in the band one further. Work is S·width², not S·n².
    width = num_blocks - num_stages + 1
    band = np.arange(width)
    invalid = band[:, None] > band[None, :]  # start i = s + a, end j = s + 1 + b: need a ≤ b
    best = np.full(width, np.inf)  # best[a]: cost of the first s stages ending at cut s + a
    best[0] = 0.0
    choice = np.zeros((num_stages, width), dtype=np.int64)
    for s in range(num_stages):
        starts, ends = s + band, s + 1 + band
        left = cut_bytes[starts, s] if s > 0 else np.zeros(width)
        right = cut_bytes[ends, s] if s < num_stages - 1 else np.zeros(width)
        mem = prefix_m[ends, s][None, :] - prefix_m[starts, s][:, None] + left[:, None] + right[None, :]
        if objective == "time":
            cost = (prefix_t[ends, s][None, :] - prefix_t[starts, s][:, None] + cut_seconds[starts, s][:, None]
                    + cut_seconds[ends, s + 1][None, :])
            cost = np.where(mem <= costs.capacity[s], cost, np.inf)
        else:
            cost = mem - costs.capacity[s]
        cand = np.maximum(best[:, None], np.where(invalid, np.inf, cost))
        choice[s] = np.argmin(cand, axis=0)
        best = cand[choice[s], band]
    if not np.isfinite(best[width - 1]):
        return None
    stage_of_block = np.empty(num_blocks, dtype=np.int64)
    j = width - 1  # the last stage ends at cut n = (S - 1) + 1 + (width - 1)
    for s in range(num_stages - 1, -1, -1):
        a = choice[s, j]
        stage_of_block[s + a:s + 1 + j] = s
        j = a
    return stage_of_block
