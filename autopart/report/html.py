"""The partition report as one self-contained HTML page: inline CSS and SVG, nothing fetched."""

from __future__ import annotations

from html import escape

from autopart.core.plan import Plan
from autopart.report.summary import (
    MEMORY_KINDS,
    abbreviate_blocks,
    cluster_label,
    depth_label,
    idle_notes,
    is_training,
    model_name,
    precision_label,
    recompute_summary,
    stage_count_notes,
    tensor_parallel_summary,
)
from autopart.report.svg import ACTION_COLOURS, MEMORY_COLOURS, layers_svg, memory_svg, stage_colour, timeline_svg
from autopart.report.text import render_text
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
.card .v { font-size:20px; font-weight:600; margin-top:2px; }
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
        _why(plan),
        _section("Pipeline schedule",
                 f"One step of {escape(plan.schedule)} with {plural(plan.num_microbatches, 'microbatch')}, "
                 f"played with each stage's predicted times: a rank starts an action when it is free and "
                 f"its input has arrived. Played: {fmt_seconds(makespan(actions))}; the planner's "
                 f"estimate (the schedule's step in slots × the slowest stage): "
                 f"{fmt_seconds(plan.predicted_step_seconds)}.",
                 timeline_svg(plan, actions) + _timeline_legend()),
        _section("Memory per device",
                 "Peak bytes each device holds under the schedule, stacked by kind; the dashed red line "
                 "is the device's capacity.", memory_svg(plan) + _memory_legend()),
        _section("Layers by stage",
                 f"The model's {plural(sum(len(s.blocks) for s in plan.stages), 'block')} in execution order, "
                 f"coloured by the stage that runs them (hover for names). The thin row beneath shows each "
                 f"block's tensor-parallel split: {escape(tensor_parallel_summary(plan))}.",
                 layers_svg(plan) + _stage_legend(plan)),
        _section("Stages", "Per microbatch unless stated.", _stage_table(plan)),
        _section("Candidates", f"Every configuration the planner tried; {escape(_solver_line(plan))}.",
                 _candidate_table(plan)),
        "<section><details><summary>Text report</summary>"
        f"<pre>{escape(render_text(plan))}</pre></details></section>",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>autopart: {escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def _section(title: str, caption: str, content: str) -> str:
    return f'<section><h2>{escape(title)}</h2><p class="caption">{caption}</p>{content}</section>'


def _card(key: str, value: str, detail: str = "") -> str:
    return (f'<div class="card"><div class="k">{escape(key)}</div><div class="v">{escape(value)}</div>'
            f'<div class="d">{escape(detail)}</div></div>')


def _cards(plan: Plan) -> str:
    mode = f"training, {plan.optimizer}" if is_training(plan) else "inference"
    mode += f", {precision_label(plan)}"
    fullest = max(plan.stages, key=lambda s: s.memory.total / s.memory.capacity)
    idle = plan.idle_devices
    cards = [
        _card("step time", fmt_seconds(plan.predicted_step_seconds), f"predicted, {mode}"),
        _card("pipeline", plural(plan.num_stages, "stage"),
              f"pp={plan.mesh.pp} × tp={plan.mesh.tp} × dp={plan.mesh.dp}"
              + (f" {plan.data_parallel_mode}" if plan.mesh.dp > 1 else "")
              + (f", {plan.virtual_stages} per rank" if plan.virtual_stages > 1 else "")),
        _card("microbatches", str(plan.num_microbatches), f"of {plan.microbatch_size} (batch {plan.batch_size})"),
        _card("schedule", plan.schedule, f"bubble {fmt_percent(plan.bubble_fraction)}"),
        *([_card("recompute", _recompute_value(plan), recompute_summary(plan))] if is_training(plan) else []),
        _card("fullest device", fmt_percent(fullest.memory.total / fullest.memory.capacity),
              f"device {fullest.device}: {fmt_bytes(fullest.memory.total)}"),
        _card("idle devices", str(len(idle)), "all in use" if not idle else f"of {len(plan.cluster['devices'])}"),
        _card("solver", plan.solver.status.lower(), f"{plan.solver.backend}, {fmt_seconds(plan.solver.plan_seconds)} "
                                                    f"search"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _recompute_value(plan: Plan) -> str:
    modes = {m for stage in plan.stages for m in (stage.recompute or ("none",))}
    return modes.pop() if len(modes) == 1 else "per block"


def _why(plan: Plan) -> str:
    notes = [f"<b>{plural(count, 'stage')}</b>: {escape(reason)}" for count, reason in stage_count_notes(plan)]
    notes += [escape(note) for note in idle_notes(plan)]
    if not notes:
        return ""
    items = "".join(f"<li>{note}</li>" for note in notes)
    return (f"<section><h2>Why {depth_label(plan)}</h2>"
            f'<ul class="why">{items}</ul></section>')


def _legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f"<span>{swatch}{escape(text)}</span>" for swatch, text in items) + "</div>"


def _timeline_legend() -> str:
    return _legend([
        (f'<i class="sw" style="background:{ACTION_COLOURS["F"]}"></i>', "forward (F microbatch)"),
        (f'<i class="sw" style="background:{ACTION_COLOURS["B"]}"></i>', "backward (B, or I: input gradient)"),
        (f'<i class="sw" style="background:{ACTION_COLOURS["W"]}"></i>', "weight gradient (W, zero bubble)"),
        ('<i class="sw comm"></i>', "boundary transfer"),
        ('<i class="sw idle"></i>', "idle (bubble)"),
        ('<i class="sw line" style="border-color:#7b1e1e"></i>', "planner's step estimate"),
        ('<i class="sw line" style="border-color:#1f2933"></i>', "end of the played step"),
    ])


def _memory_legend() -> str:
    return _legend([(f'<i class="sw" style="background:{MEMORY_COLOURS[k]}"></i>', k) for k in MEMORY_KINDS]
                   + [('<i class="sw line" style="border-color:#c0392b"></i>', "capacity"),
                      ('<i class="sw idle"></i>', "idle device")])


def _stage_legend(plan: Plan) -> str:
    return _legend([(f'<i class="sw" style="background:{stage_colour(s.index)}"></i>',
                     f"stage {s.index} · device {s.device} ({s.device_name}): {plural(len(s.blocks), 'block')}")
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
    head = ("<tr><th class=n>dp</th><th class=n>stages</th><th class=n>tp</th><th class=n>microbatches</th>"
            "<th>schedule</th>"
            "<th class=n>step time</th><th>status</th><th>detail</th></tr>")
    rows = []
    for c in plan.candidates:
        step = fmt_seconds(c.step_seconds) if c.step_seconds is not None else "–"
        status = escape(c.status)
        rows.append(f'<tr class="{status}"><td class=n>{c.data_parallel}</td><td class=n>{c.pipeline_parallel}</td>'
                    f'<td class=n>{c.tensor_parallel}</td><td class=n>{c.num_microbatches}</td>'
                    f"<td>{escape(c.schedule)}</td><td class=n>{step}</td>"
                    f'<td><span class="pill {status}">{status}</span></td><td>{escape(c.detail)}</td></tr>')
    return f"<table>{head}{''.join(rows)}</table>"


def _solver_line(plan: Plan) -> str:
    info = plan.solver
    return (f"the chosen solve: {info.backend} {info.status}, objective {fmt_seconds(info.objective_seconds)}, "
            f"bound {fmt_seconds(info.bound_seconds)}, {fmt_seconds(info.solve_seconds)}; the whole search "
            f"{fmt_seconds(info.plan_seconds)} over {plural(info.num_problems, 'ILP')}")
