"""The partition report as plain text: what runs where, what it costs, and why."""

from __future__ import annotations

from collections import Counter

from autopart.core.plan import Candidate, Plan, StagePlan
from autopart.report.summary import (
    MEMORY_KINDS,
    abbreviate_blocks,
    cluster_label,
    TP_COUNT_NOTE,
    data_parallel_summary,
    experts_summary,
    depth_label,
    device_memory,
    parts_note,
    splits_nothing,
    step_parts,
    idle_notes,
    in_flight,
    is_training,
    kernels_label,
    memory_line,
    mesh_label,
    model_name,
    precision_label,
    recompute_summary,
    schedule_grid,
    stage_count_notes,
    tensor_parallel_split,
    tensor_parallel_summary,
    used_devices,
)
from autopart.core.units import fmt_bytes, fmt_count, fmt_flops, fmt_percent, fmt_ranges, fmt_seconds, plural

_LABEL = 17
"""Width of the label column of 'label: value' lines."""


def render_text(plan: Plan) -> str:
    """The whole report: mesh, stages, schedule, solver, candidates, and the reasons for the choice."""
    sections = [
        _header(plan),
        *(_stage(plan, stage) for stage in plan.stages),
        _device_memory(plan),
        _schedule(plan),
        _solver(plan),
        _candidates(plan),
        _why(plan),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _kv(label: str, value: str, indent: str = "") -> str:
    head = f"{label}:" if label else ""
    return f"{indent}{head:<{_LABEL - len(indent)}}{value}"


def _header(plan: Plan) -> str:
    title = f"autopart plan: {model_name(plan)} on {cluster_label(plan)}"
    used = used_devices(plan)
    names = sorted({s.device_name for s in plan.stages})
    mode = f"training, optimizer {plan.optimizer}" if is_training(plan) else "inference (forward only)"
    mode += f", {precision_label(plan)}, {kernels_label(plan)}"
    micro = plural(plan.num_microbatches, "microbatch")
    return "\n".join([
        title,
        "=" * len(title),
        _kv("mesh", f"{mesh_label(plan)} on {'device' if len(used) == 1 else 'devices'} {fmt_ranges(used)} ({', '.join(names)})"),
        _kv("step time", f"{fmt_seconds(plan.predicted_step_seconds)} predicted = "
                         + " + ".join(f"{name} {fmt_seconds(seconds)}" for name, seconds in step_parts(plan))),
        _kv("batch", f"{plan.batch_size} samples = {micro} of {plan.microbatch_size}"),
        _kv("schedule", f"{plan.schedule}, bubble {fmt_percent(plan.bubble_fraction)}"),
        _kv("mode", mode),
        _kv("tensor parallel", tensor_parallel_summary(plan)),
        *([_kv("experts", experts_summary(plan))] if plan.experts is not None else []),
        *([_kv("data parallel", data_parallel_summary(plan))] if plan.mesh.dp > 1 else []),
        *([_kv("recompute", recompute_summary(plan))] if is_training(plan) else []),
        *([_kv("", TP_COUNT_NOTE)] if plan.mesh.tp > 1 and not splits_nothing(plan) else []),
        *([_kv("", parts_note(plan))] if parts_note(plan) else []),
    ])


def _stage(plan: Plan, stage: StagePlan) -> str:
    mem = stage.memory
    state = " + ".join(f"{kind} {fmt_bytes(getattr(mem, kind))}" for kind in MEMORY_KINDS[:4])
    flight = (f"+ activations {fmt_bytes(mem.activations)} + boundary {fmt_bytes(mem.boundary)} "
              f"({plural(in_flight(plan)[stage.index], 'microbatch')} in flight)")
    if is_training(plan) and mem.activations == 0 and mem.grads > 0:
        flight += "; the peak comes after the last backward, which freed the activations"
    last = stage.index + 1 >= plan.num_stages
    sends = "nothing (last stage)" if last else f"{fmt_bytes(stage.send_bytes)} per microbatch to stage {stage.index + 1}"
    lines = [
        f"stage {stage.index} · " + (f"pipeline rank {stage.index % plan.mesh.pp} · " if plan.virtual_stages > 1
                                     else "") + f"device {stage.device} ({stage.device_name})",
        _kv("layers", abbreviate_blocks(stage.blocks), "  "),
        _kv("parameters", f"{fmt_count(stage.num_params)} ({fmt_bytes(mem.params)})", "  "),
        _kv("FLOPs", f"fwd {fmt_flops(stage.fwd_flops)}, bwd {fmt_flops(stage.bwd_flops)} per microbatch", "  "),
        _kv("time", f"fwd {fmt_seconds(stage.fwd_seconds)} + bwd {fmt_seconds(stage.bwd_seconds)} + comm "
                    f"{fmt_seconds(stage.comm_seconds)} = {fmt_seconds(stage.seconds)} per microbatch", "  "),
        _kv("sends", sends, "  "),
        *([_kv("recompute", f"{_recompute_blocks(stage)}; replays {fmt_seconds(stage.recompute_seconds)} of "
                            "forward in each backward", "  ")] if stage.recompute else []),
        _kv("memory", memory_line(plan, stage), "  "),
        _kv("", state, "  "),
        _kv("", flight, "  "),
    ]
    split = _tensor_parallel_lines(plan, stage)
    if split:
        lines.append(_kv("tp split", split[0], "  "))
        lines += [_kv("", line, "  ") for line in split[1:]]
    return "\n".join(lines)


def _tensor_parallel_lines(plan: Plan, stage: StagePlan) -> list[str]:
    """Per-layer split of a stage, one line per distinct split; nothing while tp = 1."""
    if plan.mesh.tp == 1:
        return []
    by_split: dict[str, list[str]] = {}
    for block in stage.blocks:
        by_split.setdefault(tensor_parallel_split(plan, stage, block), []).append(block)
    return [f"{split}: {abbreviate_blocks(blocks)}" for split, blocks in by_split.items()]


def _device_memory(plan: Plan) -> str:
    """Per pipeline rank, when ranks hold several stages: their stages' peaks summed against the device."""
    if plan.virtual_stages == 1:
        return ""
    lines = [f"memory per device (each pipeline rank's {plan.virtual_stages} stages summed; the devices of a "
             "rank's tp group and replicas each hold this)"]
    for row in device_memory(plan):
        lines.append(_kv(f"pipeline rank {row.rank}", f"{fmt_bytes(row.total)} of {fmt_bytes(row.capacity)} "
                                              f"({fmt_percent(row.total / row.capacity)}) on "
                                              f"{plural(len(row.devices), 'device')}, stages "
                                              f"{', '.join(map(str, row.stages))}", "  "))
    return "\n".join(lines)


def _schedule(plan: Plan) -> str:
    micro = plural(plan.num_microbatches, "microbatch")
    if plan.virtual_stages > 1:
        formula = (f"{plan.virtual_stages} stages per rank; bubble (R - 1) / (m·v + R - 1) for interleaved 1F1B "
                   f"with R = {plan.mesh.pp}, m = {plan.num_microbatches}, v = {plan.virtual_stages}")
    else:
        formula = f"(R - 1) / (m + R - 1) with R = {plan.mesh.pp}, m = {plan.num_microbatches}"
    if plan.schedule == "zero_bubble":
        formula = "played with I = 1.25 F, W = F: weight gradients fill the 1F1B bubble; " + formula.replace(
            "for interleaved 1F1B ", "for interleaved 1F1B, less here ")
    head = f"schedule: {plan.schedule}, {micro}, bubble {fmt_percent(plan.bubble_fraction)} ({formula})"
    return head + "\n" + _indent(schedule_grid(plan))


def _solver(plan: Plan) -> str:
    info = plan.solver
    gap = (info.objective_seconds - info.bound_seconds) / info.objective_seconds if info.objective_seconds else 0.0
    return "\n".join([
        "solver",
        _kv("chosen solve", f"{info.backend} {info.status}: objective {fmt_seconds(info.objective_seconds)}, "
                            f"bound {fmt_seconds(info.bound_seconds)} (gap {fmt_percent(max(gap, 0.0))}), "
                            f"{fmt_seconds(info.solve_seconds)}", "  "),
        _kv("search", f"{fmt_seconds(info.plan_seconds)} over {plural(info.num_problems, 'ILP')}, "
                      f"{plural(len(plan.candidates), 'candidate')}", "  "),
    ])


MAX_CANDIDATES = 8
"""Candidates the text report lists when there are more: the chosen and the fastest others (the HTML
report and the plan's JSON keep all)."""


def best_candidates(plan: Plan, limit: int = MAX_CANDIDATES) -> list[Candidate]:
    """Every candidate when there are at most `limit`, else the chosen and the fastest feasible ones, at
    most `limit`; ranked: the chosen, then by predicted step, then those without one in the order tried."""
    ranked = sorted(plan.candidates, key=lambda c: (c.status != "chosen", c.step_seconds is None,
                                                   c.step_seconds or 0.0))
    if len(ranked) <= limit:
        return ranked
    return [c for c in ranked if c.step_seconds is not None][:limit]


def _candidates(plan: Plan) -> str:
    rows = [("", "dp", "pp", "tp", "m", "schedule", "recompute", "step", "status", "detail")]
    shown = best_candidates(plan)
    for c in shown:
        step = fmt_seconds(c.step_seconds) if c.step_seconds is not None else "-"
        schedule = c.schedule + (f" v={c.virtual_stages}" if c.virtual_stages > 1 else "")
        dp = str(c.data_parallel) + (f" {c.data_parallel_mode}" if c.data_parallel > 1 else "")
        rows.append(("*" if c.status == "chosen" else "", dp, str(c.pipeline_parallel),
                     str(c.tensor_parallel), str(c.num_microbatches), schedule, c.recompute, step, c.status,
                     c.detail))
    widths = [max(len(r[k]) for r in rows) for k in range(9)]
    hidden = len(plan.candidates) - len(shown)
    lines = [f"candidates ({len(plan.candidates)} tried; * chosen"
             + (f"; the fastest {len(shown)} shown)" if hidden else ")")]
    for r in rows:
        cells = [r[k].rjust(widths[k]) if k in (1, 2, 3, 4, 7) else r[k].ljust(widths[k]) for k in range(9)]
        lines.append("  " + "  ".join(cells) + "  " + r[9])
    if hidden:
        rest = Counter(c.status for c in plan.candidates if c not in shown)
        kinds = ", ".join(f"{count} {status}" for status, count in sorted(rest.items(), key=lambda kv: -kv[1]))
        lines.append(f"  … and {hidden} more ({kinds}); the HTML report and the plan's JSON list every candidate")
    return "\n".join(line.rstrip() for line in lines)


def _why(plan: Plan) -> str:
    notes = stage_count_notes(plan)
    idle = idle_notes(plan)
    if not notes and not idle:
        return ""
    lines = [f"why {depth_label(plan)}"]
    lines += [f"  {depth_label(plan, count)}: {reason}" for count, reason in notes]
    lines += [f"  {note}" for note in idle]
    return "\n".join(lines)


def _recompute_blocks(stage: StagePlan) -> str:
    """'full (all 5 blocks)', or per mode the blocks it applies to."""
    modes = stage.recompute
    if len(set(modes)) == 1:
        return f"{modes[0]} (all {plural(len(modes), 'block')})"
    return "; ".join(f"{mode}: {abbreviate_blocks([b for b, m in zip(stage.blocks, modes) if m == mode])}"
                     for mode in ("full", "selective", "none") if mode in modes)


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
