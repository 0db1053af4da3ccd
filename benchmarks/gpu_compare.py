"""Train one GPT every way plain PyTorch offers and the way autopart plans it; compare.

    python benchmarks/gpu_compare.py --model small --nproc 2 --modes all [--out results.json]
    python benchmarks/gpu_compare.py --model tiny --nproc 2 --modes all          # CPU proof (gloo)

Modes: single (one device: the reference), ddp, fsdp2, pp_gpipe, pp_1f1b (torch.distributed.pipelining,
8 microbatches), tp (DTensor column/row-wise), with 4 processes also pp2_tp2, dp2_pp2, fsdp2_tp2, and
autopart (its own plan, with autopart.calibrate()'s cluster where that exists). Each mode is one
`torchrun --standalone` launch of this file in the worker role; every rank writes its results
(JSON) to a temporary directory, and this process prints one table and writes all of it as JSON.

Every mode starts from the same weights (each parameter made from a seed and its name) and trains
on the same batches; its step-0 loss is checked against one device's. tokens/s = global batch ×
sequence / step time (median of --steps timed steps after --warmup, the slowest rank's); peak memory
is torch.cuda.max_memory_allocated per rank (None on the CPU). A mode that runs out of memory is
recorded as "OOM", one that fails as "failed: <first line>", and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (beside this file)
from peers import Context, Mode, Trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# NVLink multicast (NVLS) is off on the lent machines; keep every child off it too.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
OOM_SIGNS = ("out of memory", "OutOfMemoryError")


# ============================================================================ modes


def all_modes(nproc: int) -> list[Mode]:
    """Every mode for `nproc` processes: the plain peers, then autopart."""
    return [*peers.plain_modes(nproc), Mode(name="autopart", nproc=nproc, build=build_autopart)]


def build_autopart(ctx: Context) -> Trainer:
    """autopart's own plan for this model and cluster, trained through its distributed runner."""
    import autopart

    preset = ctx.preset
    model = peers.build_gpt(preset)  # meta: each rank materialises only its shard
    cluster, source = _cluster(ctx)
    kwargs: dict[str, Any] = {"optimizer": preset.optimizer}
    precision = str(preset.dtype).removeprefix("torch.")
    if preset.autocast:
        if "mixed_precision" in inspect.signature(autopart.compile).parameters:
            kwargs["mixed_precision"] = "bf16"
            precision = "bf16 mixed precision (autopart)"
        else:
            precision = "float32 (this autopart has no mixed_precision: no autocast)"
    ids = torch.zeros(preset.batch, preset.seq, dtype=torch.long, device="meta")
    started = time.perf_counter()
    compiled = autopart.compile(model, cluster, example_inputs=(ids,), **kwargs)
    compile_s = time.perf_counter() - started
    shapes = {name: p.shape for name, p in model.named_parameters()}
    runner = compiled.distributed(timeout_s=ctx.timeout_s,
                                  state_dict=peers.InitialState(shapes, ctx.device, ctx.seed))
    optimizers = peers.make_optimizers(runner.parameters(), preset)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = runner.step(ids, target=labels, loss_fn=peers.loss_fn)
        for optimizer in optimizers:
            optimizer.step()
        return loss

    plan = compiled.plan
    info = {
        "schedule": plan.schedule, "microbatches": plan.num_microbatches, "virtual_stages": plan.virtual_stages,
        "dp_kind": plan.data_parallel_mode if plan.mesh.dp > 1 else None, "stages": list(runner.stage_indices),
        "predicted_step_seconds": plan.predicted_step_seconds,
        "predicted_memory_bytes": sum(plan.stages[i].memory.total for i in runner.stage_indices),
        "cluster_source": source, "precision": precision, "compile_seconds": compile_s,
    }
    return Trainer(step=step, mesh={"dp": plan.mesh.dp, "pp": plan.mesh.pp, "tp": plan.mesh.tp}, info=info)


def _cluster(ctx: Context):
    """The calibrated cluster the parent measured, else the preset for this machine; and which."""
    from autopart import Cluster

    calibrated = ctx.extra.get("calibration") or {}
    if "cluster" in calibrated:
        return Cluster.from_dict(calibrated["cluster"]), "autopart.calibrate()"
    why = calibrated.get("why", "no calibration")
    if ctx.device.type != "cuda":
        return ctx.world_size, f"preset: {ctx.world_size} CPU devices ({why})"
    name = torch.cuda.get_device_name(ctx.device)
    if "H200" in name:
        return f"{ctx.world_size}xH200", f"preset: {ctx.world_size}xH200 ({why})"
    devices = [f"cuda:{i}" for i in range(ctx.world_size)]  # autopart's preset for this GPU name
    return devices, f"preset for {name} ({why})"


# ============================================================================ worker (one rank of one mode)


def worker(args: argparse.Namespace) -> None:
    """Build the mode in this rank, train --warmup + --steps steps, write this rank's results."""
    preset = peers.PRESETS[args.model]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
    extra = {}
    if args.calibration:
        with open(args.calibration, encoding="utf-8") as f:
            extra["calibration"] = json.load(f)
    ctx = Context(preset=preset, rank=rank, world_size=world, device=device, seed=args.seed,
                  timeout_s=args.pg_timeout, extra=extra)
    mode = next(m for m in all_modes(args.nproc) if m.name == args.mode)
    result: dict[str, Any] = {"rank": rank, "status": "ok", "error": None, "losses": [], "step_seconds": [],
                              "device": torch.cuda.get_device_name(device) if gpu else "CPU"}
    trainer: Trainer | None = None
    data = peers.batches(preset, args.warmup + args.steps, args.seed)
    try:
        torch.manual_seed(args.seed)
        trainer = mode.build(ctx)
        result.update(mesh=trainer.mesh, info=trainer.info)
        result["allocated_after_build"] = _reset_memory(gpu)
        _train(trainer, data, args.warmup, device, gpu, result)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if gpu else None
    except Exception as error:  # noqa: BLE001 - recorded; the parent goes on with the next mode
        traceback.print_exc()
        text = f"{type(error).__name__}: {error}"
        oom = isinstance(error, torch.cuda.OutOfMemoryError) or any(s in text for s in OOM_SIGNS)
        result.update(status="OOM" if oom else "failed", error=_first_line(error),
                      traceback=traceback.format_exc()[-4000:])
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if gpu else None
    # Out of memory on one device before step 0's loss: the reference comes from a forward without
    # gradients. (Here, not in the except block, whose traceback holds the failed step's tensors.)
    if result["status"] == "OOM" and trainer is not None and trainer.reference_loss is not None \
            and not result["losses"]:
        result["losses"] = [_try_reference(trainer, data[0], device)]
        result["loss0_without_training"] = True
    result["written_at"] = time.time()
    path = os.path.join(args.result_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    if result["status"] != "ok":  # torchrun then stops the other ranks, which may wait on this one
        sys.stdout.flush()
        os._exit(1)
    peers.barrier()
    dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    """'Type: the first non-empty line of the message' (PyTorch's messages may start with a newline)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _reset_memory(gpu: bool) -> int | None:
    """Bytes allocated once the mode is built; peak counting starts here."""
    if not gpu:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _train(trainer: Trainer, data: list, warmup: int, device: torch.device, gpu: bool,
           result: dict[str, Any]) -> None:
    """Run every batch, appending this rank's loss of each step (None where it has none) and the
    seconds of each timed step to `result` as they come (a later out-of-memory keeps the earlier)."""
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for i, (ids, labels) in enumerate(data):
        ids, labels = ids.to(device), labels.to(device)
        peers.barrier()  # every rank starts the step together
        sync()
        started = time.perf_counter()
        loss = trainer.step(ids, labels)
        sync()
        elapsed = time.perf_counter() - started
        result["losses"].append(peers.local_loss_value(loss))  # after the clock: .item() waits
        if i >= warmup:
            result["step_seconds"].append(elapsed)


def _try_reference(trainer: Trainer, batch: tuple, device: torch.device) -> float | None:
    gc.collect()
    try:
        return trainer.reference_loss(batch[0].to(device), batch[1].to(device))
    except Exception:  # noqa: BLE001 - the reference is a bonus; OOM stays the status
        return None


def calibrate(args: argparse.Namespace) -> None:
    """The calibration process: run autopart.calibrate() and write its cluster, or why it failed."""
    import dataclasses

    import autopart

    try:
        params = inspect.signature(autopart.calibrate).parameters
        gpu = torch.cuda.is_available() and args.device != "cpu"
        # this device measured, and a cluster of as many as the modes use (one process cannot time
        # the link between them: calibrate() keeps the preset link for that)
        kwargs = {"num_devices": args.nproc} if "num_devices" in params else {}
        if not gpu and "quick" in params:
            kwargs["quick"] = True
        cluster = autopart.calibrate(**kwargs)
        if cluster.num_devices > args.nproc:  # it measured every GPU here: plan for the ones used
            cluster = dataclasses.replace(cluster, devices=cluster.devices[:args.nproc],
                                          node_of_device=cluster.node_of_device[:args.nproc])
        out: dict[str, Any] = {"cluster": cluster.to_dict()}
    except Exception as error:  # noqa: BLE001 - the modes fall back to the preset, and say why
        out = {"why": f"calibrate() failed: {_first_line(error)}"}
    with open(args.calibrate_to, "w", encoding="utf-8") as f:
        json.dump(out, f)


# ============================================================================ parent


def _child_env(gpu: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in CHILD_ENV.items():
        env.setdefault(key, value)
    if not gpu:  # one thread per rank, so one-process and N-process CPU runs use the same cores
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str, float]:
    """(return code or None on timeout, combined output, seconds); the whole process group dies on timeout."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        code = None
    return code, out, time.perf_counter() - started


def launch(mode: Mode, args: argparse.Namespace, result_dir: str, calibration: str | None,
           gpu: bool) -> dict[str, Any]:
    """One torchrun launch of `mode`; its per-rank results summed up into one record."""
    os.makedirs(result_dir, exist_ok=True)
    # The worker's settings travel in a file: torchrun's own parser would take (or find ambiguous)
    # options after the script name that look like its own (--role, --nproc...).
    config = os.path.join(result_dir, "worker.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump({**vars(args), "mode": mode.name, "result_dir": result_dir, "calibration": calibration}, f)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={mode.nproc}",
               os.path.abspath(__file__), "--worker-config", config]
    print(f"[{mode.name}] torchrun --nproc_per_node={mode.nproc} ...", file=sys.stderr, flush=True)
    code, out, wall = _run(command, _child_env(gpu), args.timeout)
    ranks = []
    for r in range(mode.nproc):
        path = os.path.join(result_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                ranks.append(json.load(f))
    record = summarise(mode, ranks, code, out, args.timeout)
    record["wall_seconds"] = round(wall, 1)
    print(f"[{mode.name}] {record['status']} in {wall:.0f} s", file=sys.stderr, flush=True)
    return record


def summarise(mode: Mode, ranks: list[dict[str, Any]], code: int | None, out: str, timeout: float) -> dict:
    """One mode's record from its ranks' files and torchrun's exit."""
    status = _status(ranks, code, out, timeout, mode.nproc)
    record: dict[str, Any] = {
        "nproc": mode.nproc, "status": status,
        "mesh": ranks[0].get("mesh") if ranks and ranks[0].get("mesh") else _layout_mesh(mode),
        "losses": _step_losses(ranks),
        "peak_memory_bytes": [r.get("peak_bytes") for r in sorted(ranks, key=lambda r: r["rank"])],
        "info": ranks[0].get("info", {}) if ranks else {},
        "ranks": ranks,
    }
    record["loss0"] = record["losses"][0] if record["losses"] else None
    if status == "ok":
        step = max(statistics.median(r["step_seconds"]) for r in ranks)  # the slowest rank sets the pace
        record.update(step_seconds=step)
    if status != "ok":
        record["output_tail"] = out[-3000:]
    return record


def _step_losses(ranks: list[dict[str, Any]]) -> list[float | None]:
    """The global batch's loss of each step: the mean over the ranks that report one (each covers
    an equal share of the batch; tp ranks repeat theirs, pipeline stages but the last have none)."""
    steps = min((len(r.get("losses", [])) for r in ranks), default=0)
    out = []
    for i in range(steps):
        values = [r["losses"][i] for r in ranks if r["losses"][i] is not None]
        out.append(statistics.fmean(values) if values else None)
    return out


def _layout_mesh(mode: Mode) -> dict[str, int] | None:
    return None if mode.layout is None else {"dp": mode.layout.dp, "pp": mode.layout.pp, "tp": mode.layout.tp}


def _status(ranks: list[dict], code: int | None, out: str, timeout: float, nproc: int) -> str:
    if any(r["status"] == "OOM" for r in ranks):
        return "OOM"
    failed = sorted((r for r in ranks if r["status"] != "ok"), key=lambda r: r["written_at"])
    if failed:  # the first rank to fail is the cause; the others lost their peer
        return f"failed: {failed[0]['error']}"
    if code is None:
        return f"failed: timed out after {timeout:.0f} s"
    if any(sign in out for sign in OOM_SIGNS):
        return "OOM"
    if code != 0 or len(ranks) != nproc:
        errors = [line for line in out.splitlines() if "Error" in line or "error" in line]
        return f"failed: {(errors[-1] if errors else f'exit code {code}').strip()[:300]}"
    return "ok"


def compare(records: dict[str, dict], preset: peers.Preset) -> dict[str, Any]:
    """Add tokens/s, the ratio to one device and the loss check to every record; the summary lines."""
    tokens = preset.batch * preset.seq
    single = records.get("single", {})
    reference = single.get("loss0")
    for record in records.values():
        record["tokens_per_second"] = tokens / record["step_seconds"] if "step_seconds" in record else None
        base = single.get("tokens_per_second") if single is not record else record["tokens_per_second"]
        record["vs_single"] = record["tokens_per_second"] / base if record["tokens_per_second"] and base else None
        delta = None if reference is None or record["loss0"] is None else \
            abs(record["loss0"] - reference) / abs(reference)
        record["loss0_rel_diff"] = delta
        record["loss0_ok"] = None if delta is None else delta <= preset.loss_rtol
        # later steps also check the gradients and the update; reported, not judged (bf16 SGD
        # updates round differently per layout, and the difference grows step by step)
        pairs = [(a, b) for a, b in zip(record["losses"], single.get("losses", [])) if a is not None and b]
        record["loss_max_rel_diff_all_steps"] = max((abs(a - b) / abs(b) for a, b in pairs), default=None)
    summary: dict[str, Any] = {"reference_loss0": reference, "loss_rtol": preset.loss_rtol}
    peers_ok = {n: r for n, r in records.items() if n != "autopart" and r["tokens_per_second"]}
    ours = records.get("autopart", {})
    if peers_ok:
        best = max(peers_ok, key=lambda n: peers_ok[n]["tokens_per_second"])
        summary["best_peer"] = best
        if ours.get("tokens_per_second"):
            summary["autopart_vs_best_peer"] = ours["tokens_per_second"] / peers_ok[best]["tokens_per_second"]
    if ours.get("status") == "ok":
        summary.update(_predicted_vs_measured(ours))
    return summary


def _predicted_vs_measured(record: dict[str, Any]) -> dict[str, Any]:
    """autopart's predicted step and memory beside the measured, per rank and for the fullest rank."""
    out: dict[str, Any] = {}
    predicted_step = record["info"].get("predicted_step_seconds")
    if predicted_step:
        out["predicted_step_seconds"] = predicted_step
        out["predicted_over_measured_step"] = predicted_step / record["step_seconds"]
    ranks = sorted(record["ranks"], key=lambda r: r["rank"])
    predicted = [r.get("info", {}).get("predicted_memory_bytes") for r in ranks]
    measured = [r.get("peak_bytes") for r in ranks]
    out["predicted_memory_bytes"] = predicted
    if all(predicted) and all(measured):
        out["predicted_over_measured_memory"] = [p / m for p, m in zip(predicted, measured)]
        out["predicted_over_measured_memory_fullest"] = max(predicted) / max(measured)
    return out


def table(records: dict[str, dict], summary: dict[str, Any]) -> str:
    """The printed table and the two summary lines."""
    header = f"{'mode':<12}{'mesh':<26}{'tokens/s':>12}{'x one dev':>11}  {'peak GiB per rank':<24}{'step-0 loss Δ':>14}"
    lines = [header, "-" * len(header)]
    for name, r in records.items():
        mesh = _mesh_text(r)
        speed = f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] else r["status"][:12]
        ratio = f"{r['vs_single']:.2f}" if r["vs_single"] else "-"
        mem = " / ".join(f"{b / 2**30:.1f}" for b in r["peak_memory_bytes"] if b is not None) or "-"
        delta = "-" if r["loss0_rel_diff"] is None else f"{r['loss0_rel_diff']:.1e}" + ("" if r["loss0_ok"] else " !")
        lines.append(f"{name:<12}{mesh:<26}{speed:>12}{ratio:>11}  {mem:<24}{delta:>14}")
        if r["status"].startswith("failed"):
            lines.append(f"{'':<12}{r['status'][:100]}")
    ref = summary.get("reference_loss0")
    lines.append(f"one-device step-0 loss {ref:.6f}, tolerance {summary['loss_rtol']:.0e} relative" if ref is not None
                 else "no one-device step-0 loss to compare with")
    info = records.get("autopart", {}).get("info") or {}
    if info:
        lines.append(f"autopart: cluster {info['cluster_source']}; {info['precision']}; "
                     f"compiled in {info['compile_seconds']:.1f} s")
    if "autopart_vs_best_peer" in summary:
        lines.append(f"autopart / best peer ({summary['best_peer']}) = {summary['autopart_vs_best_peer']:.2f}")
    if "predicted_over_measured_step" in summary:
        mem = summary.get("predicted_over_measured_memory_fullest")
        lines.append(f"predicted/measured step = {summary['predicted_over_measured_step']:.2f}, memory = "
                     + (f"{mem:.2f} (fullest rank)" if mem else "- (not measured on the CPU)"))
    return "\n".join(lines)


def _mesh_text(record: dict[str, Any]) -> str:
    mesh = record.get("mesh") or {}
    text = " ".join(f"{k}{v}" for k, v in mesh.items() if v > 1) or "1"
    info = record.get("info") or {}
    if info.get("schedule") and mesh.get("pp", 1) > 1:
        text += f" {info['schedule']} m{info.get('microbatches')}"
    if info.get("dp_kind"):
        text += f" {info['dp_kind']}"
    return text


def _calibration(tmp: str, args: argparse.Namespace, gpu: bool) -> str:
    """A JSON file with autopart.calibrate()'s cluster, or why there is none.

    calibrate() runs in a process of its own: this one stays off the GPUs, and
    every autopart rank then plans on the same measured cluster."""
    import autopart

    path = os.path.join(tmp, "calibration.json")
    if hasattr(autopart, "calibrate"):
        code, _, _ = _run([sys.executable, os.path.abspath(__file__), "--nproc", str(args.nproc),
                           "--device", args.device, "--calibrate-to", path], _child_env(gpu), args.timeout)
        why = f"the calibration process failed ({'timed out' if code is None else f'exit code {code}'})"
    else:
        why = "this autopart has no calibrate()"
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"why": why}, f)
    return path


def parent(args: argparse.Namespace) -> None:
    gpu = torch.cuda.is_available() and args.device != "cpu"
    preset = peers.PRESETS[args.model]
    known = all_modes(args.nproc)
    wanted = [m.name for m in known] if args.modes == "all" else args.modes.split(",")
    unknown = [n for n in wanted if n not in {m.name for m in known}]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown} for --nproc {args.nproc}; choose from {[m.name for m in known]}")
    modes = [m for m in known if m.name in wanted]
    out_path = args.out or os.path.join(HERE, "results",
                                        f"gpu_compare_{args.model}_{args.nproc}{'gpu' if gpu else 'cpu'}.json")
    records: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_compare_") as tmp:
        calibration = _calibration(tmp, args, gpu) if "autopart" in wanted else None
        for mode in modes:
            records[mode.name] = launch(mode, args, os.path.join(tmp, mode.name), calibration, gpu)
    summary = compare(records, preset)
    print(table(records, summary))
    result = {"model": peers.preset_dict(preset), "nproc": args.nproc, "device":
              next((r["ranks"][0]["device"] for r in records.values() if r["ranks"]), None),
              "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
              "env": {k: os.environ.get(k, v) for k, v in CHILD_ENV.items()}, "summary": summary,
              "modes": records}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {out_path}")
    if args.strict and any(r["status"].startswith("failed") or r["loss0_ok"] is False for r in records.values()):
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(peers.PRESETS), default="small")
    parser.add_argument("--nproc", type=int, help="processes (GPUs) for the parallel modes; default: every GPU, "
                                                  "or 2 on the CPU")
    parser.add_argument("--modes", default="all", help="'all' or a comma list, e.g. single,ddp,autopart")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_compare_<model>_<N>gpu.json)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10 on GPUs, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, step 0 among them (default 3 / 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: gloo even with GPUs")
    parser.add_argument("--timeout", type=float, help="seconds per mode before it is killed (default 900 / 180)")
    parser.add_argument("--pg-timeout", type=float, help="collective timeout in the workers (default timeout - 60)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a mode failed or its loss is off")
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)  # a worker: its settings (JSON)
    parser.add_argument("--calibrate-to", help=argparse.SUPPRESS)  # the calibration process: where to write
    args = parser.parse_args(argv)
    if args.worker_config:
        with open(args.worker_config, encoding="utf-8") as f:
            worker(argparse.Namespace(**json.load(f)))
        return
    gpu = torch.cuda.is_available() and args.device != "cpu"
    args.nproc = args.nproc or (torch.cuda.device_count() if gpu else 2)
    args.steps = args.steps if args.steps is not None else (10 if gpu else 3)
    args.warmup = max(1, args.warmup if args.warmup is not None else (3 if gpu else 1))  # step 0 is never timed
    args.timeout = args.timeout or (900.0 if gpu else 180.0)
    args.pg_timeout = args.pg_timeout or max(30.0, args.timeout - 60)
    if args.calibrate_to:
        calibrate(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
