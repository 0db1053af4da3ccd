"""The model and its example batch, as the planner traces them at any microbatch size.

One `ModelSource` per `autopart.compile`: the model, the whole example batch
(flattened), the cluster the graph is costed for and the autocast dtype. The
planner asks it for the costed graph of the first `size` samples; a graph traced
again at another size (the plan's microbatch, or the whole model after a layer
stack was analysed once) is checked to cut into the blocks planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx

from autopart import passes
from autopart.core.batch import batch_size_of, take_rows
from autopart.core.blocks import BlockGraph
from autopart.core.errors import PlanError
from autopart.cost_models import Cluster
from autopart.frontend.tracing import trace


def annotate_graph(gm: torch.fx.GraphModule, cluster: Cluster,
                   compute_dtype: torch.dtype | None, fused: bool = False) -> torch.fx.GraphModule:
    """Costs of the graph as it runs: constant attention masks as SDPA's flags (the eager model's
    kernels), and under autocast the grouped expert matmuls cast to its dtype (passes/expert_precision.py)
    and the values re-propagated in their autocast dtypes first; with
    `fused`, times as TorchInductor's fused kernels run (passes/fusion.py), else op by op."""
    gm = passes.use_causal_attention(gm)
    if compute_dtype is not None:
        passes.experts_in_compute_dtype(gm, compute_dtype)   # grouped expert matmuls as autocast's matmuls
        gm = passes.autocast_values(gm, compute_dtype)
    gm = passes.annotate(gm, cluster, autocast_dtype=compute_dtype)
    return passes.price_fused_kernels(gm, cluster) if fused else gm


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """The model and one whole example batch, costed for `cluster` under `compute_dtype`."""

    model: torch.nn.Module
    flat_batch: tuple[Any, ...]
    """The example (args, kwargs), flattened (torch.utils._pytree)."""
    in_spec: Any
    """How `flat_batch` rebuilds (args, kwargs)."""
    cluster: Cluster
    compute_dtype: torch.dtype | None
    """The autocast dtype of mixed precision (None: the model's own dtypes)."""
    fused: bool = False
    """Priced as TorchInductor's fused kernels run (compiled kernels), else op by op."""

    @classmethod
    def of(cls, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None, cluster: Cluster,
           compute_dtype: torch.dtype | None, *, fused: bool = False) -> "ModelSource":
        flat, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        return cls(model=model, flat_batch=tuple(flat), in_spec=spec, cluster=cluster, compute_dtype=compute_dtype,
                   fused=fused)

    @property
    def batch_size(self) -> int:
        """Samples in the example batch (dim 0 of its batched tensors)."""
        return batch_size_of(self.flat_batch)

    def rows(self, size: int) -> tuple[tuple, dict]:
        """(args, kwargs) of the first `size` samples of the batch."""
        micro = take_rows(list(self.flat_batch), self.batch_size, 0, size)
        args, kwargs = torch.utils._pytree.tree_unflatten(micro, self.in_spec)
        return tuple(args), dict(kwargs)

    def costed_graph(self, size: int) -> torch.fx.GraphModule:
        """The whole model traced at `size` samples, every node costed."""
        return annotate_graph(trace(self.model, *self.rows(size)), self.cluster, self.compute_dtype, self.fused)

    def planned_graph(self, size: int, depth: int, planned: Sequence[str],
                      model_class: str) -> tuple[torch.fx.GraphModule, BlockGraph]:
        """The costed graph at `size` samples and its blocks at module depth `depth`, which must be
        the blocks `planned`, in order: models may trace to other ops at another batch size (a
        batch of 1 broadcasts otherwise), so plans carry over block by block, never node by node."""
        gm = self.costed_graph(size)
        blocks = passes.coarsen(gm, self.cluster, depth=depth)
        check_blocks(list(planned), blocks, size, model_class)
        return gm, blocks


def check_blocks(planned: list[str], traced: BlockGraph, size: int, model_class: str) -> None:
    """`traced` must cut into the blocks `planned`, in the same order."""
    names = [b.name for b in traced.blocks]
    if planned != names:
        first = next((p, t) for p, t in zip(planned + [None], names + [None]) if p != t)
        raise PlanError(
            f"{model_class} traced at microbatch size {size} cuts into other blocks than the ones planned "
            f"(first difference: {first[0]} vs {first[1]}); its structure depends on the batch size or on "
            "the number of layers: fix num_microbatches, use a larger batch, or plan with reuse_layers=False")
