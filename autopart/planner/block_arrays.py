"""A block graph's per-block costs as arrays, for the planner and the layout search.

`Block.time_on(device)` answers one block on one device; the planner needs every
block on every stage of thousands of candidate layouts. These helpers read each
block once per device kind and broadcast, with the same arithmetic as
`BlockTimes.fwd` / `bwd` (fixed + scale · scaled), so the numbers are identical.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from autopart.core.blocks import BlockGraph


def time_table(graph: BlockGraph, device: str) -> np.ndarray:
    """[4, n] seconds of every block on `device` at the traced batch: forward fixed, forward
    scaled, backward fixed, backward scaled (`BlockTimes`)."""
    rows = [graph.blocks[b].time_on(device) for b in range(len(graph.blocks))]
    return np.array([[t.fwd_fixed_s for t in rows], [t.fwd_scaled_s for t in rows],
                     [t.bwd_fixed_s for t in rows], [t.bwd_scaled_s for t in rows]], dtype=np.float64)


def stage_seconds(graph: BlockGraph, devices: Sequence[str], scale: float,
                  training: bool) -> tuple[np.ndarray, np.ndarray]:
    """([n, S] forward, [n, S] backward) seconds of one microbatch (`scale` × the traced batch) of
    every block on the device of every stage; the backward is zero for inference."""
    names = list(dict.fromkeys(devices))
    column = np.array([names.index(d) for d in devices], dtype=np.int64)
    tables = [time_table(graph, name) for name in names]
    fwd = np.stack([t[0] + scale * t[1] for t in tables], axis=1)[:, column]
    if not training:
        return fwd, np.zeros_like(fwd)
    bwd = np.stack([t[2] + scale * t[3] for t in tables], axis=1)[:, column]
    return fwd, bwd
