"""The `autopart` command line: plan a model built by a factory and print or save the report.

    autopart plan autopart.zoo:gpt2 --devices 4xH100 --batch-size 8 --html report.html
    autopart report plan.json --html report.html

Errors a user can fix (a bad factory path, inputs that do not fit, an
impossible plan) print one paragraph and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from autopart.core.modes import SCHEDULES

_EPILOG = """\
examples:
  autopart plan autopart.zoo:gpt2 --devices 4xH100
  autopart plan autopart.zoo:llama --devices 8xH100 --batch-size 32 --factory-arg layers=8 \\
      --html report.html --json plan.json
  autopart plan models.py:make_model --devices 2x8xH100 --seq-len 1024 --batch-size 16
  autopart plan models.py:make_mlp --devices 4 --input-shape 64,512 --input-dtype float32
  autopart plan autopart.zoo:gpt2 --devices cluster.json   (saved by autopart.calibrate().save(...))
  autopart report plan.json --html report.html

MODULE_OR_FILE:FACTORY names a dotted module importable from here (autopart.zoo:gpt2)
or a Python file (path/to/models.py:make_model), and a callable in it that returns
  an autopart.zoo.ZooModel                (has .model, .args, .kwargs)
  (model, example_args) or (model, example_args, example_kwargs)
  a bare nn.Module                        (then give --seq-len or --input-shape)
With --batch-size, a factory that takes a `batch_size` or `batch` keyword is called
with it; inputs it returns must have that batch size. Exit status: 0 on success,
2 on an error you can fix (the message says how).
"""


class CliError(Exception):
    """A mistake on the command line; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What a factory produced: the model and one batch of example inputs."""

    model: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `autopart` (sub-commands `plan` and `report`)."""
    parser = argparse.ArgumentParser(
        prog="autopart", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Partition a PyTorch model across devices: trace it, cost it, solve for pipeline\n"
                    "stages, and report the plan.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    plan = commands.add_parser(
        "plan", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        help="plan a model built by MODULE:FACTORY and print the partition report",
        description="Build a model with FACTORY, plan it for DEVICES, print the text report to stdout\n"
                    "and optionally write the HTML report and the plan as JSON.")
    plan.add_argument("target", metavar="MODULE_OR_FILE:FACTORY",
                      help="where the model comes from, e.g. autopart.zoo:gpt2 or models.py:make_model")
    plan.add_argument("--devices", required=True, metavar="DEVICES",
                      help="the cluster: '8xH100' (8 GPUs on one host), '2x8xH100' (2 hosts of 8), "
                           "'2xH100+2xA100-80GB', a number of CPU devices such as '4', or a cluster saved as "
                           "JSON, e.g. by autopart.calibrate().save('cluster.json')")
    plan.add_argument("--batch-size", type=_positive_int, metavar="N",
                      help="samples per step: the batch dimension of the inputs autopart builds, or passed to "
                           "the factory as batch_size= / batch= (default: the factory's own; 8 when autopart "
                           "builds the inputs)")
    plan.add_argument("--factory-arg", action="append", default=[], metavar="NAME=VALUE",
                      help="keyword argument for the factory, repeatable; VALUE is a Python literal or a "
                           "string, e.g. --factory-arg layers=8 --factory-arg d_model=1024")
    inputs = plan.add_argument_group("inputs for a factory that returns a bare nn.Module")
    inputs.add_argument("--seq-len", type=_positive_int, metavar="L",
                        help="token model: int64 ids of shape (batch, L), drawn below model.config.vocab_size "
                             "(or the first nn.Embedding's size)")
    inputs.add_argument("--input-shape", metavar="B,D1,...",
                        help="one input tensor of this shape, batch first, e.g. 8,128 or 8,3,224,224; "
                             "--batch-size replaces its first dimension")
    inputs.add_argument("--input-dtype", default="float32", metavar="DTYPE",
                        help="dtype of the --input-shape tensor: float32 (default), bfloat16, float16, int64, ...")
    choices = plan.add_argument_group("planner choices (default: the planner chooses)")
    choices.add_argument("--pipeline-parallel", type=_positive_int, metavar="P",
                         help="pipeline ranks (devices per pipeline) to use; each runs --virtual-stages stages")
    choices.add_argument("--num-microbatches", type=_positive_int, metavar="M",
                         help="microbatches per step; must divide the batch size")
    choices.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule")
    choices.add_argument("--virtual-stages", type=_positive_int, metavar="V",
                         help="stages per pipeline rank (interleaved_1f1b, zero_bubble)")
    choices.add_argument("--data-parallel-mode", choices=("ddp", "zero2", "zero3", "hsdp", "fsdp"),
                         help="how replicas hold and synchronise the state: ddp (all-reduce), zero2 (optimizer "
                              "state sharded), zero3 (everything sharded, FSDP2 reshard after forward), hsdp "
                              "(zero3 within a host, replicated across hosts); fsdp is zero2")
    choices.add_argument("--recompute", choices=("none", "selective", "full"),
                         help="activation recomputation of every block (default: the planner chooses per block, "
                              "only where memory demands it)")
    choices.add_argument("--data-parallel", type=_positive_int, metavar="D",
                         help="replicas of the pipeline (must divide the devices and the batch)")
    choices.add_argument("--tensor-parallel", type=_positive_int, metavar="T",
                         help="devices per tensor-parallel group (must divide the devices)")
    choices.add_argument("--context-parallel", type=_positive_int, metavar="C",
                         help="split each sequence over C consecutive data-parallel replicas (attention "
                              "gathers the keys and values among them; --data-parallel counts them)")
    choices.add_argument("--expert-parallel", type=_positive_int, metavar="E",
                         help="mixture-of-experts models: split each MoE layer's experts over E data-parallel "
                              "replicas (must divide the replicas and the experts; 1 keeps them whole)")
    choices.add_argument("--sequence-parallel", choices=("on", "off"),
                         help="shard the activations between tensor-parallel regions on the sequence "
                              "(Megatron-SP; default: the planner chooses)")
    choices.add_argument("--optimizer", default="adam", metavar="NAME",
                         help="optimizer whose state is priced: sgd, momentum, adam (default), adamw, ...")
    choices.add_argument("--inference", action="store_true",
                         help="plan the forward pass only: no gradients, no optimizer state")
    choices.add_argument("--mixed-precision", choices=("bf16",),
                         help="train as torch.autocast(bfloat16) over float32 parameters and optimizer state")
    choices.add_argument("--no-reuse-layers", action="store_true",
                         help="trace every layer up front instead of analysing a stack of identical layers once")
    output = plan.add_argument_group("output")
    output.add_argument("--html", metavar="PATH", help="write the report as one self-contained HTML file")
    output.add_argument("--json", metavar="PATH", help="write the plan as JSON (autopart.Plan.from_json reads it)")
    output.add_argument("--check", action="store_true",
                        help="run every rank of the plan on this CPU and compare outputs, loss and every "
                             "gradient with the single-device model (float32: rtol 1e-5, atol 1e-5 / 4e-5)")
    output.add_argument("--real-weights", action="store_true",
                        help="build the model's weights in CPU memory even when only a plan is asked for "
                             "(default: without --check the model is built on the meta device, which "
                             "allocates nothing; --check always builds real weights)")
    output.add_argument("--quiet", "-q", action="store_true",
                        help="no progress lines on stderr (the report still goes to stdout)")
    output.add_argument("--verbose", "-v", action="store_true",
                        help="on an error, print the traceback of what caused it (torch.export's, the model's) "
                             "after the message")
    report = commands.add_parser("report", help="print (and optionally draw) the report of a saved plan.json",
                                 description="Re-render the report of a plan written by `autopart plan --json`.")
    report.add_argument("plan_json", metavar="PLAN.json", help="a plan written by `autopart plan --json`")
    report.add_argument("--html", metavar="PATH", help="write the report as one self-contained HTML file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from autopart.core.errors import AutopartError

    try:
        return _run_plan(args) if args.command == "plan" else _run_report(args)
    except (CliError, AutopartError) as error:
        if getattr(args, "verbose", False) and error.__cause__ is not None:
            import traceback

            traceback.print_exception(error.__cause__, file=sys.stderr)
            print(file=sys.stderr)
        print(f"autopart: error: {error}", file=sys.stderr)
        if not getattr(args, "verbose", False) and error.__cause__ is not None:
            print("autopart: (run with --verbose for the traceback of its cause)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autopart: interrupted", file=sys.stderr)
        return 130


def _run_plan(args: argparse.Namespace) -> int:
    import autopart
    from autopart.cost_models import optimizer_state_bytes

    try:
        optimizer_state_bytes(0, args.optimizer)
    except ValueError as error:
        raise CliError(f"--optimizer {args.optimizer}: {error}") from None
    devices: Any = int(args.devices) if args.devices.strip().isdigit() else args.devices
    factory = load_factory(args.target)
    factory_kwargs = dict(_parse_factory_arg(text) for text in args.factory_arg)
    # A plan needs shapes, not values: without --check the model is built on the meta device (no
    # memory, no initialisation: a 2.4B-parameter GPT builds in a second instead of a minute).
    on_meta = not (args.check or args.real_weights)
    where = "on the meta device (no weights allocated; --check or --real-weights build them)" if on_meta \
        else "with real weights in CPU memory"
    _say(args, f"building the model with {args.target} {where}")
    started = time.perf_counter()
    workload = build_workload(factory, args.target, factory_kwargs, batch_size=args.batch_size,
                              seq_len=args.seq_len, input_shape=args.input_shape, input_dtype=args.input_dtype,
                              device="meta" if on_meta else None)
    _say(args, f"built {type(workload.model).__name__} ({_parameter_count(workload.model)} parameters) in "
               f"{time.perf_counter() - started:.1f} s; planning")
    compiled = autopart.compile(
        workload.model, devices, example_inputs=workload.args, example_kwargs=workload.kwargs or None,
        pipeline_parallel=args.pipeline_parallel, num_microbatches=args.num_microbatches, schedule=args.schedule,
        virtual_stages=args.virtual_stages, data_parallel_mode=args.data_parallel_mode,
        recompute=args.recompute, data_parallel=args.data_parallel, tensor_parallel=args.tensor_parallel,
        expert_parallel=args.expert_parallel,
        sequence_parallel={"on": True, "off": False}.get(args.sequence_parallel),
        context_parallel=args.context_parallel, optimizer=args.optimizer, mixed_precision=args.mixed_precision, training=not args.inference,
        reuse_layers=not args.no_reuse_layers, verbose=not args.quiet)
    sys.stdout.write(compiled.report())
    sys.stdout.flush()
    if args.json:
        _write(args.json, compiled.plan.to_json(), "--json")
        _say(args, f"wrote the plan to {args.json}")
    if args.html:
        from autopart.report.html import render_html

        _write(args.html, render_html(compiled.plan), "--html")
        _say(args, f"wrote the HTML report to {args.html}")
    if args.check:
        _check(compiled, workload)
    return 0


def _check(compiled: Any, workload: Any) -> None:
    from autopart.verify import BF16_RTOL, verify

    print("\nchecking the plan on this CPU against the single-device model ...", flush=True)
    if any(t.is_meta for t in workload.model.parameters()):
        raise CliError("--check needs real weights; the model was built on the meta device")
    result = verify(compiled, workload.model, tuple(workload.args), workload.kwargs)
    if compiled.plan.mixed_precision:
        print(f"  against eager torch.autocast(bfloat16), norm-wise within rtol {BF16_RTOL:g}:")
        print(f"  forward equal: worst relative error {result.max_output_diff:.2e}")
        print(f"  loss equal: {result.loss:.6f} vs {result.reference_loss:.6f}")
        print(f"  gradients of all {result.num_grads} parameters equal: worst relative error "
              f"{result.max_grad_diff:.2e}")
        return
    print(f"  forward equal (rtol 1e-5, atol 1e-5): max |diff| {result.max_output_diff:.2e}")
    print(f"  loss equal: {result.loss:.6f} vs {result.reference_loss:.6f}")
    print(f"  gradients of all {result.num_grads} parameters equal (rtol 1e-5, atol 4e-5): "
          f"max |diff| {result.max_grad_diff:.2e}")


def _run_report(args: argparse.Namespace) -> int:
    from autopart.core.plan import Plan
    from autopart.report.html import render_html
    from autopart.report.text import render_text

    try:
        with open(args.plan_json, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise CliError(f"cannot read {args.plan_json}: {error.strerror}; pass a file written by "
                       "`autopart plan --json`") from None
    plan = Plan.from_json(text)
    sys.stdout.write(render_text(plan))
    if args.html:
        _write(args.html, render_html(plan), "--html")
        print(f"wrote the HTML report to {args.html}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- the factory

def load_factory(target: str) -> Callable[..., Any]:
    """The callable TARGET names: 'package.module:name' or 'path/to/file.py:name'."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise CliError(f"{target!r} is not MODULE:FACTORY or FILE.py:FACTORY; write e.g. autopart.zoo:gpt2 "
                       "or models.py:make_model")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _import_file(where)
    else:
        module = _import_module(where)
    if not hasattr(module, name):
        known = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        hint = f"; callables defined there: {', '.join(known)}" if known else ""
        raise CliError(f"{where} has no attribute {name!r}{hint}")
    factory = getattr(module, name)
    if not callable(factory):
        raise CliError(f"{where}:{name} is a {type(factory).__name__}, not a callable; name a function or "
                       "class that returns the model")
    return factory


def _import_module(dotted: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules next to the user resolve
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as error:
        raise CliError(f"cannot import module {dotted!r} ({error}); give a dotted module importable from "
                       f"{os.getcwd()} or a path to a .py file") from None
    except Exception as error:  # the user's module failed while importing
        raise CliError(f"importing {dotted} failed: {type(error).__name__}: {error}") from None


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise CliError(f"no file {path!r}; give the path of a .py file that defines the factory")
    name = "_autopart_factory_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"{path} cannot be loaded as Python source; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # its sibling imports resolve, as for a script
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise CliError(f"running {path} failed: {type(error).__name__}: {error}") from None
    return module


def _parse_factory_arg(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise CliError(f"--factory-arg {text!r}: write NAME=VALUE, e.g. --factory-arg layers=8")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def build_workload(factory: Callable[..., Any], target: str, factory_kwargs: dict[str, Any], *,
                   batch_size: int | None = None, seq_len: int | None = None, input_shape: str | None = None,
                   input_dtype: str = "float32", device: str | None = None) -> Workload:
    """Call the factory and turn what it returns into a model with one batch of example inputs.

    `device="meta"` builds both on the meta device: a factory with a `device` keyword is passed it,
    any other is called under `torch.device("meta")`, and inputs it makes elsewhere are moved there.
    """
    import torch

    if device is None:
        return _build_workload(factory, target, factory_kwargs, batch_size, seq_len, input_shape, input_dtype)
    takes_device = _takes_keyword(factory, "device")
    kwargs = {**factory_kwargs, "device": device} if takes_device and "device" not in factory_kwargs \
        else factory_kwargs
    with torch.device(device):
        try:
            workload = _build_workload(factory, target, kwargs, batch_size, seq_len, input_shape, input_dtype)
        except CliError as error:
            if not str(error).startswith("calling "):
                raise
            raise CliError(f"{error} (the factory ran on the {device} device, as it does when only a plan is "
                           "asked for; pass --real-weights to build real weights)") from error.__cause__
    return Workload(model=workload.model, **dict(zip(("args", "kwargs"), torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(device), (workload.args, workload.kwargs)))))


def _build_workload(factory: Callable[..., Any], target: str, factory_kwargs: dict[str, Any],
                    batch_size: int | None, seq_len: int | None, input_shape: str | None,
                    input_dtype: str) -> Workload:
    import torch

    from autopart.zoo import ZooModel

    kwargs = dict(factory_kwargs)
    keyword = _batch_keyword(factory)
    if batch_size is not None and keyword and keyword not in kwargs:
        kwargs[keyword] = batch_size
    call = f"{target}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        result = factory(**kwargs)
    except Exception as error:
        raise CliError(f"calling {call} raised {type(error).__name__}: {error}") from None
    if isinstance(result, ZooModel):
        workload = Workload(model=result.model, args=tuple(result.args), kwargs=dict(result.kwargs))
    elif isinstance(result, (tuple, list)) and 2 <= len(result) <= 3 and isinstance(result[0], torch.nn.Module):
        args = result[1]
        args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
        extra = result[2] if len(result) == 3 else {}
        if not isinstance(extra, dict):
            raise CliError(f"{call} returned a third element of type {type(extra).__name__}; it must be a dict "
                           "of keyword inputs")
        workload = Workload(model=result[0], args=args, kwargs=dict(extra))
    elif isinstance(result, torch.nn.Module):
        return _built_inputs(result, call, batch_size, seq_len, input_shape, input_dtype)
    else:
        raise CliError(f"{call} returned an object of type {type(result).__name__}; return an nn.Module, (model, args), "
                       "(model, args, kwargs) or an autopart.zoo.ZooModel")
    if seq_len is not None or input_shape is not None:
        raise CliError(f"{call} returns its own example inputs, so --seq-len and --input-shape do not apply; "
                       "drop them, or make the factory return a bare nn.Module")
    found = _batch_of(workload)
    if batch_size is not None and found is not None and found != batch_size:
        raise CliError(f"{call} returned inputs with batch size {found}, not --batch-size {batch_size}; give "
                       "the factory a batch_size= (or batch=) keyword, or drop --batch-size")
    return workload


def _takes_keyword(factory: Callable[..., Any], name: str) -> bool:
    try:
        p = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _parameter_count(model: Any) -> str:
    from autopart.core.units import fmt_count

    return fmt_count(sum(p.numel() for p in model.parameters()))


def _batch_keyword(factory: Callable[..., Any]) -> str | None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    for name in ("batch_size", "batch"):
        p = params.get(name)
        if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return name
    return None


def _batch_of(workload: Workload) -> int | None:
    import torch

    from autopart.core.batch import batch_size_of
    from autopart.core.errors import InputError

    try:
        return batch_size_of(torch.utils._pytree.tree_leaves((workload.args, workload.kwargs)))
    except InputError:  # no batched input: compile says so, with its own message
        return None


def _built_inputs(model: Any, call: str, batch_size: int | None, seq_len: int | None, input_shape: str | None,
                  input_dtype: str) -> Workload:
    import torch

    if seq_len is not None and input_shape is not None:
        raise CliError("--seq-len and --input-shape both describe the input; give one")
    if seq_len is None and input_shape is None:
        raise CliError(f"{call} returned a bare nn.Module, so autopart must build its example inputs: pass "
                       "--seq-len L for a token model or --input-shape B,D1,... (with --input-dtype) for one "
                       "input tensor; or let the factory return (model, example_args)")
    if seq_len is not None:
        vocab = _vocab_size(model)
        if vocab is None:
            raise CliError(f"--seq-len builds token ids, but {type(model).__name__} has no config.vocab_size and "
                           "no nn.Embedding to bound them; use --input-shape and --input-dtype instead")
        ids = torch.randint(0, vocab, (batch_size or 8, seq_len))
        return Workload(model=model, args=(ids,), kwargs={})
    parts = re.split(r"\s*[,xX]\s*", input_shape.strip())
    shape = [int(p) for p in parts] if all(p.isdigit() for p in parts) else []
    if not shape or any(d <= 0 for d in shape):
        raise CliError(f"--input-shape {input_shape!r}: write positive sizes separated by commas, batch first, "
                       "e.g. 8,128 or 8,3,224,224")
    if batch_size is not None:
        shape[0] = batch_size
    dtype = getattr(torch, input_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CliError(f"--input-dtype {input_dtype!r} is not a torch dtype; use float32, bfloat16, float16, "
                       "int64, int32 or bool")
    if dtype.is_floating_point:
        tensor = torch.randn(shape, dtype=dtype)
    elif dtype == torch.bool:
        tensor = torch.rand(shape) < 0.5
    else:
        tensor = torch.randint(0, _vocab_size(model) or 2, shape, dtype=dtype)
    return Workload(model=model, args=(tensor,), kwargs={})


def _vocab_size(model: Any) -> int | None:
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None


# ----------------------------------------------------------------------------- helpers

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"[autopart] {message}", file=sys.stderr)


def _write(path: str, text: str, option: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as error:
        raise CliError(f"{option} {path}: cannot write ({error.strerror}); choose a writable path") from None


if __name__ == "__main__":
    raise SystemExit(main())
