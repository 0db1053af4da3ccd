"""Tensor parallelism: every graph-side piece in one place.

- placements.py: where a value sits on the tp axis: `Replicate`, `Shard(dim, groups)`, `Partial`;
- strategy.py: `Strategy`, one way to run an op (input and output placements, work share, Megatron's f);
- op_rules.py: the strategies of each ATen op (matmuls, attention, embeddings, norms, elementwise,
  reductions);
- view_rules.py: the strategies of views, permutes, split/getitem, slice and cat (shards followed
  through reshapes);
- problem.py: the strategy problem: every op's strategies priced (compute, collectives, memory) as
  `TPProblem` arrays, and a solution read back as a `TPAssignment`;
- assignment.py: `TPAssignment`, the placement chosen per node and the collectives it implies (JSON
  in the Plan);
- user_plan.py: the user's plan (`colwise`, `rowwise`, `vocab` per module pattern) as fixed
  placements; Megatron's layouts of the zoo;
- blocks.py: block costs per device of a tp group under an assignment, for the pipeline planner;
- shard.py: `shard_graph`, one GraphModule per tp rank: parameter slices taken, collectives inserted
  as nodes;
- collectives.py: `TPCollective`, Megatron's autograd pairs (f, g, gathers, slices) on a process
  group, or across all ranks in one process;
- rank_ops.py: the local ops a split op becomes: a row-parallel bias added once, a
  vocabulary-parallel embedding.

These are passes: they read and rewrite GraphModules and build problems as
arrays; the driver (autopart/mesh_search.py) has the solver answer them.
"""

from autopart.passes.tensor_parallel.assignment import TPAssignment
from autopart.passes.tensor_parallel.block_costs import boundaries_replicated, restate_blocks
from autopart.passes.tensor_parallel.problem import TPProblemIndex, assignment_from_solution, build_tp_problem
from autopart.passes.tensor_parallel.shard import shard_graph, shard_stages
from autopart.passes.tensor_parallel.user_plan import plan_placements

__all__ = [
    "TPAssignment", "TPProblemIndex", "assignment_from_solution", "boundaries_replicated", "build_tp_problem",
    "plan_placements", "restate_blocks", "shard_graph", "shard_stages",
]
