"""The partition report as one self-contained HTML page: inline CSS and SVG, nothing fetched."""

from __future__ import annotations

from html import escape

from autopart.core.plan import Plan
from autopart.report.summary import (
    MEMORY_KINDS,
    TP_COUNT_NOTE,
    abbreviate_blocks,
    cluster_label,
    depth_label,
    device_memory,
    experts_summary,
    parts_note,
    splits_nothing,
    step_parts,
    idle_notes,
    is_training,
    model_name,
    precision_label,
    recompute_summary,
    stage_count_notes,
    tensor_parallel_summary,
)
from autopart.report.svg import (
    ACTION_COLOURS,
    MEMORY_COLOURS,
    STEP_PART_COLOURS,
    layers_svg,
    memory_svg,
    stage_colour,
    timeline_svg,
)
from autopart.report.text import best_candidates, render_text
from autopart.report.timing import makespan, predicted_timeline
from autopart.core.units import fmt_bytes, fmt_count, fmt_flops, fmt_percent, fmt_seconds, plural

_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f7f8fa; --card:#fff; --accent:#4e79a7; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1140px; margin:0 auto; padding:28px 24px 48px; }
h1 { font-size:24px; margin:0 0 2px; } h2 { font-size:17px; margin:0 0 4px; }
.subtitle { color:var(--muted); margin:0 0 18px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 18px;
  margin:0 0 16px; overflow-x:auto; }
.caption { color:var(--muted); margin:0 0 10px; font-size:13px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(135px,1fr)); gap:10px; margin:0 0 16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px 14px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:20px; font-weight:600; margin-top:2px; overflow-wrap:break-word; }
.card .v.long { font-size:15px; line-height:1.9; }
.warn { background:#fff6e0; border:1px solid #f0c36d; border-radius:8px; padding:8px 12px; margin:0 0 16px; }
.card .d { color:var(--muted); font-size:12px; }
td.nw { white-space:nowrap; }
.legend { display:flex; flex-wrap:wrap; gap:14px; margin:8px 0 0; font-size:12.5px; color:var(--muted); }
.legend span { display:inline-flex; align-items:center; gap:6px; }
.sw { width:14px; height:14px; border-radius:3px; display:inline-block; border:1px solid rgba(0,0,0,.08); }
.sw.idle { background:repeating-linear-gradient(45deg,#f4f5f7 0 3px,#dde1e6 3px 5px); }
.sw.comm { background:repeating-linear-gradient(45deg,#8a94a6 0 2px,#5d6778 2px 4px); }
.sw.line { width:16px; height:0; border:none; border-top:2px dashed; border-radius:0; }
ul.why { margin:6px 0 0; padding-left:20px; } ul.why li { margin:3px 0; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.chosen td { background:#eef4fb; font-weight:600; }
.pill { display:inline-block; padding:0 7px; border-radius:9px; font-size:11.5px; font-weight:600; }
.pill.chosen { background:#4e79a7; color:#fff; } .pill.feasible { background:#e3efe0; color:#2f6b2a; }
.pill.infeasible { background:#fbe4e4; color:#a61b1b; } .pill.pruned { background:#eceff3; color:#616e7c; }
.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:6px; }
pre { background:#f4f5f7; padding:12px; border-radius:8px; overflow-x:auto; font-size:12px; line-height:1.35; }
details summary { cursor:pointer; font-weight:600; }
svg text { font-family:inherit; }
svg .label { font-size:12px; fill:#1f2933; font-weight:600; } svg .sub { font-size:11px; fill:#616e7c; }
svg .tick { font-size:11px; fill:#616e7c; } svg .value { font-size:12px; fill:#1f2933; }
svg .note { font-size:12px; fill:#616e7c; font-style:italic; } svg .mark { font-size:11px; fill:#7b1e1e; }
svg .boxlabel { font-size:11px; fill:#fff; font-weight:600; pointer-events:none; }
svg .axis { stroke:#9aa5b1; stroke-width:1; } svg .grid { stroke:#eceff3; stroke-width:1; }
svg .box, svg .seg, svg .block { stroke:#fff; stroke-width:1; }
svg .box.dense { stroke-width:.35; }
svg .box:hover, svg .seg:hover, svg .block:hover { stroke:#1f2933; stroke-width:1.5; }
svg .capacity { stroke:#c0392b; stroke-width:2; stroke-dasharray:4 3; }
svg .predicted { stroke:#7b1e1e; stroke-width:1.5; stroke-dasharray:5 4; }
svg .played { stroke:#1f2933; stroke-width:1; stroke-dasharray:2 3; }
svg .bracket { fill:none; stroke-width:2; }
"""


def render_html(plan: Plan) -> str:
    """The report page: summary cards, schedule timeline, memory bars, layer strip, tables."""
    actions = predicted_timeline(plan)
    title = f"{model_name(plan)} on {cluster_label(plan)}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="subtitle">autopart partition report · {escape(plan.model_class)}</p>',
        _cards(plan),
        _warnings(plan),
        _why(plan),
        _section("Pipeline schedule", _timeline_caption(plan, makespan(actions)),
                 timeline_svg(plan, actions) + _timeline_legend(plan)),
        _section("Memory per device", _memory_caption(plan), memory_svg(plan) + _memory_legend()),
        _section("Layers by stage",
                 f"The model's {plural(sum(len(s.blocks) for s in plan.stages), 'block')} in execution order, "
                 f"coloured by the stage that runs them (hover for names). The thin row beneath shows each "
                 f"block's tensor-parallel split: {escape(tensor_parallel_summary(plan))}."
                 + (f" {escape(TP_COUNT_NOTE)}." if plan.mesh.tp > 1 and not splits_nothing(plan) else "")
                 + (f" {escape(parts_note(plan))}." if parts_note(plan) else ""),
                 layers_svg(plan) + _stage_legend(plan)),
        _section("Stages", "Per microbatch unless stated.", _stage_table(plan)),
        _section("Candidates", f"Every configuration the planner tried, the chosen first, then by predicted step "
                               f"(dp: data-parallel replicas and their mode; pp: pipeline ranks; v: stages per rank; "
                               f"tp: tensor-parallel group; m: microbatches); {escape(_solver_line(plan))}.",
                 _candidate_table(plan)),
        "<section><details><summary>Text report</summary>"
        f"<pre>{escape(render_text(plan))}</pre></details></section>",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>autopart: {escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def _timeline_caption(plan: Plan, pipeline_played: float) -> str:
    parts = step_parts(plan)
    after = parts[1:]
    played = pipeline_played + sum(seconds for _, seconds in after)
    formula = " + ".join(f"{escape(name)} {fmt_seconds(seconds)}" for name, seconds in parts)
    then = (" then " + " and ".join(escape(name) for name, _ in after) + ", each rank alike (the slowest rank's),"
            if after else "")
    return (f"One step of {escape(plan.schedule)} with {plural(plan.num_microbatches, 'microbatch')}, played with "
            f"each stage's predicted times (tensor-parallel collectives are inside the F and B boxes): a rank starts "
            f"an action when it is free and its input has arrived;{then} as the planner prices them. "
            f"Played: {fmt_seconds(played)}. The planner's estimate, by which it ranks candidates: "
            f"{formula} = {fmt_seconds(plan.predicted_step_seconds)}, its pipeline part the schedule's step in "
            f"slots × the slowest stage. With unequal stages that is an upper bound (every slot as long as the "
            f"slowest stage's), so the played step, which times each stage's own work, is usually the shorter "
            f"and the nearer prediction; with equal stages the two agree.")


def _memory_caption(plan: Plan) -> str:
    text = ("Peak bytes each device holds under the schedule, stacked by kind; the dashed red line is the "
            "device's capacity. One row per pipeline rank, standing for every device that runs it (its "
            "tensor-parallel group in every data-parallel replica).")
    if plan.virtual_stages > 1:
        text += (f" Each rank holds {plan.virtual_stages} stages: its row sums their peaks (the planner keeps each "
                 f"stage within 1/{plan.virtual_stages} of the device, so the sum is within the device).")
    return text


def _warnings(plan: Plan) -> str:
    if not splits_nothing(plan):
        return ""
    return f'<p class="warn"><b>Warning:</b> {escape(tensor_parallel_summary(plan))}.</p>'


def _section(title: str, caption: str, content: str) -> str:
    return f'<section><h2>{escape(title)}</h2><p class="caption">{caption}</p>{content}</section>'


def _card(key: str, value: str, detail: str = "") -> str:
    size = " long" if len(value) > 10 else ""  # a long value (interleaved_1f1b) in a smaller font, wrapped
    shown = escape(value).replace("_", "_<wbr>")  # after an underscore, not mid-word
    return (f'<div class="card"><div class="k">{escape(key)}</div><div class="v{size}">{shown}</div>'
            f'<div class="d">{escape(detail)}</div></div>')


def _cards(plan: Plan) -> str:
    mode = f"training, {plan.optimizer}" if is_training(plan) else "inference"
    mode += f", {precision_label(plan)}"
    fullest = max(device_memory(plan), key=lambda r: r.total / r.capacity)
    idle = plan.idle_devices
    cards = [
        _card("step time", fmt_seconds(plan.predicted_step_seconds), f"predicted, {mode}"),
        _card("pipeline", plural(plan.num_stages, "stage"),
              f"pp={plan.mesh.pp} × tp={plan.mesh.tp} × dp={plan.mesh.dp}"
              + (f" {plan.data_parallel_mode}" if plan.mesh.dp > 1 else "")
              + (f" (ep={plan.mesh.ep})" if plan.mesh.ep > 1 else "")
              + (f", {plan.virtual_stages} per rank" if plan.virtual_stages > 1 else "")),
        _card("microbatches", str(plan.num_microbatches), f"of {plan.microbatch_size} (batch {plan.batch_size})"),
        _card("schedule", plan.schedule, f"bubble {fmt_percent(plan.bubble_fraction)}"),
        *([_card("recompute", _recompute_value(plan), recompute_summary(plan))] if is_training(plan) else []),
        *([_card("experts", _experts_value(plan), experts_summary(plan))] if plan.experts is not None else []),
        _card("fullest device", fmt_percent(fullest.total / fullest.capacity),
              f"device {fullest.devices[0]}: {fmt_bytes(fullest.total)} of {fmt_bytes(fullest.capacity)}"),
        _card("idle devices", str(len(idle)),
              (f"{plan.mesh.tp}-device tp groups split nothing: they repeat each other's work" if splits_nothing(plan)
               else "all in use") if not idle else f"of {len(plan.cluster['devices'])}"),
        _card("solver", plan.solver.status.lower(), f"{plan.solver.backend}, {fmt_seconds(plan.solver.plan_seconds)} "
                                                    f"search"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _experts_value(plan: Plan) -> str:
    """'ep=4', 'tp=2', 'ep=4 × tp=2' (how each expert layer is split), or 'replicated'."""
    parts = [f"{axis}={n}" for axis, n in (("ep", plan.experts.ep), ("tp", plan.experts.tp)) if n > 1]
    return " × ".join(parts) or "replicated"


def _recompute_value(plan: Plan) -> str:
    modes = {m for stage in plan.stages for m in (stage.recompute or ("none",))}
    return modes.pop() if len(modes) == 1 else "per block"


def _why(plan: Plan) -> str:
    notes = [f"<b>{escape(depth_label(plan, count))}</b>: {escape(reason)}"
             for count, reason in stage_count_notes(plan)]
    notes += [escape(note) for note in idle_notes(plan)]
    if not notes:
        return ""
    items = "".join(f"<li>{note}</li>" for note in notes)
    return (f"<section><h2>Why {depth_label(plan)}</h2>"
            f'<ul class="why">{items}</ul></section>')


def _legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f"<span>{swatch}{escape(text)}</span>" for swatch, text in items) + "</div>"


def _timeline_legend(plan: Plan) -> str:
    return _legend([
        (f'<i class="sw" style="background:{ACTION_COLOURS["F"]}"></i>', "forward (F microbatch)"),
        (f'<i class="sw" style="background:{ACTION_COLOURS["B"]}"></i>', "backward (B, or I: input gradient)"),
        (f'<i class="sw" style="background:{ACTION_COLOURS["W"]}"></i>', "weight gradient (W, zero bubble)"),
        ('<i class="sw comm"></i>', "boundary transfer"),
        *[(f'<i class="sw" style="background:{STEP_PART_COLOURS[name]}"></i>', name)
          for name, _ in step_parts(plan)[1:]],
        ('<i class="sw idle"></i>', "idle (bubble)"),
        ('<i class="sw line" style="border-color:#7b1e1e"></i>', "planner's step estimate"),
        ('<i class="sw line" style="border-color:#1f2933"></i>', "end of the played step"),
    ])


def _memory_legend() -> str:
    return _legend([(f'<i class="sw" style="background:{MEMORY_COLOURS[k]}"></i>', k) for k in MEMORY_KINDS]
                   + [('<i class="sw line" style="border-color:#c0392b"></i>', "capacity"),
                      ('<i class="sw idle"></i>', "idle device")])


def _stage_legend(plan: Plan) -> str:
    rank = (lambda s: f" · rank {s.index % plan.mesh.pp}") if plan.virtual_stages > 1 else (lambda s: "")
    return _legend([(f'<i class="sw" style="background:{stage_colour(s.index)}"></i>',
                     f"stage {s.index}{rank(s)} · device {s.device} ({s.device_name}): "
                     f"{plural(len(s.blocks), 'block')}")
                    for s in plan.stages])


def _stage_table(plan: Plan) -> str:
    head = ("<tr><th>stage</th><th>device</th><th>layers</th><th class=n>params</th><th class=n>fwd FLOPs</th>"
            "<th class=n>bwd FLOPs</th><th class=n>fwd</th><th class=n>bwd</th><th class=n>comm</th>"
            "<th class=n>sends</th><th class=n>memory</th><th class=n>of capacity</th></tr>")
    rows = []
    for s in plan.stages:
        mem = s.memory
        kinds = ", ".join(f"{k} {fmt_bytes(getattr(mem, k))}" for k in MEMORY_KINDS)
        cells = [
            f'<td><i class="dot" style="background:{stage_colour(s.index)}"></i>{s.index}</td>',
            f"<td class=nw>{s.device} · {escape(s.device_name)}</td>",
            f'<td title="{escape(", ".join(s.blocks))}">{escape(abbreviate_blocks(s.blocks))}</td>',
            f"<td class=n>{fmt_count(s.num_params)}</td>",
            f"<td class=n>{fmt_flops(s.fwd_flops)}</td>",
            f"<td class=n>{fmt_flops(s.bwd_flops)}</td>",
            f"<td class=n>{fmt_seconds(s.fwd_seconds)}</td>",
            f"<td class=n>{fmt_seconds(s.bwd_seconds)}</td>",
            f"<td class=n>{fmt_seconds(s.comm_seconds)}</td>",
            f"<td class=n>{fmt_bytes(s.send_bytes)}</td>",
            f'<td class=n title="{escape(kinds)}">{fmt_bytes(mem.total)}</td>',
            f"<td class=n>{fmt_percent(mem.total / mem.capacity)} of {fmt_bytes(mem.capacity)}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _candidate_table(plan: Plan) -> str:
    """Every candidate, the chosen first, then by predicted step, then those without one in the order tried;
    with every field that tells two apart (replicas and their mode, ranks, virtual stages, tp, microbatches,
    schedule, recompute)."""
    head = ("<tr><th class=n>#</th><th class=n>dp</th><th>mode</th><th class=n title=\"pipeline ranks\">pp</th>"
            "<th class=n title=\"stages per pipeline rank\">v</th><th class=n>tp</th>"
            "<th class=n title=\"microbatches\">m</th><th>schedule</th>"
            "<th>recompute</th><th class=n>step time</th><th>status</th><th>detail</th></tr>")
    rows = []
    for k, c in enumerate(best_candidates(plan, limit=len(plan.candidates)), start=1):
        step = fmt_seconds(c.step_seconds) if c.step_seconds is not None else "–"
        status = escape(c.status)
        mode = escape(c.data_parallel_mode) if c.data_parallel > 1 else "–"
        rows.append(f'<tr class="{status}"><td class=n>{k}</td><td class=n>{c.data_parallel}</td><td>{mode}</td>'
                    f'<td class=n>{c.pipeline_parallel}</td><td class=n>{c.virtual_stages}</td>'
                    f'<td class=n>{c.tensor_parallel}</td><td class=n>{c.num_microbatches}</td>'
                    f"<td class=nw>{escape(c.schedule)}</td><td>{escape(c.recompute)}</td><td class=n>{step}</td>"
                    f'<td><span class="pill {status}">{status}</span></td><td>{escape(c.detail)}</td></tr>')
    return f"<table>{head}{''.join(rows)}</table>"


def _solver_line(plan: Plan) -> str:
    info = plan.solver
    return (f"the chosen solve: {info.backend} {info.status}, objective {fmt_seconds(info.objective_seconds)}, "
            f"bound {fmt_seconds(info.bound_seconds)}, {fmt_seconds(info.solve_seconds)}; the whole search "
            f"{fmt_seconds(info.plan_seconds)} over {plural(info.num_problems, 'ILP')}")
