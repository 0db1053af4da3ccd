"""Peak training memory of one forward and backward, replayed node by node from the annotations.

A check of the annotations themselves, not a model the planner uses (the planner's memory model
is planner/step_costs.py, per block): if every node's saved activations and outputs are exact,
a replay of autograd's lifetimes over them matches a tracking allocator. Replays the step over an annotated graph (passes.annotate): at the end of the
forward, parameters + buffers + every node's saved activations + the outputs
are live; then, walking backward in reverse graph order, parameter gradients
appear at the first backward that reaches them, each node's saved tensors are
freed after its backward, and each value's gradient lives from its last
reader's backward until its producer's. Measured against a tracking allocator
(benchmarks/memory_estimate.py): within 1% of the traced graph's peak for
GPT-2, Llama, BERT, nn.TransformerEncoder and MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

from autopart.passes.node_costs import node_cost


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Peak training memory from the annotations (see the module docstring)."""

    state: int
    """Parameters and buffers (each get_attr target once)."""
    grads: int
    """Gradients of the trainable parameters."""
    saved: int
    """Σ saved_bytes: what autograd keeps from the forward."""
    outputs: int
    """Bytes of the graph outputs."""
    forward_end: int
    """state + saved + outputs."""
    peak: int
    """Largest live total over the forward end and every backward step."""
    peak_at: str
    """Node whose backward is running at the peak ('forward end' or 'loss' otherwise)."""

    @property
    def sum_bound(self) -> int:
        """state + grads + saved + outputs: every term at its largest at once."""
        return self.state + self.grads + self.saved + self.outputs


# Views whose backward writes the view's gradient into a zero-filled tensor of
# the base's size (select_backward, slice_backward, ... in
# tools/autograd/derivatives.yaml). Two or more of them on one base add their
# base-size gradients out of place. Other views (view, reshape, transpose,
# split, ...) pass the gradient on without a base-size allocation.
_SCATTER_VIEWS = {
    torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.narrow.default,
    torch.ops.aten.diagonal.default, torch.ops.aten.as_strided.default,
}


def _is_view(node: torch.fx.Node) -> bool:
    """A call whose outputs all reuse an input's storage (annotate gives it output_bytes 0)."""
    return node.op == "call_function" and bool(node.all_input_nodes) and node_cost(node).output_bytes == 0


def _val_bytes(node: torch.fx.Node) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(node.meta.get("val"))
               if isinstance(t, torch.Tensor))


def estimate_training_peak(gm: torch.fx.GraphModule) -> Estimate:
    """Replay forward end and backward over an annotated graph; return the peak live bytes."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(nodes)}
    loss_step = len(nodes)

    # Which nodes autograd runs a backward for. annotate zeroes a call's
    # backward FLOPs and seconds exactly when no output needs grad; a view
    # (no FLOPs, no bytes) needs grad when its base does.
    needs_grad: dict[torch.fx.Node, bool] = {}
    for n in nodes:
        cost = node_cost(n)
        if n.op == "get_attr":
            needs_grad[n] = cost.trainable
        elif _is_view(n):
            needs_grad[n] = needs_grad[n.all_input_nodes[0]]
        else:
            needs_grad[n] = n.op == "call_function" and (
                cost.bwd_flops > 0 or any(bwd > 0 for _, _, bwd in cost.seconds))

    # The gradient of a plain view is its base's (the view's readers count as
    # the base's); a scatter view has a gradient of its own, of its size.
    base: dict[torch.fx.Node, torch.fx.Node] = {}
    grad_bytes: dict[torch.fx.Node, int] = {}
    for n in nodes:
        if _is_view(n) and n.target not in _SCATTER_VIEWS:
            base[n] = base[n.all_input_nodes[0]]
        else:
            base[n] = n
            grad_bytes[n] = _val_bytes(n) if _is_view(n) else node_cost(n).output_bytes
    # grad_from[b]: the backward step that first produces a gradient for b.
    grad_from: dict[torch.fx.Node, int] = {}
    for n in nodes:
        if n.op == "call_function" and needs_grad[n]:
            for arg in n.all_input_nodes:
                grad_from[base[arg]] = max(grad_from.get(base[arg], -1), position[n])
    outputs = list(gm.graph.output_node().all_input_nodes)
    for out in outputs:
        grad_from[base[out]] = loss_step
    # Backward steps that add a second (third, ...) base-size gradient into a
    # base: the new zero-filled tensor and the sum are live at that step.
    accumulate: dict[int, int] = {}
    scatters: dict[torch.fx.Node, list[int]] = {}
    for n in nodes:
        if n.target in _SCATTER_VIEWS and needs_grad[n] and n in grad_from:
            scatters.setdefault(base[n.all_input_nodes[0]], []).append(position[n])
    for b, steps in scatters.items():
        for step in sorted(steps, reverse=True)[1:]:
            accumulate[step] = accumulate.get(step, 0) + 2 * grad_bytes[b]

    state_by_target = {n.target: node_cost(n).param_bytes + node_cost(n).buffer_bytes
                       for n in nodes if n.op == "get_attr"}
    state = sum(state_by_target.values())
    # A parameter's gradient appears at the first backward that reaches any of
    # its get_attr nodes (tied weights: one target, one gradient).
    grad_step: dict[str, int] = {}
    for n in nodes:
        if n.op == "get_attr" and needs_grad[n] and n in grad_from:
            grad_step[n.target] = max(grad_step.get(n.target, -1), grad_from[n])
    saved = sum(node_cost(n).saved_bytes for n in nodes)
    output_bytes = sum(grad_bytes[b] for b in {base[o] for o in outputs})
    activation_grads = [(position[b], step, grad_bytes[b])
                        for b, step in grad_from.items() if b.op == "call_function"]

    forward_end = state + saved + output_bytes
    peak, peak_at = forward_end, "forward end"
    saved_left = saved
    for step in range(loss_step, -1, -1):
        node = nodes[step] if step < loss_step else None
        if node is not None and not (node.op == "call_function" and needs_grad[node]):
            continue
        grads = sum(state_by_target[t] for t, s in grad_step.items() if s >= step)
        in_flight = sum(b for produced, first, b in activation_grads if produced <= step <= first)
        live = state + grads + saved_left + output_bytes + in_flight + accumulate.get(step, 0)
        if live > peak:
            peak, peak_at = live, node.name if node is not None else "loss"
        if node is not None:
            saved_left -= node_cost(node).saved_bytes
    return Estimate(
        state=state, grads=sum(state_by_target[t] for t in grad_step), saved=saved, outputs=output_bytes,
        forward_end=forward_end, peak=peak, peak_at=peak_at,
    )
