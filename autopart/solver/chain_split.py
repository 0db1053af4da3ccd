"""The exact dynamic program over contiguous splits: the answer for chains, a hint for DAGs.

A split that keeps the topological order contiguous (stage s holds blocks
i_s..i_{s+1}−1) is found exactly in O(S·n²) over the cut positions. When the
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
    (all splits of a chain) in O(S·n²). Returns the stage per block.
    """
    num_blocks, num_stages = costs.compute.shape
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
    invalid = np.tril(np.ones((num_blocks + 1, num_blocks + 1), dtype=bool))  # need i < j
    best = np.full(num_blocks + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((num_stages, num_blocks + 1), dtype=np.int64)
    for s in range(num_stages):
        left = cut_bytes[:, s] if s > 0 else np.zeros(num_blocks + 1)
        right = cut_bytes[:, s] if s < num_stages - 1 else np.zeros(num_blocks + 1)
        mem = prefix_m[None, :, s] - prefix_m[:, None, s] + left[:, None] + right[None, :]
        if objective == "time":
            cost = (
                prefix_t[None, :, s] - prefix_t[:, None, s] + cut_seconds[:, s][:, None]
                + cut_seconds[:, s + 1][None, :]
            )
            cost = np.where(mem <= costs.capacity[s], cost, np.inf)
        else:
            cost = mem - costs.capacity[s]
        cand = np.maximum(best[:, None], np.where(invalid, np.inf, cost))
        choice[s] = np.argmin(cand, axis=0)
        best = cand[choice[s], np.arange(num_blocks + 1)]
    if not np.isfinite(best[num_blocks]):
        return None
    stage_of_block = np.empty(num_blocks, dtype=np.int64)
    j = num_blocks
    for s in range(num_stages - 1, -1, -1):
        i = choice[s, j]
        stage_of_block[i:j] = s
        j = i
    return stage_of_block
