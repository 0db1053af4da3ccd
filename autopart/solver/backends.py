"""OR-Tools backends behind the few calls the integer programs need (pipeline_ilp.py, strategy_ilp.py).

CP-SAT takes integer coefficients (the model scales seconds and bytes to
integers); the MIP backends (pywraplp: SCIP, HiGHS, CBC) take floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from autopart.core.errors import InputError

_MIP_SOLVERS = ("SCIP", "HIGHS", "CBC")
"""pywraplp solvers tried in order for backend 'mip' (all three ship with OR-Tools 9.15).
SCIP first: it takes the hint and prints nothing. HiGHS ('mip:HIGHS') was 2–5× faster
than SCIP on the branching DAGs but prints a banner on every solve and crashes when
given a hint; CBC took 1.6 s on the 100-block chain and 15 s on the 60-block DAG."""

class _CpSat:
    """CP-SAT behind the few calls the model needs (integer coefficients)."""

    integral = True

    def __init__(self, num_workers: int = 1, linearization_level: int = 0) -> None:
        # One worker: on 2 cores it beat two on every pipeline benchmark instance (4 towers of 10
        # blocks: 6.1 s against 10.2 s; 3 towers of 30: optimal in 16 s, against not in 20 s).
        # No LP relaxation (level 0): for the pipeline model propagation and clause learning alone
        # were 2–5× faster on branching DAGs (80 blocks on 6 stages: 0.24 s against 0.51 s) and
        # equal on chains.
        self.name = "cpsat"
        self.model = cp_model.CpModel()
        self.solver = cp_model.CpSolver()
        self.num_workers = num_workers
        self.linearization_level = linearization_level

    def bool_var(self) -> Any:
        return self.model.new_bool_var("")

    unit_var = bool_var  # w is integral once x is

    def num_var(self, lo: float, hi: float) -> Any:
        return self.model.new_int_var(int(np.ceil(lo)), int(np.floor(hi)), "")

    def add_le(self, terms: dict[Any, float], rhs: float) -> None:
        expr = cp_model.LinearExpr.weighted_sum(list(terms), list(terms.values()))
        self.model.add(expr <= rhs)

    def exactly_one(self, variables: list) -> None:
        self.model.add_exactly_one(variables)

    def implies(self, a: Any, b: Any) -> None:
        self.model.add_implication(a, b)

    def minimize(self, var: Any) -> None:
        self.model.minimize(var)

    def minimize_sum(self, terms: dict[Any, float]) -> None:
        self.model.minimize(cp_model.LinearExpr.weighted_sum(list(terms), list(terms.values())))

    def hints(self, variables: list, values: list[int]) -> None:
        hint = self.model.proto.solution_hint
        hint.vars.extend([v.index for v in variables])
        hint.values.extend(values)

    def solve(self, time_limit_s: float, log: bool) -> tuple[str, float]:
        params = self.solver.parameters
        params.max_time_in_seconds = time_limit_s
        params.num_workers = self.num_workers
        params.linearization_level = self.linearization_level
        params.log_search_progress = log
        status = self.solver.solve(self.model)
        names = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE",
                 cp_model.INFEASIBLE: "INFEASIBLE"}
        if status == cp_model.MODEL_INVALID:
            raise RuntimeError(f"invalid CP-SAT model: {self.model.validate()}")
        return names.get(status, "UNKNOWN"), float(self.solver.best_objective_bound)

    def value(self, var: Any) -> float:
        return float(self.solver.value(var))


class _Mip:
    """A pywraplp MIP solver (SCIP, HiGHS or CBC) behind the same calls (float coefficients)."""

    integral = False

    def __init__(self, which: str, solver: pywraplp.Solver | None) -> None:
        if solver is None:
            raise InputError(f"this OR-Tools build has no {which} solver; try backend='cpsat'")
        self.name, self.which, self.solver = f"mip/{which}", which, solver
        self.hint: tuple[list, list[float]] | None = None

    def bool_var(self) -> Any:
        return self.solver.BoolVar("")

    def unit_var(self) -> Any:
        return self.solver.NumVar(0.0, 1.0, "")

    def num_var(self, lo: float, hi: float) -> Any:
        return self.solver.NumVar(float(lo), float(hi), "")

    def add_le(self, terms: dict[Any, float], rhs: float) -> None:
        row = self.solver.RowConstraint(-self.solver.infinity(), float(rhs), "")
        for var, coef in terms.items():
            row.SetCoefficient(var, float(coef))

    def exactly_one(self, variables: list) -> None:
        row = self.solver.RowConstraint(1.0, 1.0, "")
        for var in variables:
            row.SetCoefficient(var, 1.0)

    def implies(self, a: Any, b: Any) -> None:
        self.add_le({a: 1.0, b: -1.0}, 0.0)

    def minimize(self, var: Any) -> None:
        self.minimize_sum({var: 1.0})

    def minimize_sum(self, terms: dict[Any, float]) -> None:
        objective = self.solver.Objective()
        for var, coef in terms.items():
            objective.SetCoefficient(var, float(coef))
        objective.SetMinimization()

    def hints(self, variables: list, values: list[int]) -> None:
        self.hint = (variables, [float(v) for v in values])

    def solve(self, time_limit_s: float, log: bool) -> tuple[str, float]:
        params = pywraplp.MPSolverParameters()
        params.SetDoubleParam(params.RELATIVE_MIP_GAP, 1e-9)
        # Memory rows are ≈ 1, so a split may exceed capacity by at most 1e-9 of it.
        params.SetDoubleParam(params.PRIMAL_TOLERANCE, 1e-9)
        self.solver.SetTimeLimit(max(1, int(time_limit_s * 1000)))
        if log:
            self.solver.EnableOutput()
        if self.hint and self.which != "HIGHS":  # HiGHS 1.12 segfaults on hints via pywraplp
            self.solver.SetHint(*self.hint)
        status = self.solver.Solve(params)
        names = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE",
                 pywraplp.Solver.INFEASIBLE: "INFEASIBLE"}
        return names.get(status, "UNKNOWN"), float(self.solver.Objective().BestBound())

    def value(self, var: Any) -> float:
        return float(var.solution_value())


def _make_backend(name: str, **cpsat_options: int) -> _CpSat | _Mip:
    """'cpsat' (options: num_workers, linearization_level), 'mip' (SCIP, else HiGHS, else CBC)
    or 'mip:<SOLVER>'."""
    if name == "cpsat":
        return _CpSat(**cpsat_options)
    if name.startswith("mip:"):
        return _Mip(name[4:], pywraplp.Solver.CreateSolver(name[4:]))
    if name == "mip":
        for which in _MIP_SOLVERS:
            solver = pywraplp.Solver.CreateSolver(which)
            if solver is not None:
                return _Mip(which, solver)
        raise InputError(f"this OR-Tools build has none of {_MIP_SOLVERS}; use backend='cpsat'")
    raise InputError(f"unknown backend {name!r}: use 'auto', 'cpsat', 'mip' or 'mip:<SOLVER>'")
