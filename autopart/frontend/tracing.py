"""Capture a model as an ATen-level torch.fx GraphModule.

Primary path: `torch.export.export(..., strict=False)` (REFERENCES.md: it captures
GPT-2, BERT, Llama, T5, ViT and plain modules equal to eager). Fallback:
`torch.fx.symbolic_trace` for modules export cannot take but plain Python
tracing can. The result is normalised so every later pass sees the same shape:

- placeholders are the flattened (args, kwargs) leaves and the output node
  returns a flat tuple; the pytree specs to rebuild the user's structures live
  in ``gm.meta["autopart_io"]`` (an `IOSpec`);
- parameters and buffers are `get_attr` nodes whose targets are the model's own
  `named_parameters()` / `named_buffers()` names;
- every value node has ``meta["val"]`` (a fake tensor) and call nodes have
  ``meta["nn_module_stack"]``;
- export's `_guards_fn` call and its `_assert_tensor_metadata` checks of the
  trace-time dtype and device are dropped (stages run on other devices, and
  under autocast with other dtypes), and `wrap_with_set_grad_enabled(False, …)`
  regions (Llama-style rotary embeddings run under ``torch.no_grad``) are inlined
  with their inputs detached, which keeps gradients identical while leaving a
  flat graph that `split_module` can cut.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import traceback
from typing import Any, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree

from autopart.core.errors import TraceError
from autopart.core.interfaces import IO_META_KEY, IOSpec, io_spec

def trace(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Trace `model(*args, **kwargs)` to a flat ATen-level GraphModule.

    The GraphModule is called as the model is (`gm(*args, **kwargs)` returns the
    model's own output structure); its graph takes the flat inputs
    (`flatten_inputs`) and returns a flat tuple, which is what passes see.

    Raises `TraceError` naming the model class, where capture stopped, what
    each tracer said and a fix to try.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(
            f"autopart.trace: model must be a torch.nn.Module, got {type(model).__name__}; "
            "wrap a plain function in an nn.Module whose forward calls it."
        )
    args = _check_args(model, args)
    given = dict(kwargs or {})
    kwargs = _default_kwargs(model, given)
    _check_leaves(model, args, kwargs)
    flat_inputs, in_spec = pytree.tree_flatten((args, kwargs))

    export_error: BaseException | None = None
    trace_failure: tuple[BaseException, BaseException] | None = None
    try:
        with _quiet_fake_tensor_errors():
            gm = _export(model, args, kwargs)
        tracer = "export"
    except Exception as error:  # noqa: BLE001 - reported below with the fallback's error
        export_error = error
        try:
            with _quiet_fake_tensor_errors():
                gm = _symbolic_trace(model, flat_inputs, in_spec)
            tracer = "symbolic_trace"
        except Exception as fallback_error:  # noqa: BLE001
            trace_failure = (export_error, fallback_error)

    if trace_failure is not None:
        # raised here, outside the except clauses, so that the chain printed is the cause alone
        # (the model's own error, or export's), not every attempt before it
        export_error, fallback_error = trace_failure
        model_error = _eager_error(model, args, kwargs)
        if model_error is not None:  # not a tracing problem: the model refuses these inputs
            raise _model_error(model, model_error) from model_error
        raise _trace_error(model, export_error, fallback_error) from export_error
    _check_operand_dtypes(model, gm)
    in_spec = _graph_in_spec(gm) or in_spec
    out_spec = _flatten_output(gm)
    spec = IOSpec(
        in_spec=in_spec,
        out_spec=out_spec,
        tracer=tracer,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        default_kwargs=tuple((k, v) for k, v in kwargs.items() if k not in given),
        example_inputs=tuple(_example(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"),
    )
    gm.meta[IO_META_KEY] = spec
    gm.graph.lint()
    gm.recompile()
    _CalledAsTheModel(spec).install(gm)
    return gm


class _CalledAsTheModel:
    """Makes a traced GraphModule callable as the model is, as torch.export's `ep.module()` is.

    The graph stays flat (placeholders are the flattened (args, kwargs) leaves and
    the output a flat tuple: what every pass and `torch.fx.Interpreter` see);
    a forward pre-hook flattens the model's own arguments into it, adding the
    keywords autopart set at trace time (use_cache=False), and a forward hook
    rebuilds the model's output structure.
    """

    def __init__(self, spec: IOSpec) -> None:
        self.spec = spec

    def install(self, gm: torch.fx.GraphModule) -> None:
        gm.register_forward_pre_hook(self.flatten, with_kwargs=True)
        gm.register_forward_hook(self.unflatten)

    def flatten(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(self.spec.flatten(args, kwargs)), {}

    def unflatten(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return self.spec.unflatten(output)


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None) -> list[Any]:
    """Flatten a call's (args, kwargs) the way the traced graph's placeholders expect."""
    return io_spec(gm).flatten(args, kwargs)


def _example(value: Any) -> Any:
    """A placeholder's traced value as a meta tensor of its shape and dtype (constants as they are)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


# ----------------------------------------------------------------------------- checks


def _check_args(model: torch.nn.Module, args: Any) -> tuple:
    if isinstance(args, torch.Tensor):
        return (args,)
    if not isinstance(args, (tuple, list)):
        raise TraceError(
            f"example inputs of {type(model).__name__} must be a tuple of arguments, "
            f"got {type(args).__name__}; pass example_inputs=(x,)."
        )
    return tuple(args)


def _default_kwargs(model: torch.nn.Module, given: dict) -> dict:
    # transformers models default to use_cache=True and return a DynamicCache,
    # which export rejects and which training never needs.
    kwargs = dict(given)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


_LEAF_TYPES = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def _check_leaves(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    leaves, _ = pytree.tree_flatten((args, kwargs))
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if not isinstance(leaf, _LEAF_TYPES):
            where = pytree.keystr(path)
            raise TraceError(
                f"unsupported input type for {type(model).__name__}: the value at "
                f"(args, kwargs){where} is a {type(leaf).__module__}.{type(leaf).__qualname__}; "
                "pass tensors, Python scalars, or tuples/lists/dicts of them, or register "
                "the type with torch.utils._pytree.register_pytree_node."
            )
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise TraceError(
            f"example inputs of {type(model).__name__} hold no tensor; pass at least one "
            "torch.Tensor (e.g. a batch of inputs) so shapes can be traced."
        )


# ----------------------------------------------------------------------------- export


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    exported = torch.export.export(model, args, kwargs, strict=False)
    gm = exported.module()
    # The unlifted module checks calls against export's own input spec; the
    # flat graph we return is called with flat placeholders instead.
    gm._forward_pre_hooks.clear()
    _drop_guards_call(gm)
    _inline_no_grad_regions(gm)  # first: torch 2.11 keeps asserts inside the no-grad regions' bodies
    _drop_metadata_asserts(gm)
    gm.graph.eliminate_dead_code()
    _delete_unused_submodules(gm)
    return gm


def _drop_guards_call(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def _drop_metadata_asserts(gm: torch.fx.GraphModule) -> None:
    """Erase `aten._assert_tensor_metadata` checks: they return nothing and pin the trace's
    device and dtype, which a stage on `cuda:1` or under bf16 autocast legitimately differs from."""
    check = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and check is not None and node.target is check.default and not node.users:
            gm.graph.erase_node(node)


def _inline_no_grad_regions(gm: torch.fx.GraphModule) -> None:
    """Replace `wrap_with_set_grad_enabled(False, submod, *xs)` by submod's body on detached xs.

    Inside a no-grad region nothing is recorded for autograd, so its outputs
    carry no gradient. Running the same ops on detached inputs gives the same
    values and the same (absent) gradients, without the higher-order op.
    """
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or hop is None or node.target is not hop:
            continue
        enabled, body_node, *inputs = node.args
        # A grad-enabled region inside the graph behaves like the plain ops.
        detach = not enabled
        body: torch.fx.GraphModule = getattr(gm, body_node.target)
        with graph.inserting_before(node):
            env: dict[torch.fx.Node, Any] = {}
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            for placeholder, value in zip(placeholders, inputs):
                if detach and isinstance(value, torch.fx.Node) and isinstance(
                    value.meta.get("val"), torch.Tensor
                ):
                    detached = graph.call_function(torch.ops.aten.detach.default, (value,))
                    detached.meta = {
                        "val": value.meta["val"].detach(),
                        "nn_module_stack": node.meta.get("nn_module_stack", {}),
                    }
                    value = detached
                env[placeholder] = value
            outputs: Any = None
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = pytree.tree_map(
                        lambda a: env[a] if isinstance(a, torch.fx.Node) else a, inner.args[0]
                    )
                    continue
                if inner.op == "get_attr":
                    raise TraceError(f"no-grad region {body_node.target} reads attribute {inner.target}")
                copied = graph.node_copy(inner, lambda a: env[a])
                copied.meta = dict(inner.meta)
                copied.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack", {}))
                env[inner] = copied
        for user in list(node.users):
            if user.op == "call_function" and user.target is __import__("operator").getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(outputs)
        graph.erase_node(node)
        if not body_node.users:
            graph.erase_node(body_node)


def _delete_unused_submodules(gm: torch.fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name, _ in list(gm.named_children()):
        if isinstance(getattr(gm, name), torch.fx.GraphModule) and name not in used:
            delattr(gm, name)


def _graph_in_spec(gm: torch.fx.GraphModule) -> pytree.TreeSpec | None:
    """Export's own input spec (its placeholder order), if the graph carries one."""
    return getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)


def _flatten_output(gm: torch.fx.GraphModule) -> pytree.TreeSpec:
    """Make the graph take flat placeholders and return a flat tuple; return the output spec."""
    codegen = gm.graph._codegen
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if out_spec is None:
        leaves, out_spec = pytree.tree_flatten(output.args[0])
    else:
        leaves = list(pytree.tree_leaves(output.args[0]))
    output.args = (tuple(leaves),)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    return out_spec


# ----------------------------------------------------------------------------- fallback


class _ThroughTracer(torch.fx.Tracer):
    """Traces into every submodule so calls become functions, not opaque modules."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False


def _symbolic_trace(
    model: torch.nn.Module, flat_inputs: list[Any], in_spec: pytree.TreeSpec
) -> torch.fx.GraphModule:
    if in_spec.num_leaves != len(flat_inputs) or any(
        not isinstance(x, torch.Tensor) for x in flat_inputs
    ):
        raise TraceError("symbolic_trace fallback takes tensor inputs only")
    graph = _ThroughTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat_inputs):
        raise TraceError(
            f"symbolic_trace made {len(placeholders)} placeholders for {len(flat_inputs)} inputs"
        )
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(x) for x in flat_inputs])
    for node in gm.graph.nodes:
        node.meta.setdefault("nn_module_stack", {})
    return gm


@contextlib.contextmanager
def _quiet_fake_tensor_errors() -> Iterator[None]:
    """Silence torch's log of each fake-tensor op that fails while a tracer probes the model (an
    ERROR with its whole traceback, per op): the TraceError says what failed, once."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


_SAME_DTYPE_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "conv1d", "conv2d", "conv3d")
    if hasattr(torch.ops.aten, name))
"""Ops whose eager kernels take operands of one dtype only (no type promotion: `mat1 and mat2 must
have the same dtype`); their fake kernels, which the tracers run, do not check it."""


def _check_operand_dtypes(model: torch.nn.Module, gm: torch.fx.GraphModule) -> None:
    """TraceError when a matmul or convolution of the graph mixes dtypes (a LongTensor fed to a float
    model), which tracing lets through and the first real run rejects."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SAME_DTYPE_OPS:
            continue
        operands = [(a, a.meta["val"].dtype) for a in node.all_input_nodes
                    if isinstance(a.meta.get("val"), torch.Tensor)]
        dtypes = {d for _, d in operands}
        if len(dtypes) <= 1:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        where = stack[-1][0] if stack else node.name
        described = ", ".join(f"{a.target if a.op in ('get_attr', 'placeholder') else a.name} "
                              f"{str(d).removeprefix('torch.')}" for a, d in operands)
        inputs = [f"{n.target} ({str(n.meta['val'].dtype).removeprefix('torch.')})" for n in gm.graph.nodes
                  if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
        raise TraceError(
            f"{type(model).__name__}: module {where} ({node.target.__name__}) gets operands of different dtypes "
            f"({described}), which PyTorch does not promote: the model would fail on these inputs.\n"
            f"  inputs: {', '.join(inputs)}\n"
            "  fix: pass inputs of the parameters' dtype (e.g. x.float()), or token ids to a model that "
            "embeds them (nn.Embedding)."
        )


def _eager_error(model: torch.nn.Module, args: tuple, kwargs: dict) -> Exception | None:
    """What the model itself raises on the example inputs (run once, without gradients), if anything."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any error of the user's model is reported as it is
        return error
    return None


def _model_error(model: torch.nn.Module, error: Exception) -> TraceError:
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    frames = traceback.extract_tb(error.__traceback__)
    innermost = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "unknown location"
    where = _user_frame(error) or innermost
    message = str(error).strip() or "(no message)"
    return TraceError(
        f"{name} raises on the example inputs when run as it is: {type(error).__name__}: {message}\n"
        f"  raised at: {where}\n"
        "  fix: pass example inputs the model accepts as it is (shapes, dtypes, devices, arguments): "
        "autopart traces model(*example_inputs, **example_kwargs) with one microbatch of them."
    )


def _trace_error(
    model: torch.nn.Module, export_error: BaseException, fallback_error: BaseException
) -> TraceError:
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    where = _user_frame(export_error) or _user_frame(fallback_error) or "unknown location"
    first = lambda e: f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"  # noqa: E731
    return TraceError(
        f"cannot trace {name}.\n"
        f"  capture stopped at: {where}\n"
        f"  torch.export (non-strict) said: {first(export_error)}\n"
        f"  torch.fx.symbolic_trace said: {first(fallback_error)}\n"
        "  fix: make the forward's control flow independent of tensor values "
        "(use torch.where / torch.cond), return tensors or tuples/dicts of tensors, "
        "and keep Python-side state (lists, caches, .item()) out of forward."
    )


def _own_source_dirs() -> tuple[str, ...]:
    """The folders of autopart's packages (autopart, autopart.passes, autopart.cost_models), as
    '/'-separated prefixes: frames there are ours, not the user's, whatever the checkout is called."""
    import autopart.cost_models
    import autopart.passes

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # autopart/, above frontend/
    return tuple(folder.replace("\\", "/") + "/" for folder in (
        package, os.path.dirname(autopart.passes.__file__), os.path.dirname(autopart.cost_models.__file__)))


def _user_frame(error: BaseException) -> str | None:
    """The innermost stack frame outside torch's and autopart's own sources, as 'file:line in fn: code'."""
    frames = traceback.extract_tb(error.__traceback__)
    own = _own_source_dirs()
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.startswith(own) or path.startswith("<"):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return None
