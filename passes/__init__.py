"""Every function that reads or rewrites a GraphModule."""

from autopart.passes import context_parallel, expert_parallel, tensor_parallel
from autopart.core.blocks import Block, BlockGraph, BlockValue
from autopart.passes.coarsen import coarsen
from autopart.passes.codegen import stage_modules
from autopart.passes.node_costs import COST_META_KEY, NodeCost, annotate, node_cost
from autopart.passes.attention import use_causal_attention
from autopart.passes.device import device_literals, move_to_device
from autopart.passes.autocast_values import autocast_values
from autopart.passes.expert_precision import experts_in_compute_dtype
from autopart.passes.fusion import price_fused_kernels
from autopart.passes.regions import nest_regions
from autopart.passes.split import split_stages

__all__ = [
    "COST_META_KEY", "Block", "BlockGraph", "BlockValue", "NodeCost", "annotate", "context_parallel", "autocast_values",
    "coarsen", "device_literals", "experts_in_compute_dtype", "move_to_device", "nest_regions", "node_cost",
    "price_fused_kernels", "split_stages", "stage_modules", "tensor_parallel",
    "use_causal_attention",
]
