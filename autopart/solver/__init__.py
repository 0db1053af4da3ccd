"""Integer programs and exact searches over plain arrays (the problems of autopart/problems.py).

- `solve_pipeline`: where to cut blocks into pipeline stages (pipeline_ilp.py, the
  dynamic program of chain_split.py for chains);
- `solve_tp`: which sharding strategy each op of a tensor-parallel group runs
  (strategy_ilp.py);
- `brute_force_pipeline`, `brute_force_tp`: the references they are tested against.

Both models go through backends.py (OR-Tools CP-SAT, or a MIP solver for the pipeline).
"""

from __future__ import annotations

from autopart.solver.brute_force import brute_force_pipeline, brute_force_tp
from autopart.solver.pipeline_ilp import solve_pipeline
from autopart.solver.strategy_ilp import solve_tp

__all__ = ["brute_force_pipeline", "brute_force_tp", "solve_pipeline", "solve_tp"]
