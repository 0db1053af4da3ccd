"""Compiled kernels on a rank: every region of its stage modules through TorchInductor.

Regional compilation (PyTorch's recipe for transformer stacks): codegen nests
each block of a compiled plan as a region submodule (passes/regions.py), whose
parameter-less `body` GraphModule takes the block's inputs and its tensors as
arguments. Here each body runs as `torch.compile(body.forward)`. Identical
blocks compile once: Dynamo keeps its compiled artifacts per code object, and
every GraphModule has its own generated class and code, so bodies with the
same structure (same ops in the same order, the same non-tensor attributes)
share one compiled body, and its one artifact; the tensors that differ between
blocks are arguments, not attributes. Compilation is cached across processes by
Inductor's FX-graph cache and AOTAutograd's cache (TORCHINDUCTOR_CACHE_DIR),
not by a cache of ours.

Inductor rounds to bf16 where eager autocast does (`inductor_options`).

What stays eager, per region, with a logged reason:
- 'selective' recomputation: its policy is a TorchDispatchMode that must see
  each ATen op as it runs (torch.utils.checkpoint's selective checkpoint);
- a body whose compilation raises: the region falls back to its eager body the
  first time, and says why.
'full' recomputation keeps PyTorch's non-reentrant checkpoint around the
compiled body: the replay runs the compiled forward again, under the RNG and
autocast state of the first call. The stage's autocast is ambient: Dynamo
guards on it and AOTAutograd traces the casts it makes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from autopart.core.interfaces import region_info, regions

LOG = logging.getLogger("autopart.kernels")

DEFAULT_BACKEND = "inductor"


@dataclass(kw_only=True)
class KernelReport:
    """What `compile_regions` did to a rank's stage modules."""

    compiled: list[str] = field(default_factory=list)
    """Paths of the regions that run a compiled body."""
    distinct: int = 0
    """Distinct bodies compiled (identical blocks share one)."""
    eager: list[tuple[str, str]] = field(default_factory=list)
    """(region path, why it runs op by op)."""
    compile_seconds: float = 0.0
    """Wall time spent compiling (measured on the first call of each distinct body)."""

    def summary(self) -> str:
        line = (f"{len(self.compiled)} regions compiled as {self.distinct} distinct bodies "
                f"in {self.compile_seconds:.1f} s")
        if self.eager:
            line += "; eager: " + ", ".join(f"{path} ({why})" for path, why in self.eager)
        return line


class CompiledBody(torch.nn.Module):
    """A region body run through torch.compile, falling back to the eager body if compiling fails."""

    def __init__(self, body: torch.fx.GraphModule, backend: str, report: KernelReport, name: str) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self._report = report
        self._compiled: Callable[..., Any] | None = torch.compile(body.forward, backend=backend, dynamic=False,
                                                                  options=inductor_options(backend))
        self._warm: set[tuple[bool, bool]] = set()

    def forward(self, *args: Any) -> Any:
        if self._compiled is None:
            return self.body(*args)
        state = (torch.is_grad_enabled(), torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))
        if state in self._warm:
            return self._compiled(*args)
        started = time.perf_counter()
        try:
            out = self._compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager, logged
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            LOG.warning("autopart: region body %s runs eagerly, compiling failed: %s", self.name, reason)
            self._report.eager.append((self.name, reason[:200]))
            self._compiled = None
            return self.body(*args)
        self._warm.add(state)
        self._report.compile_seconds += time.perf_counter() - started
        return out


def inductor_options(backend: str) -> dict[str, Any] | None:
    """Inductor's settings for a region body: its fused kernels round to bf16 wherever eager autocast's
    ops would (`emulate_precision_casts`), so a compiled plan computes what the eager model computes
    under autocast. By default Inductor keeps a fused chain's intermediates in float32, closer to a
    float64 reference but not to eager: T5's RMS norms then gave gradients 1.7e-2 apart norm-wise,
    past bf16's 1.6e-2, where the roundings emulated give 9.1e-3, as with no code generation
    (`aot_eager`). The rounding is a conversion in registers, not memory traffic."""
    if backend != "inductor":
        return None  # other backends take no Inductor options
    import torch._inductor.config as inductor_config

    return {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else None


def compile_regions(modules: list[torch.nn.Module], *, backend: str = DEFAULT_BACKEND) -> KernelReport:
    """Replace the body of every region of `modules` (one rank's stages) with a compiled one, shared
    among structurally identical bodies; returns what was compiled and what stays eager."""
    report = KernelReport()
    shared: dict[tuple, CompiledBody] = {}
    for module in modules:
        for path, region in regions(module):
            info = region_info(region)
            if info.recompute == "selective":
                reason = "selective recomputation's policy must see every ATen op eagerly"
                report.eager.append((path, reason))
                LOG.info("autopart: region %s runs eagerly: %s", path, reason)
                continue
            body = region.get_submodule("body")
            if isinstance(body, CompiledBody):
                continue
            key = body_structure(body)
            compiled = shared.get(key)
            if compiled is None:
                compiled = shared[key] = CompiledBody(body, backend, report, path)
                report.distinct += 1
            region._modules["body"] = compiled
            report.compiled.append(path)
    LOG.info("autopart: %s", report.summary())
    return report


def body_structure(body: torch.fx.GraphModule) -> tuple:
    """A key equal for two bodies exactly when they compute the same function of their arguments:
    each node's op, target and arguments by position (node names, which differ per block, left
    out); a submodule by its type and configuration, a non-tensor attribute by identity."""
    index: dict[torch.fx.Node, int] = {}

    def arg_key(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return ("node", index[value])
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(arg_key(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((k, arg_key(v)) for k, v in value.items()))
        if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(value)
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value))
        try:
            hash(value)
        except TypeError:
            return ("object", id(value))
        return value

    nodes = []
    for i, node in enumerate(body.graph.nodes):
        index[node] = i
        if node.op == "call_module":
            sub = body.get_submodule(node.target)
            target: Any = (type(sub).__qualname__, sub.extra_repr())
        elif node.op == "get_attr":
            target = ("attr", id(body.get_submodule(node.target) if _is_module(body, node.target)
                                 else getattr(body, node.target)))
        elif node.op == "placeholder":
            target = "placeholder"
        else:
            target = node.target
        nodes.append((node.op, target, arg_key(node.args), arg_key(node.kwargs)))
    return tuple(nodes)


def _is_module(body: torch.fx.GraphModule, target: str) -> bool:
    try:
        body.get_submodule(target)
        return True
    except AttributeError:
        return False


__all__ = ["CompiledBody", "KernelReport", "body_structure", "compile_regions", "inductor_options"]
