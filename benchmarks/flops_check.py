"""FLOPs from `passes.annotate` against `torch.utils.flop_counter.FlopCounterMode` on the eager model.

For every zoo family: the annotated graph's total forward and backward FLOPs
beside FlopCounterMode's count of the eager model's forward and backward
(train mode, grad enabled: nn.TransformerEncoder's eval/no_grad fast path is
one fused op counted as 0; the CPU flash attention is taught to
FlopCounterMode by `register_missing_flop_formulas`).

Forward agrees exactly. Backward differs by what `backward_skips` explains:

1. Our convention (cost_models/flops.py) prices a matmul's or a conv's
   backward at 2 × forward, one product per operand. Autograd skips the
   product of an operand that needs no gradient: the first layer's input
   (MLP, nn.TransformerEncoder's in_proj, ViT's patch conv).
2. We price attention's backward as the fused kernel's five matmuls (2.5 ×
   forward). The CPU has no fused kernel for a mask that needs a gradient
   (T5's learned position bias), so eager runs the math path: two bmm
   forward, four backward (2 × forward), 0.5 × forward less.

    python benchmarks/flops_check.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

import autopart
from autopart import zoo
from autopart.cost_models import Cluster, register_missing_flop_formulas
from autopart.passes import annotate, node_cost
from autopart.frontend.tracing import flatten_inputs, io_spec


def eager_kwargs(gm: torch.fx.GraphModule, entry: zoo.ZooModel) -> dict:
    """The entry's keywords plus those the trace added (use_cache=False): the same program as the graph."""
    return {**dict(io_spec(gm).default_kwargs), **entry.kwargs}


def eager_flops(entry: zoo.ZooModel, kwargs: dict) -> tuple[int, int, dict[str, int]]:
    """FlopCounterMode's forward and backward FLOPs of the eager model, and the forward's counts by op."""
    register_missing_flop_formulas()  # the CPU flash attention, forward and backward
    entry.model.train()
    entry.model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        with FlopCounterMode(display=False) as forward:
            out = entry.main_output(entry.model(*entry.args, **kwargs))
        with FlopCounterMode(display=False) as backward:
            out.sum().backward()
    entry.model.zero_grad(set_to_none=True)
    counts = {str(op): n for op, n in forward.get_flop_counts().get("Global", {}).items()}
    return forward.get_total_flops(), backward.get_total_flops(), counts


class _RequiresGrad(torch.fx.Interpreter):
    """Runs the graph on real tensors and records which node values require grad."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.requires_grad: dict[torch.fx.Node, bool] = {}

    def run_node(self, node: torch.fx.Node):
        result = super().run_node(node)
        self.requires_grad[node] = any(
            t.requires_grad for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor))
        return result


# Operand positions of the matmul-like ops: autograd makes one product per
# operand that needs a gradient, each of the forward's size.
_MATMUL_OPERANDS = {
    "linear": (0, 1), "mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2),
    "convolution": (0, 1), "conv1d": (0, 1), "conv2d": (0, 1), "conv3d": (0, 1),
}
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"}


def backward_skips(gm: torch.fx.GraphModule, flat_inputs: list) -> tuple[int, int]:
    """(matmul products autograd skips, attention math-path discount), in backward FLOPs (module docstring)."""
    interp = _RequiresGrad(gm)
    interp.run(*flat_inputs)
    grad = interp.requires_grad
    no_grad_operands = math_attention = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        cost, name = node_cost(node), node.target.overloadpacket.__name__
        if cost.bwd_flops == 0:
            continue
        if name in _MATMUL_OPERANDS:
            operands = [node.args[i] if i < len(node.args) else None for i in _MATMUL_OPERANDS[name]]
            no_grad_operands += cost.fwd_flops * sum(
                not (isinstance(a, torch.fx.Node) and grad[a]) for a in operands)
        elif name in _SDPA:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            if isinstance(mask, torch.fx.Node) and grad[mask]:
                math_attention += cost.bwd_flops - 2 * cost.fwd_flops
    return no_grad_operands, math_attention


def check(entry: zoo.ZooModel) -> dict[str, int]:
    """Trace, annotate and count one model; every figure of the table's row."""
    gm = annotate(autopart.trace(entry.model, entry.args, entry.kwargs), Cluster.cpu(1))
    kwargs = eager_kwargs(gm, entry)
    costs = [node_cost(n) for n in gm.graph.nodes if n.op != "output"]
    eager_fwd, eager_bwd, _ = eager_flops(entry, kwargs)
    no_grad, math = backward_skips(gm, flatten_inputs(gm, entry.args, kwargs))
    return dict(ours_fwd=sum(c.fwd_flops for c in costs), eager_fwd=eager_fwd,
                ours_bwd=sum(c.bwd_flops for c in costs), eager_bwd=eager_bwd, no_grad=no_grad, math=math)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    header = (f"{'family':20s} {'fwd ours':>12s} {'fwd eager':>12s} {'ratio':>7s} {'bwd ours':>12s}"
              f" {'bwd eager':>12s} {'ratio':>7s} {'no-grad':>10s} {'math-attn':>10s} explained")
    print(header)
    print("-" * len(header))
    for family, make in zoo.ALL_FAMILIES.items():
        torch.manual_seed(0)
        started = time.perf_counter()
        r = check(make())
        explained = r["ours_bwd"] - r["no_grad"] - r["math"] == r["eager_bwd"]
        print(f"{family:20s} {r['ours_fwd']:12d} {r['eager_fwd']:12d} {r['ours_fwd'] / r['eager_fwd']:7.4f}"
              f" {r['ours_bwd']:12d} {r['eager_bwd']:12d} {r['ours_bwd'] / r['eager_bwd']:7.4f}"
              f" {r['no_grad']:10d} {r['math']:10d} {'exact' if explained else 'NO'}"
              f"  ({time.perf_counter() - started:.1f} s)")
    print("\nexplained: bwd ours - no-grad - math-attn == bwd eager (see the module docstring).")


if __name__ == "__main__":
    main()
