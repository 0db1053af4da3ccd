"""The reports tell the truth at every scale: each figure from the Plan, drawn per device, adding up.

Reproductions: the 48×2048 GPT-2 on 64 hosts of 8 H100s (an interleaved plan, 16 ranks × 3 stages on
512 devices), README command 1's GPT-2 on 8 H100s, and a forced tensor_parallel=2 that splits nothing.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import autopart
from autopart import zoo
from autopart.report.html import render_html
from autopart.report.summary import device_memory, step_parts
from autopart.report.svg import layers_svg, memory_svg, stage_colour, timeline_svg
from autopart.report.text import render_text
from autopart.report.timing import makespan, predicted_timeline
from autopart.core.units import fmt_seconds


def big_interleaved_plan() -> autopart.Plan:
    """`autopart plan autopart.zoo:gpt2 --devices 64x8xH100 --batch-size 512 --factory-arg layers=48
    --factory-arg d_model=2048` (the vocabulary of 256 the zoo had then), planned on the meta device and
    priced op by op, as every plan was then."""
    with torch.device("meta"):
        example = zoo.gpt2(layers=48, d_model=2048, vocab=256, batch=512)
    return autopart.compile(example.model, "64x8xH100", example_inputs=example.args, compile_kernels=False).plan


@pytest.fixture(scope="module")
def big() -> autopart.Plan:
    plan = big_interleaved_plan()
    assert plan.virtual_stages > 1 and plan.mesh.num_devices == 512, "the reproduction's plan is interleaved"
    return plan


@pytest.fixture(scope="module")
def readme() -> autopart.Plan:
    with torch.device("meta"):
        example = zoo.gpt2(layers=12, d_model=768, vocab=50257, seq=64, batch=8)
    return autopart.compile(example.model, "8xH100", example_inputs=example.args, compile_kernels=False).plan


def test_memory_is_drawn_per_device_with_the_true_count_and_capacity(big):
    rows = device_memory(big)
    assert len(rows) == big.mesh.pp  # one row per rank, not per stage (48 rows before)
    assert sum(len(r.devices) for r in rows) == big.mesh.num_devices == 512  # 1,536 before
    h100 = int(big.cluster["devices"][0]["memory_bytes"])
    for row in rows:
        stages = [big.stages[s] for s in row.stages]
        assert len(stages) == big.virtual_stages
        assert row.capacity == h100  # the whole device, not the 1/v share
        assert row.total == sum(s.memory.total for s in stages)  # from the plan's JSON, summed
        assert row.total <= row.capacity
    svg = memory_svg(big)
    assert svg.count('class="label" text-anchor="end">rank ') == big.mesh.pp
    assert f"of {h100 / 2**30:.1f} GiB" in svg and "1/3 of the device" not in svg
    text = render_text(big)
    assert text.count(f"of 74.5 GiB (") >= big.mesh.pp and "share, 1/3 of device 0's 74.5 GiB" in text


def test_why_names_pipeline_ranks_and_not_the_chosen_count(big):
    text = render_text(big)
    why = text.split(f"why {big.mesh.pp} pipeline ranks\n")[1]
    assert not re.search(r"^  \d+ stages?: ", why, re.M)  # counts of ranks are not called stages
    assert not re.search(rf"^  {big.mesh.pp} pipeline ranks: ", why, re.M)  # the chosen count is not a rival
    html = render_html(big)
    assert f"<h2>Why {big.mesh.pp} pipeline ranks</h2>" in html


def test_long_schedule_names_wrap_and_stage_colours_do_not_repeat(big):
    html = render_html(big)
    assert "interleaved_<wbr>1f1b" in html  # wraps at the underscore instead of clipping
    colours = [stage_colour(s.index) for s in big.stages]
    assert len(set(colours)) == big.num_stages == 48


def test_the_timeline_adds_up_to_the_predicted_step(readme, big):
    for plan in (readme, big):
        parts = step_parts(plan)
        assert sum(seconds for _, seconds in parts) == pytest.approx(plan.predicted_step_seconds, rel=1e-12)
        assert parts[0] == ("pipeline", plan.solver.objective_seconds)
        svg = timeline_svg(plan, predicted_timeline(plan))
        for name, _ in parts[1:]:
            assert svg.count(f"{name} on rank ") == plan.mesh.pp  # drawn on every rank, labelled
    # README command 1: the 0.79 ms between the drawn 4.69 ms and the planner's 5.48 ms is the optimizer step
    assert [name for name, _ in step_parts(readme)] == ["pipeline", "optimizer step"]
    played = makespan(predicted_timeline(readme)) + readme.optimizer_seconds
    assert played == pytest.approx(readme.predicted_step_seconds, rel=1e-9)
    html = render_html(readme)
    assert "optimizer step" in html and "upper bound" in html and f"Played: {fmt_seconds(played)}" in html


def test_the_candidates_table_tells_rows_apart_and_starts_with_the_chosen(readme):
    html = render_html(readme)
    table = html.split("<h2>Candidates</h2>")[1]
    rows = re.findall(r"<tr class=\"(\w+)\">(.*?)</tr>", table)
    assert len(rows) == len(readme.candidates) and rows[0][0] == "chosen"
    cells = [tuple(re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row))[1:10]
             for _, row in rows]
    solved = [c for (status, _), c in zip(rows, cells) if status in ("chosen", "feasible")]
    assert len(set(solved)) == len(solved)  # dp, mode, pp, v, tp, m, schedule, recompute and step differ
    assert "<th>mode</th>" in table and ">v</th>" in table and "<th>recompute</th>" in table


def test_numbers_that_looked_wrong_are_explained(readme):
    text = render_text(readme)
    assert "activations 0 B" in text and "the peak comes after the last backward, which freed the activations" in text
    assert re.search(r"colwise ×\d+ ops", text) and "'colwise ×N ops': N ops of the stage" in text
    assert "transformer#2" not in text and "transformer (part 2)" in text
    svg = layers_svg(readme)
    blocks = sum(len(s.blocks) for s in readme.stages)
    assert svg.count('class="boxlabel"') == blocks  # every block labelled (two were blank)


def test_a_forced_tp_that_splits_nothing_is_warned():
    """A stack of Linear(256, 256) with tensor_parallel=2 on 2 devices: every op replicated."""
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = autopart.compile(model, 2, example_inputs=(torch.randn(8, 256),), tensor_parallel=2)
    assert any("no op is split" in str(w.message) for w in caught)
    text = compiled.report()
    assert "tensor parallel: tp=2 per stage, but no op is split" in text
    html = render_html(compiled.plan)
    assert '<p class="warn"><b>Warning:</b>' in html and "all in use" not in html
