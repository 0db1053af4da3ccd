"""Integer programs that decide where to cut the pipeline (plain arrays in, dataclasses out)."""

from __future__ import annotations

from autopart.solver.brute_force import brute_force_pipeline
from autopart.solver.pipeline_ilp import solve_pipeline
from autopart.schedules import SCHEDULES
from autopart.solver.problem import PipelineProblem, PipelineSolution, ValueFlow

__all__ = [
    "SCHEDULES",
    "PipelineProblem",
    "PipelineSolution",
    "ValueFlow",
    "brute_force_pipeline",
    "solve_pipeline",
]
