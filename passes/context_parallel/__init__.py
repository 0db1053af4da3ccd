"""Context parallelism: every graph-side piece in one place.

- rules.py: how a sequence shard moves through each ATen op, and what an op needs when it cannot
  take one (a whole input sliced to the local positions, a split input gathered, the op rewritten);
- layout.py: `analyse_context`, the layout of every value of the traced graph (which inputs are
  the tokens, which values hold a rank's positions only);
- ops.py: the ops rank modules call (`ContextSlice`, `ContextGather`, `ContextReduce`,
  `ContextAttention`), on a process group or across all ranks in one process;
- rewrite.py: `shard_context`, a layout applied to a rank module; `localize` and
  `attach_context_group` for the runtime.

The layout of a sequence over a cp group (which chunks each rank holds) is
autopart/core/context_chunks.py, shared with the runtimes.
"""

from __future__ import annotations

import torch.fx

from autopart.core.interfaces import stage_interface
from autopart.passes.context_parallel.layout import ContextLayout, analyse_context, attention_sites, find_tokens
from autopart.passes.context_parallel.ops import (
    ContextAttention, ContextGather, ContextOp, ContextReduce, ContextSlice, context_ops,
)
from autopart.passes.context_parallel.rewrite import attach_context_group, localize, shard_context, warn_mixing
from autopart.passes.context_parallel.rules import SeqShard


def shard_stages_context(gm: torch.fx.GraphModule, ranks: list[list[torch.fx.GraphModule]],
                         cp: int) -> list[list[torch.fx.GraphModule]]:
    """Every stage's rank modules ([stage][tp rank], cut from the traced graph `gm`) rewritten in
    place for sequences split over `cp` ranks; the model's outputs leave the last stage whole."""
    layout = analyse_context(gm, cp)
    warn_mixing(layout)
    for modules in ranks:
        for module in modules:
            interface = stage_interface(module)
            last = interface.stage == interface.num_stages - 1
            shard_context(module, layout, model_outputs=interface.model_outputs if last else None)
    return ranks


__all__ = [
    "ContextAttention", "ContextGather", "ContextLayout", "ContextOp", "ContextReduce", "ContextSlice", "SeqShard",
    "analyse_context", "attach_context_group", "attention_sites", "context_ops", "find_tokens", "localize",
    "shard_context", "shard_stages_context",
]
