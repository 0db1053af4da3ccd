"""Annotate every node of a traced graph with its cost (`NodeCost`).

An analysis pass in the manner of torch/fx/passes/fake_tensor_prop.py: a
`torch.fx.Interpreter` runs the graph on fake tensors (no memory, no compute)
with autograd on, and writes one meta key, ``node.meta["autopart_cost"]``.

What it measures per node, and how:
- forward/backward FLOPs: `cost_models.op_flops` on the node's fake arguments
  (FlopCounterMode for non-ATen nodes of a symbolic_trace graph);
- bytes moved: tensor bytes read plus written by the forward (0 for views);
  backward moves about twice that (reads the output gradient and the saved
  tensors, writes input gradients) — an approximation stated here;
- saved activations: the exact tensors autograd keeps for backward, caught with
  `torch.autograd.graph.saved_tensors_hooks` while the node runs; each storage
  is counted once, on the node that first saves it, parameters excluded;
- parameter and buffer bytes on the `get_attr` nodes that read them;
- time: `cost_models.op_seconds` (roofline) on each distinct device of the cluster,
  at the dtype the op computes in.

With `autocast_dtype` (mixed precision) the graph runs under `torch.autocast`
on fake CPU tensors (passes/autocast_values.py): matmuls compute and are priced in
bf16, and what autograd saves is what autocast makes — the bf16 activations,
and each microbatch's bf16 copy of every weight a matmul reads.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from autopart.cost_models import Cluster, op_flops, op_seconds, weight_read_seconds
from autopart.cost_models.experts import expert_loop_launches
from autopart.core.errors import MissingAnnotationError
from autopart.passes.autocast_values import (AUTOCAST_DEVICE_TYPE, devices_on_cpu, fake_like,
                                              histc_on_cpu_fakes)

_SDPA = torch.ops.aten.scaled_dot_product_attention.default

COST_META_KEY = "autopart_cost"

# Backward reads the output gradient and the saved inputs and writes the input
# gradients: about twice the forward's traffic for elementwise and norm ops.
BACKWARD_BYTES_FACTOR = 2.0


@dataclass(frozen=True, kw_only=True)
class NodeCost:
    """The cost of one graph node for one call (one trace-time batch)."""

    fwd_flops: int
    """Tensor-core FLOPs of the forward (multiply-add = 2)."""
    bwd_flops: int
    """FLOPs of its backward."""
    fwd_bytes: int
    """Bytes read plus written by the forward; 0 for views."""
    output_bytes: int
    """Bytes of the new storages the node outputs (0 for views of an input and in-place results)."""
    saved_bytes: int
    """Bytes of new storages autograd keeps from this node until backward."""
    param_bytes: int
    """Bytes of the parameter a get_attr node reads (0 elsewhere)."""
    trainable: bool
    """Whether that parameter requires grad (gets gradients and optimizer state)."""
    buffer_bytes: int
    """Bytes of the buffer or constant a get_attr node reads (0 elsewhere)."""
    dtype: str
    """Dtype of the node's first tensor output ('' if none)."""
    seconds: tuple[tuple[str, float, float], ...]
    """(device name, forward s, backward s) for each distinct device of the cluster."""
    saved_inputs: tuple[tuple[str, int], ...] = ()
    """Of `saved_bytes`, the storages that are an input's (input node name, bytes): a tensor-parallel
    rank keeps them in the placement the op reads them in (passes/tensor_parallel/block_costs.py)."""
    fusible_casts: tuple[int, ...] = ()
    """Elements of each activation input autocast converts for this op (weights excluded): kernels
    of their own eagerly, part of the producing kernel when compiled (passes/fusion.py)."""
    op_by_op: "NodeCost | None" = None
    """The node's cost op by op, kept where passes/fusion.py rewrote this one as compiled kernels
    run (None: this one is op by op). What a region that stays eager in a compiled plan costs
    ('selective' recomputation: autopart/runtime/kernels.py)."""
    per_call_seconds: tuple[tuple[str, float, float], ...] = ()
    """Of `seconds`, (device name, forward s, backward s) of work done once per call whatever its
    batch: autocast's conversions of float32 weights (and of their gradients back), and what reading
    the weights adds to the op's roofline (`cost_models.weight_read_seconds`). The planner
    scales the rest of a time with the microbatch (planner/pricing.py), not this; a tensor-parallel
    split shrinks it with the weight. Empty: none."""
    launch_seconds: tuple[tuple[str, float, float], ...] = ()
    """Of `seconds`, (device name, forward s, backward s) that are fixed per call: kernel launches,
    which neither scale with the batch nor shrink under a tensor-parallel split. Empty: one launch
    floor (`DeviceSpec.launch_overhead_s`, cost_models/roofline.py) per direction with time; a node
    of a fused kernel holds its share of the kernel's launches (passes/fusion.py)."""

    def fwd_seconds(self, device_name: str) -> float:
        return self._times(device_name)[0]

    def bwd_seconds(self, device_name: str) -> float:
        return self._times(device_name)[1]

    def _times(self, device_name: str) -> tuple[float, float]:
        for name, fwd, bwd in self.seconds:
            if name == device_name:
                return fwd, bwd
        known = [name for name, _, _ in self.seconds]
        raise MissingAnnotationError(
            f"no time for device {device_name!r} (annotated for {known}); "
            "run passes.annotate(gm, cluster) with the cluster you plan for"
        )


def eager_cost(cost: NodeCost) -> NodeCost:
    """`cost` op by op: its `op_by_op`, or itself where it was never priced as compiled kernels."""
    return cost.op_by_op if cost.op_by_op is not None else cost


def priced_seconds(cost: NodeCost, device_name: str, *, eager: bool = False) -> tuple[float, float]:
    """(forward, backward) seconds of `cost` on `device_name`: as planned (`seconds`), or with
    `eager` op by op (where the graph was priced as compiled kernels)."""
    cost = eager_cost(cost) if eager else cost
    return cost.fwd_seconds(device_name), cost.bwd_seconds(device_name)


def fixed_seconds(cost: NodeCost, device_name: str, floor: float, *, eager: bool = False) -> tuple[float, float]:
    """(forward, backward) seconds of `cost` on `device_name` that are kernel launches, fixed per call:
    its `launch_seconds`, else `floor` (the device's launch_overhead_s) for each direction with
    time, never more than that direction's time; with `eager`, of the node op by op."""
    cost = eager_cost(cost) if eager else cost
    fwd, bwd = cost.fwd_seconds(device_name), cost.bwd_seconds(device_name)
    for name, launch_fwd, launch_bwd in cost.launch_seconds:
        if name == device_name:
            return min(launch_fwd, fwd), min(launch_bwd, bwd)
    return min(floor, fwd), min(floor, bwd)


def per_call_seconds(cost: NodeCost, device_name: str, *, eager: bool = False) -> tuple[float, float]:
    """(forward, backward) seconds of `cost` on `device_name` done once per call whatever its batch
    (`NodeCost.per_call_seconds`; launches aside: `fixed_seconds`); with `eager`, op by op."""
    cost = eager_cost(cost) if eager else cost
    for name, fwd, bwd in cost.per_call_seconds:
        if name == device_name:
            return fwd, bwd
    return 0.0, 0.0


def annotate(gm: torch.fx.GraphModule, cluster: Cluster, *,
             autocast_dtype: torch.dtype | None = None) -> torch.fx.GraphModule:
    """Write a `NodeCost` into ``node.meta["autopart_cost"]`` of every node; return `gm`.

    `autocast_dtype` prices the graph as it runs under `torch.autocast(autocast_dtype)`.
    """
    _CostInterpreter(gm, cluster, autocast_dtype).run_on_fakes()
    return gm


def node_cost(node: torch.fx.Node) -> NodeCost:
    """The `NodeCost` of `node`, or an error naming the pass to run."""
    cost = node.meta.get(COST_META_KEY)
    if cost is None:
        raise MissingAnnotationError(f"no cost on node {node.name}: run passes.annotate first")
    return cost


class _CostInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, cluster: Cluster, autocast_dtype: torch.dtype | None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.autocast_dtype = autocast_dtype
        self.gpu_kernels = any(d.device_type == "cuda" for d in cluster.devices)
        """Planning for GPUs: attention keeps what CUDA's fused kernels keep, whatever kernel the
        fake CPU tensors of the trace take."""
        self.cast_params: set[int] = set()
        """Storages of the parameters autocast has converted in this forward (it caches them)."""
        self.devices = {d.name: d for d in cluster.devices}
        self.mode = FakeTensorMode(allow_non_fake_inputs=False)
        self.fake_attrs: dict[str, torch.Tensor] = {}
        self.param_storages: set[int] = set()
        self.counted_storages: set[int] = set()
        self.current_saved: list[torch.Tensor] = []
        # Every saved tensor stays referenced until the pass ends, so no storage
        # is freed and its address reused under another tensor's key.
        self.all_saved: list[torch.Tensor] = []

    # ------------------------------------------------------------------ driving

    def run_on_fakes(self) -> None:
        with self.mode:
            inputs = [self._fake_placeholder(n) for n in self.graph.nodes if n.op == "placeholder"]
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        autocast = (torch.autocast(AUTOCAST_DEVICE_TYPE, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with self.mode, hooks, torch.enable_grad(), autocast:
            self.run(*inputs)

    def _fake_placeholder(self, node: torch.fx.Node) -> Any:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return val
        if self.autocast_dtype is not None:  # autocast acts on CPU tensors: price on fake CPU ones
            return fake_like(val)
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if self.autocast_dtype is not None:  # the graph's device literals follow the fakes to the CPU
            args, kwargs = devices_on_cpu(args, kwargs)
            if target is torch.ops.aten.histc.default:
                return histc_on_cpu_fakes(*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.current_saved.append(tensor)
        return tensor

    # ------------------------------------------------------------------ nodes

    def fetch_attr(self, target: str) -> Any:
        if target not in self.fake_attrs:
            real = super().fetch_attr(target)
            if not isinstance(real, torch.Tensor):
                return real
            if self.autocast_dtype is not None:
                with self.mode:
                    fake = fake_like(real)
            else:
                fake = self.mode.from_tensor(real)
            if real.requires_grad:
                fake = fake.detach().requires_grad_(True)
            self.param_storages.add(_storage_key(fake))
            self.fake_attrs[target] = fake
        return self.fake_attrs[target]

    def run_node(self, node: torch.fx.Node) -> Any:
        self.current_saved = []
        if node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload):
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(node)
            fwd_flops = counter.get_total_flops()
            flops = (fwd_flops, 2 * fwd_flops)
        else:
            result = super().run_node(node)
            flops = self._op_flops(node)
        if (self.gpu_kernels and node.op == "call_function" and node.target is _SDPA
                and isinstance(result, torch.Tensor)):
            self.current_saved = self._fused_attention_saves(node, result)
        node.meta[COST_META_KEY] = self._cost(node, result, flops)
        return result

    def _fused_attention_saves(self, node: torch.fx.Node, out: torch.Tensor) -> list[torch.Tensor]:
        """What a fused CUDA attention kernel (flash or memory-efficient) keeps for
        backward: query, key, value, the output and the float32 log-sum-exp of each query row
        (FlashAttention-2, Dao 2023). The CPU's math fallback, which fake tensors may take (bf16,
        grouped keys), would keep the [b, h, s, s] attention weights instead."""
        args, _ = self.fetch_args_kwargs_from_env(node)
        query = args[0]
        logsumexp = torch.empty(*query.shape[:-1], dtype=torch.float32, device=query.device)
        saved = [t for t in args[:3] if isinstance(t, torch.Tensor)] + [out, logsumexp]
        self.all_saved.extend(saved)
        return saved

    def _op_flops(self, node: torch.fx.Node) -> tuple[int, int]:
        if node.op != "call_function":
            return (0, 0)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        out = node.meta.get("val")
        return op_flops(node.target, args, kwargs, out)

    def _cost(self, node: torch.fx.Node, result: Any, flops: tuple[int, int]) -> NodeCost:
        outputs = list(_tensors(result))
        param_bytes = buffer_bytes = 0
        trainable = False
        if node.op == "get_attr" and outputs:
            attr = super().fetch_attr(node.target)
            if isinstance(attr, torch.nn.Parameter):
                param_bytes, trainable = _nbytes(attr), attr.requires_grad
            else:
                buffer_bytes = _nbytes(attr)
        inputs = list(_tensors(self.fetch_args_kwargs_from_env(node))) if node.op == "call_function" else []
        input_storages = {_storage_key(t) for t in inputs}
        new_outputs = [t for t in outputs if _storage_key(t) not in input_storages]
        output_bytes = sum(_nbytes(t) for t in new_outputs) if node.op == "call_function" else 0
        # An in-place op (relu_, add_) writes its result into an input's
        # storage: no new memory, but real traffic, unlike a view.
        written = [t for t in outputs if _storage_key(t) in input_storages] if mutates(node.target) else []
        read_bytes = 0
        if node.op == "call_function" and (new_outputs or written):
            read_bytes = sum(_nbytes(t) for t in inputs)
        fwd_bytes = read_bytes + output_bytes + sum(_nbytes(t) for t in written)
        owners = self._input_storages(node)
        saved_bytes, saved_inputs = self._new_saved_bytes(owners)
        dtype = str(outputs[0].dtype).removeprefix("torch.") if outputs else ""
        casts, activation_casts = self._autocast_casts(node, inputs, outputs)
        weight_casts = list((Counter(casts) - Counter(activation_casts)).elements())
        # A grouped expert matmul run as a loop launches one kernel per expert (cost_models/experts.py).
        loop = expert_loop_launches(node.target, inputs) if node.op == "call_function" else (0, 0)
        # Once per call whatever its batch: a microbatch of 16 samples converts each weight once, as
        # one of a single sample does, and launches as many kernels (the op's, each conversion's, a
        # loop's); the planner scales the rest of a time with the batch.
        grad = _needs_grad(outputs)
        weight_bytes = sum(_nbytes(t) for t in inputs if _storage_key(t) in self.param_storages)
        per_call = tuple(
            (name,
             _casts_seconds(weight_casts, device) - len(weight_casts) * device.launch_overhead_s
             + weight_read_seconds(flops[0], fwd_bytes, weight_bytes, device, _dtype(outputs)),
             _casts_seconds(weight_casts, device) - len(weight_casts) * device.launch_overhead_s
             + weight_read_seconds(flops[1], BACKWARD_BYTES_FACTOR * fwd_bytes, BACKWARD_BYTES_FACTOR * weight_bytes,
                                   device, _dtype(outputs)) if grad else 0.0)
            for name, device in self.devices.items()) if weight_casts or weight_bytes else ()
        launches = tuple((name, (1 + len(casts) + loop[0]) * device.launch_overhead_s,
                          (1 + len(casts) + loop[1]) * device.launch_overhead_s if grad else 0.0)
                         for name, device in self.devices.items()) if casts or any(loop) else ()
        seconds = tuple(
            (
                name,
                op_seconds(flops[0], fwd_bytes, device, _dtype(outputs)) + _casts_seconds(casts, device)
                + loop[0] * device.launch_overhead_s,
                op_seconds(flops[1], BACKWARD_BYTES_FACTOR * fwd_bytes, device, _dtype(outputs))
                + _casts_seconds(casts, device) + loop[1] * device.launch_overhead_s if _needs_grad(outputs) else 0.0,
            )
            for name, device in self.devices.items()
        )
        return NodeCost(
            fwd_flops=int(flops[0]), bwd_flops=int(flops[1]) if _needs_grad(outputs) else 0,
            fwd_bytes=int(fwd_bytes), output_bytes=int(output_bytes), saved_bytes=int(saved_bytes),
            param_bytes=int(param_bytes), trainable=bool(trainable), buffer_bytes=int(buffer_bytes),
            dtype=dtype, seconds=seconds, saved_inputs=tuple(sorted(saved_inputs.items())),
            fusible_casts=tuple(activation_casts), per_call_seconds=per_call, launch_seconds=launches,
        )

    def _autocast_casts(self, node: torch.fx.Node, inputs: list[torch.Tensor],
                        outputs: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """Elements of each input autocast converts before this op runs (none without autocast).

        Autocast lowers an op by converting its float32 inputs to bf16 first: a kernel of its own
        per input, reading 4 and writing 2 bytes an element, and in backward one that converts the
        input's bf16 gradient back (2 read, 4 written). A weight is converted once per forward
        (autocast caches the cast of a leaf for the region: tied weights once). Returns (every
        conversion, those of activations)."""
        if (self.autocast_dtype is None or node.op != "call_function" or not outputs
                or outputs[0].dtype != self.autocast_dtype):
            return [], []
        casts, activations = [], []
        for tensor in inputs:
            if tensor.dtype != torch.float32:
                continue
            key = _storage_key(tensor)
            if key in self.param_storages:
                if key in self.cast_params:
                    continue
                self.cast_params.add(key)
            else:
                activations.append(tensor.numel())
            casts.append(tensor.numel())
        return casts, activations

    def _input_storages(self, node: torch.fx.Node) -> dict[int, str]:
        """Storage key -> the input node whose value (or a view of it) holds it."""
        if node.op != "call_function":
            return {}
        owners: dict[int, str] = {}
        for arg in node.all_input_nodes:
            for tensor in _tensors(self.env.get(arg)):
                owners.setdefault(_storage_key(tensor), arg.name)
        return owners

    def _new_saved_bytes(self, owners: dict[int, str]) -> tuple[int, dict[str, int]]:
        """Bytes of the storages saved for the first time, and of those the inputs' by input name."""
        total = 0
        by_input: dict[str, int] = {}
        for tensor in self.current_saved:
            key = _storage_key(tensor)
            if key in self.param_storages or key in self.counted_storages:
                continue
            self.counted_storages.add(key)
            nbytes = tensor.untyped_storage().nbytes()
            total += nbytes
            if key in owners:
                by_input[owners[key]] = by_input.get(owners[key], 0) + nbytes
        self.all_saved.extend(self.current_saved)
        self.current_saved = []
        return total, by_input


# An autocast conversion moves 4 + 2 bytes an element (float32 <-> bf16), forward and backward.
AUTOCAST_CAST_BYTES_PER_ELEMENT = 6


def _casts_seconds(casts: list[int], device) -> float:
    """Roofline time of autocast's conversion kernels (memory bound), each with its launch floor."""
    return sum(op_seconds(0, AUTOCAST_CAST_BYTES_PER_ELEMENT * n, device, torch.bfloat16) for n in casts)


def mutates(target: Any) -> bool:
    """Whether the op writes into one of its arguments (its schema marks it `Tensor(a!)`)."""
    schema = getattr(target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _storage_key(tensor: torch.Tensor) -> int:
    # The C++ StorageImpl pointer: stable for the storage's lifetime, shared by views.
    return tensor.untyped_storage()._cdata


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _dtype(outputs: list[torch.Tensor]) -> torch.dtype:
    return outputs[0].dtype if outputs else torch.float32


def _needs_grad(outputs: list[torch.Tensor]) -> bool:
    return any(t.requires_grad for t in outputs)
