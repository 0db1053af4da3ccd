"""Mixed precision: the values a graph computes under `torch.autocast`.

`compile(..., mixed_precision="bf16")` keeps parameters, gradients and
optimizer state in float32 and runs every stage's forward (and the loss) under
`torch.autocast(device_type, torch.bfloat16)`, PyTorch's own mechanism: the
runtime enables it around each stage, so the ops autocast lowers (matmuls,
linear, convolutions, attention) compute in bf16 exactly as the eager model in
`torch.autocast` would, and everything else keeps its dtype rules.

The traced graph holds the ops, not the casts (autocast acts at dispatch), so
its `meta["val"]` say float32 where the running stage makes bf16. This pass
re-propagates `meta["val"]` under autocast on fake tensors, so that every later
pass sees the dtypes that run: the cost model prices matmuls at the bf16 rate
and saved activations and boundary tensors at their autocast size, and the
stage interfaces declare the dtypes that travel between stages.

Plans are made on any machine, usually one without the GPUs planned for, so
the propagation uses the CPU's autocast policy on fake CPU tensors. The two
policies agree on what costs time (both lower mm/bmm/linear/matmul/conv/
scaled_dot_product_attention to bf16); CUDA's also computes some reductions in
float32 (softmax, layer_norm, log_softmax on bf16 inputs) where the CPU keeps
bf16. The runtime casts each boundary tensor to the dtype planned here, so the
stages' static shapes agree on every device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

AUTOCAST_DEVICE_TYPE = "cpu"
"""Device type whose autocast policy the planner propagates (see the module docstring)."""


def autocast_values(gm: torch.fx.GraphModule, dtype: torch.dtype) -> torch.fx.GraphModule:
    """Rewrite every node's ``meta["val"]`` to what the node computes under `torch.autocast(dtype)`."""
    _AutocastValues(gm, dtype).propagate()
    return gm


class FakesOnCpu(torch.fx.Interpreter):
    """Runs a graph on fake CPU tensors shaped like its values, whatever device the model is on
    (CPU autocast acts on CPU tensors only; a meta-device model gets the CPU's policy too)."""

    def __init__(self, gm: torch.fx.GraphModule, mode: FakeTensorMode, *, garbage_collect_values: bool = True):
        super().__init__(gm, garbage_collect_values=garbage_collect_values)
        self.mode = mode
        self.fake_attrs: dict[str, Any] = {}

    def placeholder_fakes(self) -> list[Any]:
        with self.mode:
            return [fake_like(n.meta.get("val")) for n in self.graph.nodes if n.op == "placeholder"]

    def fetch_attr(self, target: str) -> Any:
        if target not in self.fake_attrs:
            real = super().fetch_attr(target)
            if isinstance(real, torch.Tensor):
                with self.mode:
                    fake = fake_like(real)
                if real.requires_grad:
                    fake = fake.detach().requires_grad_(True)
                real = fake
            self.fake_attrs[target] = real
        return self.fake_attrs[target]

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        args, kwargs = devices_on_cpu(args, kwargs)
        if target is _HISTC:
            return histc_on_cpu_fakes(*args, **kwargs)
        return super().call_function(target, args, kwargs)


_HISTC = torch.ops.aten.histc.default


def devices_on_cpu(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call's arguments with every device literal the CPU's: where the graph's fakes live."""
    return pytree.tree_map(lambda a: torch.device("cpu") if isinstance(a, torch.device) else a, (args, kwargs))


def histc_on_cpu_fakes(values: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:  # noqa: A002
    """`aten.histc` on a fake CPU tensor of any dtype: [bins] of the input's dtype.

    A graph traced on the meta or a CUDA device may take histc of an integer tensor (HF's
    grouped_mm experts count tokens per expert with `histc(expert_ids.int())` off the CPU, as
    CUDA's kernel wants); the CPU kernel, and so the meta function checking CPU fakes, takes only
    floats ('"histogram_cpu" not implemented for torch.int32'). The graph's values are what the
    device it runs on makes: the counts over a float copy, in the input's dtype."""
    if values.is_floating_point():
        return torch.ops.aten.histc.default(values, bins, min, max)
    return torch.ops.aten.histc.default(values.float(), bins, min, max).to(values.dtype)


def fake_like(value: Any) -> Any:
    """An uninitialised CPU tensor shaped like `value` (under a FakeTensorMode: a fake); other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")


class _AutocastValues(FakesOnCpu):
    def __init__(self, gm: torch.fx.GraphModule, dtype: torch.dtype) -> None:
        super().__init__(gm, FakeTensorMode(allow_non_fake_inputs=False))
        self.dtype = dtype

    def propagate(self) -> None:
        inputs = self.placeholder_fakes()
        with self.mode, torch.no_grad(), torch.autocast(AUTOCAST_DEVICE_TYPE, dtype=self.dtype):
            self.run(*inputs)

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        if node.op not in ("placeholder", "output"):
            node.meta["val"] = self._on_device_of(result, node.meta.get("val"))
        return result

    def _on_device_of(self, result: Any, traced: Any) -> Any:
        """`result` as fakes on the device the traced value was on (a meta or CUDA model keeps its device)."""
        device = next((t.device for t in pytree.tree_leaves(traced) if isinstance(t, torch.Tensor)), None)
        if device is None or device.type == "cpu":
            return result
        with self.mode:
            return pytree.tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                                   if isinstance(t, torch.Tensor) else t, result)
