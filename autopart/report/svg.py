"""Inline SVG pictures of a Plan: the pipeline timeline, memory per device, layers by stage.

Each function returns one `<svg>` element as a string; every string taken
from the plan is escaped. Colours are those of the Tableau 10 palette, which
stays distinguishable for the common forms of colour blindness.
"""

from __future__ import annotations

import math
from html import escape

from autopart.core.plan import Plan, StagePlan
from autopart.report.summary import (
    MEMORY_KINDS,
    DeviceMemory,
    block_label,
    device_memory,
    step_parts,
    tensor_parallel_split,
)
from autopart.report.timing import TimedAction, busy_fraction, makespan
from autopart.core.units import fmt_bytes, fmt_percent, fmt_ranges, fmt_seconds

STAGE_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
ACTION_COLOURS = {"F": "#4e79a7", "B": "#f28e2b", "I": "#f28e2b", "W": "#59a14f"}
STEP_PART_COLOURS = {"data-parallel sync": "#b07aa1", "optimizer step": "#9c755f",
                     "sync and optimizer (not itemised)": "#bab0ac"}
"""The parts of the predicted step after the pipeline (`summary.step_parts`), drawn after the played schedule."""
_ACTION_NAMES = {"F": "forward", "B": "backward", "I": "input-gradient backward", "W": "weight-gradient backward"}
MEMORY_COLOURS = {"params": "#4e79a7", "grads": "#76b7b2", "optimizer": "#edc948",
                  "buffers": "#b07aa1", "activations": "#f28e2b", "boundary": "#e15759"}
_CHAR_PX = 7.2
"""Width to allow for one character of 11 px bold sans-serif text (generous: labels must not clip)."""

_DEFS = """<defs>
<pattern id="idle" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="6" height="6" fill="#f4f5f7"/><line x1="0" y1="0" x2="0" y2="6" stroke="#dde1e6" stroke-width="2"/></pattern>
<pattern id="comm" width="4" height="4" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="4" height="4" fill="#8a94a6"/><line x1="0" y1="0" x2="0" y2="4" stroke="#5d6778" stroke-width="2"/></pattern>
</defs>"""


def stage_colour(index: int) -> str:
    """Colour of stage `index` in every picture: Tableau 10 for the first ten, then hues a golden angle
    apart (137.5°) at alternating lightness, so that no two stages of a long pipeline share a colour."""
    if index < len(STAGE_COLOURS):
        return STAGE_COLOURS[index]
    hue = (index * 137.508) % 360
    lightness = (38, 50, 62)[index % 3]
    return f"hsl({hue:.1f},{55 + 10 * (index % 2)}%,{lightness}%)"


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="100%" style="max-width:{width:.0f}px;height:auto" role="img" aria-label="{escape(label)}">'
            + "".join(body) + "</svg>")


def _rect(x: float, y: float, w: float, h: float, fill: str, title: str | None = None, extra: str = "") -> str:
    tip = f"<title>{escape(title)}</title>" if title else ""
    return (f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(w, 0):.2f}" height="{h:.2f}" fill="{fill}" {extra}>'
            f"{tip}</rect>")


def _text(x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}">{escape(text)}</text>'


def nice_step(span: float, target_ticks: int = 8, binary: bool = False) -> float:
    """A 1-2-5 step that cuts `span` into about `target_ticks` intervals.

    `binary` counts in units of 1024^k (for bytes: ticks at 1 MiB, 2 MiB, ... not 977 KiB).
    """
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    unit = 1024.0 ** max(0, math.floor(math.log(raw, 1024))) if binary and raw >= 1 else 1.0
    power = 10 ** math.floor(math.log10(raw / unit))
    return unit * next(m * power for m in (1, 2, 5, 10) if m * power >= raw / unit)


def _axis(x0: float, y: float, width: float, top: float, axis_max: float, fmt, binary: bool = False) -> list[str]:
    """Tick marks, labels and faint grid lines from 0 to axis_max along [x0, x0 + width]."""
    step = nice_step(axis_max, binary=binary)
    parts = [f'<line x1="{x0}" y1="{y}" x2="{x0 + width}" y2="{y}" class="axis"/>']
    k = 0
    while k * step <= axis_max * (1 + 1e-9):
        x = x0 + width * (k * step) / axis_max
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}" class="grid"/>')
        parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" class="axis"/>')
        parts.append(_text(x, y + 16, fmt(k * step), "tick", "middle"))
        k += 1
    return parts


# ----------------------------------------------------------------------------- (a) timeline

def timeline_svg(plan: Plan, actions: list[TimedAction], width: int = 1080) -> str:
    """One row per rank; F and B boxes of each microbatch placed by their predicted times."""
    left, right, row, gap, top = 118, 16, 30, 10, 22
    plot = width - left - right
    pipeline_played = makespan(actions)
    after = step_parts(plan)[1:]  # data-parallel sync, optimizer step: every rank, after its last backward
    played = pipeline_played + sum(seconds for _, seconds in after)
    predicted = plan.predicted_step_seconds
    axis_max = max(played, predicted, 1e-12) * 1.02
    scale = plot / axis_max
    rows_h = plan.mesh.pp * (row + gap) - gap
    height = top + rows_h + 52
    body = [_DEFS]
    body += _axis(left, top + rows_h + 6, plot, top - 6, axis_max, fmt_seconds)
    narrowest = min(((a.compute_end - a.start) * scale for a in actions), default=0.0)
    box = 'class="box dense"' if narrowest < 8 else 'class="box"'  # thin outlines keep small boxes visible
    for stage in plan.stages[:plan.mesh.pp]:  # stage r is the first one of pipeline rank r
        y = top + stage.index * (row + gap)
        busy = busy_fraction(actions, stage.index)
        body.append(_text(left - 10, y + 13, f"rank {stage.index} · dev {stage.device}", "label", "end"))
        body.append(_text(left - 10, y + 26, f"{stage.device_name}, busy {fmt_percent(busy)}", "sub", "end"))
        body.append(_rect(left, y, played * scale, row, "url(#idle)",
                          f"rank {stage.index}: idle {fmt_percent(1 - busy)} of the step"))
    for a in actions:
        y = top + a.rank * (row + gap)
        x, w = left + a.start * scale, (a.compute_end - a.start) * scale
        what = _ACTION_NAMES[a.kind]
        tip = (f"{what} of microbatch {a.microbatch}, stage {a.stage} on rank {a.rank}: {fmt_seconds(a.start)} → "
               f"{fmt_seconds(a.compute_end)} ({fmt_seconds(a.compute_end - a.start)})")
        body.append(_rect(x, y, w, row, ACTION_COLOURS[a.kind], tip, box))
        if a.end > a.compute_end:
            body.append(_rect(x + w, y, (a.end - a.compute_end) * scale, row, "url(#comm)",
                              f"boundary transfer after {a.kind}{a.microbatch} on rank {a.rank}: "
                              f"{fmt_seconds(a.end - a.compute_end)}", box))
        label = f"{a.kind}{a.microbatch}"
        if w >= len(label) * _CHAR_PX + 4:
            body.append(_text(x + w / 2, y + row / 2 + 4, label, "boxlabel", "middle"))
    for stage in plan.stages[:plan.mesh.pp]:
        y = top + stage.index * (row + gap)
        x = left + pipeline_played * scale
        for name, seconds in after:
            body.append(_rect(x, y, seconds * scale, row, STEP_PART_COLOURS[name],
                              f"{name} on rank {stage.index}: {fmt_seconds(seconds)} (the slowest rank's, after the "
                              "last backward)", box))
            if seconds * scale >= len(name) * _CHAR_PX * 0.8 + 4:
                body.append(_text(x + seconds * scale / 2, y + row / 2 + 4, name, "boxlabel", "middle"))
            x += seconds * scale
    for value, cls, name in ((played, "played", "played"), (predicted, "predicted", "planner")):
        x = left + value * scale
        body.append(f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{top + rows_h + 6}" class="{cls}"/>')
    body.append(_text(left + predicted * scale, top - 11, f"planner: {fmt_seconds(predicted)}", "mark", "end"
                      if predicted * scale > plot * 0.5 else "start"))
    body.append(_text(width / 2, height - 6, "time in the step", "sub", "middle"))
    return _svg(width, height, body, "pipeline schedule timeline")


# ----------------------------------------------------------------------------- (b) memory

def memory_svg(plan: Plan, width: int = 1080, max_idle_rows: int = 4) -> str:
    """A stacked bar per device (by memory kind) against its capacity: one row per pipeline rank (a device
    holding several virtual stages is one row, its stages summed), standing for every device that runs
    the rank. Idle devices get an empty row each, or one row together when there are more than
    `max_idle_rows`."""
    left, right, row, gap, top = 170, 230, 24, 12, 10
    plot = width - left - right
    rows = _memory_rows(plan, max_idle_rows)
    used = device_memory(plan)
    totals = [r.total for r in used]
    caps = [int(d["memory_bytes"]) for d in plan.cluster["devices"]]
    fullest = max((r.total / r.capacity for r in used), default=0.0)
    zoomed = fullest < 0.05
    axis_max = _nice_ceiling_bytes(max(totals, default=1) * 1.1) if zoomed else max(max(caps), max(totals, default=0))
    scale = plot / axis_max
    rows_h = len(rows) * (row + gap) - gap
    height = top + rows_h + 44 + (18 if zoomed else 0)
    body = [_DEFS]
    body += _axis(left, top + rows_h + 6, plot, top - 4, axis_max, fmt_bytes, binary=True)
    for k, (label, sub, held, capacity, summary) in enumerate(rows):
        y = top + k * (row + gap)
        body.append(_text(left - 10, y + 11, label, "label", "end"))
        body.append(_text(left - 10, y + 23, sub, "sub", "end"))
        body.append(_rect(left, y, plot, row, "url(#idle)" if held is None else "#f4f5f7"))
        if held is not None:
            body += _memory_segments(held, left, y, row, scale)
        body.append(_text(left + plot + 12, y + 16, summary, "value"))
        if not zoomed:
            x = left + capacity * scale
            body.append(f'<line x1="{x:.1f}" y1="{y - 3}" x2="{x:.1f}" y2="{y + row + 3}" class="capacity">'
                        f"<title>capacity {escape(fmt_bytes(capacity))}</title></line>")
    if zoomed:
        body.append(_text(left, top + rows_h + 52,
                          f"Scale zoomed to the fullest device: every device's capacity ({fmt_bytes(max(caps))}) "
                          f"lies far to the right; the fullest device uses {fmt_percent(fullest)} of it.", "note"))
    return _svg(width, height, body, "memory per device")


def _memory_rows(plan: Plan, max_idle_rows: int) -> list[tuple[str, str, DeviceMemory | None, int, str]]:
    """(label, sub-label, rank's memory or None, capacity, summary) per row of the memory chart.

    A row stands for every device that runs a pipeline rank (its tensor-parallel group in each
    data-parallel replica), which all hold what the row shows; the idle devices are the plan's
    `idle_devices`.
    """
    devices = plan.cluster["devices"]
    idle = list(plan.idle_devices)
    rows = []
    for held in device_memory(plan):
        group = list(held.devices)
        who = f"device {group[0]}" if len(group) == 1 else f"devices {fmt_ranges(group)}"
        if len(who) > 14:  # the label column holds about 20 characters
            who = f"{len(group)} devices"
        stages = (f"stage {held.stages[0]}" if len(held.stages) == 1
                  else f"stages {', '.join(map(str, held.stages))}")
        if len(stages) > 22:
            stages = f"{len(held.stages)} stages"
        each = "" if len(group) == 1 else " each"  # every device of the row holds what it shows
        rows.append((f"rank {held.rank} · {who}", f"{stages} · {held.device_name}", held, held.capacity,
                     f"{fmt_bytes(held.total)} of {fmt_bytes(held.capacity)}{each} "
                     f"({fmt_percent(held.total / held.capacity)})"))
    for d in idle[:max_idle_rows] if len(idle) <= max_idle_rows else []:
        capacity = int(devices[d]["memory_bytes"])
        rows.append((f"device {d}", f"idle · {devices[d]['name']}", None, capacity,
                     f"unused · {fmt_bytes(capacity)} free"))
    if len(idle) > max_idle_rows:
        names = ", ".join(sorted({str(devices[d]["name"]) for d in idle}))
        capacity = max(int(devices[d]["memory_bytes"]) for d in idle)
        rows.append((f"devices {fmt_ranges(idle)}", f"idle · {names}", None, capacity,
                     f"{len(idle)} unused devices"))
    return rows


def _memory_segments(held: DeviceMemory, x: float, y: float, row: float, scale: float) -> list[str]:
    parts = []
    for kind in MEMORY_KINDS:
        value = held.kinds[kind]
        if value <= 0:
            continue
        w = value * scale
        parts.append(_rect(x, y, w, row, MEMORY_COLOURS[kind],
                           f"rank {held.rank} {kind}: {fmt_bytes(value)}", 'class="seg"'))
        x += w
    return parts


def _nice_ceiling_bytes(value: float) -> float:
    step = nice_step(value, 5, binary=True)
    return max(step, math.ceil(value / step) * step)


# ----------------------------------------------------------------------------- (c) layers

def layers_svg(plan: Plan, width: int = 1080) -> str:
    """The blocks in order as a strip coloured by stage, with a tensor-parallel row beneath."""
    left = 104
    strip = width - left
    cells = [(stage, block) for stage in plan.stages for block in stage.blocks]
    n = max(len(cells), 1)
    cell = max(14.0, min(150.0, strip / n))
    per_row = max(1, int(strip / cell + 1e-9))
    cell = strip / min(per_row, n)
    block_h, tp_h, bracket_h, gap = 34, 10, 22, 14
    band = block_h + 3 + tp_h + bracket_h + gap
    num_rows = math.ceil(n / per_row)
    height = num_rows * band
    body: list[str] = []
    for r in range(num_rows):
        y = r * band
        chunk = cells[r * per_row:(r + 1) * per_row]
        body.append(_text(left - 10, y + block_h / 2 + 4, "blocks", "label", "end"))
        body.append(_text(left - 10, y + block_h + 3 + tp_h - 1, "tensor parallel", "sub", "end"))
        for k, (stage, block) in enumerate(chunk):
            x = left + k * cell
            split = tensor_parallel_split(plan, stage, block)
            tip = (f"{block_label(block)}: stage {stage.index} on device {stage.device} ({stage.device_name}); "
                   f"tensor parallel: {split}")
            body.append(_rect(x + 1, y, cell - 2, block_h, stage_colour(stage.index), tip, 'rx="3" class="block"'))
            label = _fit(block_label(block), cell - 6)
            if label:
                body.append(_text(x + cell / 2, y + block_h / 2 + 4, label, "boxlabel", "middle"))
            unsplit = split == "none" or split.startswith("replicated")
            body.append(_rect(x + 1, y + block_h + 3, cell - 2, tp_h, "#d5d9e0" if unsplit else "#6b7a90",
                              f"{block}: tensor parallel {split}", 'rx="2"'))
        body += _stage_brackets(chunk, left, cell, y + block_h + 3 + tp_h + 4)
    return _svg(width, height, body, "layers by stage")


def _stage_brackets(chunk: list[tuple[StagePlan, str]], left: float, cell: float, y: float) -> list[str]:
    parts: list[str] = []
    k = 0
    while k < len(chunk):
        j = k
        while j + 1 < len(chunk) and chunk[j + 1][0].index == chunk[k][0].index:
            j += 1
        stage = chunk[k][0]
        x0, x1 = left + k * cell + 2, left + (j + 1) * cell - 2
        parts.append(f'<path d="M{x0:.1f},{y} v4 H{x1:.1f} v-4" class="bracket" stroke="{stage_colour(stage.index)}"/>')
        label = _fit(f"stage {stage.index} · device {stage.device}", x1 - x0) or _fit(f"{stage.index}", x1 - x0)
        if label:
            parts.append(_text((x0 + x1) / 2, y + 17, label, "sub", "middle"))
        k = j + 1
    return parts


def _fit(name: str, room: float) -> str:
    """`name`, or its last dotted parts, if it fits in `room` pixels; else its start cut short with '…'
    (at least three characters), else ''."""
    parts = name.split(".")
    for k in range(len(parts)):
        candidate = ".".join(parts[k:])
        if len(candidate) * _CHAR_PX <= room:
            return candidate
    last, _, part = parts[-1].partition(" (part ")
    suffix = f" {part.rstrip(')')}" if part else ""  # 'transformer (part 2)' -> 'transf… 2'
    keep = int(room / _CHAR_PX) - 1 - len(suffix)
    return last[:keep] + "…" + suffix if keep >= 3 else ""
