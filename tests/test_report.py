"""The partition report: text and HTML of real plans, synthetic edge cases, and the Plan's JSON form."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import warnings

import pytest

import autopart
from autopart import InputError, zoo
from autopart.cost_models import Cluster
from autopart.core.plan import PLAN_VERSION, Candidate, Mesh, Plan, SolverInfo, StageMemory, StagePlan
from autopart.report.html import render_html
from autopart.report.svg import memory_svg
from autopart.report.summary import abbreviate_blocks, schedule_grid
from autopart.report.text import render_text
from autopart.report.timing import makespan, predicted_timeline
from autopart.core.units import fmt_bytes, fmt_count, fmt_flops, fmt_percent, fmt_ranges, fmt_seconds


@pytest.fixture(scope="module")
def gpt2_free() -> Plan:
    """Tiny GPT-2 on 4 H100s, every choice left to the planner (it picks one stage)."""
    example = zoo.gpt2(layers=4)
    return autopart.compile(example.model, "4xH100", example_inputs=example.args).plan


@pytest.fixture(scope="module")
def gpt2_pipeline() -> Plan:
    """The same model cut into 4 stages with 4 microbatches, 1F1B."""
    example = zoo.gpt2(layers=4, batch=8)
    return autopart.compile(example.model, "4xH100", example_inputs=example.args, pipeline_parallel=4,
                            num_microbatches=4, schedule="1f1b").plan


@pytest.fixture(scope="module")
def gpt2_interleaved() -> Plan:
    """GPT-2 on 2 ranks × 2 virtual stages, interleaved 1F1B."""
    example = zoo.gpt2(layers=4, batch=8)
    return autopart.compile(example.model, "2xH100", example_inputs=example.args, pipeline_parallel=2,
                            num_microbatches=4, schedule="interleaved_1f1b", virtual_stages=2).plan


@pytest.fixture(scope="module")
def mlp_plan() -> Plan:
    """An MLP on 2 CPU devices, 2 stages."""
    example = zoo.mlp(depth=6, batch=16)
    return autopart.compile(example.model, 2, example_inputs=example.args, pipeline_parallel=2).plan


@pytest.fixture(scope="module")
def gpt_dp4_tp2() -> Plan:
    """A GPT on 8 H100s as 4 data-parallel replicas of a tensor-parallel pair: every device in use."""
    example = zoo.gpt(layers=2)
    return autopart.compile(example.model, "8xH100", example_inputs=example.args, data_parallel=4,
                            tensor_parallel=2).plan


def synthetic_plan(num_stages: int = 8, num_microbatches: int = 64, blocks_per_stage: int = 10,
                   schedule: str = "1f1b", training: bool = True, idle: int = 0) -> Plan:
    """A plan built by hand: equal stages, many blocks, hostile names."""
    cluster = Cluster.parse(f"{num_stages + idle}xH100")
    stages = []
    for s in range(num_stages):
        blocks = tuple(f"model.layers.{s * blocks_per_stage + k}" for k in range(blocks_per_stage))
        if s == 0:
            blocks = ("<script>alert('x')</script>", *blocks)
        stages.append(StagePlan(
            index=s, device=s, device_name="H100", blocks=blocks, node_names=tuple(f"n{s}_{b}" for b in blocks),
            fwd_seconds=1e-3, bwd_seconds=2e-3 if training else 0.0, comm_seconds=1e-4 if num_stages > 1 else 0.0,
            fwd_flops=10**12, bwd_flops=2 * 10**12 if training else 0, num_params=10**8, send_bytes=2**24,
            memory=StageMemory(params=4 * 10**8, grads=4 * 10**8, optimizer=8 * 10**8, buffers=2**20,
                               activations=30 * 2**30, boundary=2**26, capacity=80 * 10**9)))
    slot = 3.1e-3 if training else 1.1e-3
    step = (num_microbatches + num_stages - 1) * slot
    return Plan(
        model_class="my.models.Net&Co", batch_size=num_microbatches, num_microbatches=num_microbatches,
        schedule=schedule, optimizer="adam", mesh=Mesh(pp=num_stages), cluster=cluster.to_dict(),
        stages=tuple(stages), predicted_step_seconds=step,
        bubble_fraction=(num_stages - 1) / (num_microbatches + num_stages - 1),
        idle_devices=tuple(range(num_stages, num_stages + idle)),
        solver=SolverInfo(backend="cpsat", status="OPTIMAL", objective_seconds=step, bound_seconds=step,
                          solve_seconds=0.01, plan_seconds=0.05, num_problems=3),
        candidates=(
            Candidate(data_parallel=1, pipeline_parallel=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                      step_seconds=step, status="chosen", detail="slowest stage 0 <b>"),
            Candidate(data_parallel=1, pipeline_parallel=num_stages + 1, num_microbatches=num_microbatches, schedule=schedule,
                      step_seconds=step * 1.12, status="feasible", detail="slowest stage 3"),
            Candidate(data_parallel=1, pipeline_parallel=max(1, num_stages - 1), num_microbatches=num_microbatches, schedule=schedule,
                      step_seconds=None, status="infeasible", detail="stage 0 short by 3.1 GiB"),
        ),
    )


# ----------------------------------------------------------------------------- text

def test_text_report_has_every_part(gpt2_pipeline: Plan) -> None:
    text = render_text(gpt2_pipeline)
    assert text.startswith("autopart plan: GPT2LMHeadModel on 4 × H100")
    assert "dp=1 × pp=4 × tp=1" in text and "devices 0-3 (H100)" in text
    for stage in gpt2_pipeline.stages:
        assert f"stage {stage.index} · device {stage.device} (H100)" in text
    assert "transformer.h.0" in text and "lm_head" in text
    for label in ("layers:", "parameters:", "FLOPs:", "time:", "sends:", "memory:"):
        assert text.count(label) >= 4, label
    for kind in ("params", "grads", "optimizer", "buffers", "activations", "boundary"):
        assert kind in text
    assert re.search(r"of 74\.5 GiB \(", text)
    assert re.search(r"fwd [\d.]+ [µm]s \+ bwd [\d.]+ [µm]s \+ comm", text)
    assert "MFLOP" in text and "KiB" in text
    assert "schedule: 1f1b, 4 microbatches, bubble 43%" in text
    assert "rank 3:" in text and "F3" in text and "B3" in text
    assert "step time:" in text and "predicted" in text
    solver = gpt2_pipeline.solver
    assert f"{solver.backend} {solver.status}: objective" in text and "bound" in text and "ILP" in text
    assert "tensor parallel: none (tp=1)" in text
    table = text.split("candidates (")[1].split("\n\n")[0]
    assert len(table.splitlines()) == len(gpt2_pipeline.candidates) + 2
    assert re.search(r"^\s+\*\s+1\s+4\s+1\s+4\s", table, re.M)  # dp pp tp m of the chosen row


def test_memory_chart_draws_replicas_and_tp_peers_as_used(gpt_dp4_tp2: Plan) -> None:
    """dp = 4 × tp = 2 on 8 devices: one row for the stage's 8 devices, none drawn unused (the header
    says 0 idle); the text report's mesh line names all 8."""
    plan = gpt_dp4_tp2
    assert (plan.mesh.dp, plan.mesh.pp, plan.mesh.tp) == (4, 1, 2) and plan.idle_devices == ()
    svg = memory_svg(plan)
    assert "unused" not in svg and "idle ·" not in svg
    assert ">rank 0 · devices 0-7<" in svg and ">stage 0 · H100<" in svg and " each (&lt;0.01%)" in svg
    assert "(8 of 8 devices) on devices 0-7 (H100)" in render_text(plan)
    page = render_html(plan)
    assert "unused" not in page and re.search(r"idle devices.*?>0<", page, re.S)


def test_memory_chart_rows_name_every_device_of_a_stage() -> None:
    """pp = 2 × dp = 2: stage 0 runs on devices 0 and 2, stage 1 on 1 and 3."""
    plan = synthetic_plan(num_stages=2, num_microbatches=4)
    plan = dataclasses.replace(plan, mesh=Mesh(pp=2, dp=2), cluster=Cluster.parse("4xH100").to_dict())
    svg = memory_svg(plan)
    assert ">rank 0 · devices 0, 2<" in svg and ">rank 1 · devices 1, 3<" in svg and "unused" not in svg


def test_text_report_lists_the_fastest_candidates_and_counts_the_rest() -> None:
    """Hundreds of candidates (the README demo tries 358): the text lists the chosen and the fastest
    feasible ones and counts the rest by status; the HTML keeps every one."""
    base = synthetic_plan(num_stages=2, num_microbatches=8)
    tried = [dataclasses.replace(base.candidates[0], num_microbatches=1)]  # the chosen one
    tried += [dataclasses.replace(base.candidates[1], num_microbatches=m, step_seconds=1.0 + m / 100)
              for m in range(30, 0, -1)]  # feasible, slower the more microbatches
    tried += [dataclasses.replace(base.candidates[2], num_microbatches=m) for m in range(1, 6)]  # infeasible
    tried += [dataclasses.replace(base.candidates[1], num_microbatches=m, step_seconds=None, status="pruned",
                                  detail="lower bound") for m in range(1, 21)]
    plan = dataclasses.replace(base, candidates=tuple(tried))
    text = render_text(plan)
    table = text.split("candidates (")[1].split("\n\n")[0]
    lines = table.splitlines()
    assert lines[0] == "56 tried; * chosen; the fastest 8 shown)"
    assert len(lines) == 1 + 1 + 8 + 1
    assert re.match(r"^\s+\*\s+1\s", lines[2])
    shown_m = [int(line.split()[3]) for line in lines[3:10]]
    assert shown_m == [1, 2, 3, 4, 5, 6, 7]  # the fastest feasible, fastest first
    assert lines[-1].strip() == ("… and 48 more (23 feasible, 20 pruned, 5 infeasible); "
                                 "the HTML report and the plan's JSON list every candidate")
    page = render_html(plan)
    assert sum(page.count(f'<tr class="{status}">') for status in ("chosen", "feasible", "infeasible",
                                                                   "pruned")) == 56


def test_reports_of_an_interleaved_plan(gpt2_interleaved: Plan) -> None:
    """Stages 0 and 2 on rank 0, 1 and 3 on rank 1; the grid names stages; bubble (R-1)/(m·v+R-1)."""
    plan = gpt2_interleaved
    assert plan.num_stages == 4 and plan.mesh.pp == 2 and [s.device for s in plan.stages] == [0, 1, 0, 1]
    assert plan.bubble_fraction == pytest.approx(1 / 9)
    text = render_text(plan)
    assert "schedule: interleaved_1f1b, 4 microbatches, bubble 11%" in text and "2 stages per rank" in text
    assert "dp=1 × pp=2 (2 stages each) × tp=1" in text
    grid_rows = [line for line in text.splitlines() if line.strip().startswith("rank ")]
    assert "F0s0" in grid_rows[0] and "F0s2" in grid_rows[0] and "F0s3" in grid_rows[1]
    html = render_html(plan)
    assert html.count("stage 2 on rank 0") >= 4  # tooltips of its F and B boxes
    assert "1/2 of the device" in html


def test_text_report_explains_the_stage_count_and_idle_devices(gpt2_free: Plan) -> None:
    text = render_text(gpt2_free)
    # counts name pipeline ranks: some candidates run several (virtual) stages per rank
    assert any(c.virtual_stages > 1 for c in gpt2_free.candidates)
    why = text.split(f"why {gpt2_free.mesh.pp} pipeline rank")[1]
    tried = {c.pipeline_parallel for c in gpt2_free.candidates} - {gpt2_free.mesh.pp}
    assert tried, "the planner should have tried several stage counts"
    for count in tried:
        assert re.search(rf"^  {count} pipeline ranks?: ", why, re.M)
    if gpt2_free.idle_devices:  # the tiny model usually runs fastest on fewer devices than it has
        assert "idle" in why and "data-parallel replica" in why
    assert re.search(r"^  \*\s+\d", text, re.M)


def test_text_report_of_a_cpu_mlp(mlp_plan: Plan) -> None:
    text = render_text(mlp_plan)
    assert "on 2 × CPU" in text
    assert "stage 1 · device 1 (CPU)" in text
    assert "nothing (last stage)" in text


def test_text_report_of_a_long_schedule_is_truncated() -> None:
    plan = synthetic_plan(num_stages=8, num_microbatches=64)
    text = render_text(plan)
    grid_lines = [line for line in text.splitlines() if line.strip().startswith("rank ")]
    assert len(grid_lines) == 8
    assert all("…" in line and len(line) < 160 for line in grid_lines)
    assert "slots not shown" in text
    assert "model.layers.0 … model.layers.9" in text
    assert "7 stages: infeasible: stage 0 short by 3.1 GiB" in text
    assert "9 stages: +12% step time (bubble" in text


def test_short_schedule_grid_is_whole(gpt2_pipeline: Plan) -> None:
    assert "…" not in schedule_grid(gpt2_pipeline)


def test_inference_plan_report() -> None:
    plan = synthetic_plan(num_stages=3, num_microbatches=4, training=False, idle=2)
    text = render_text(plan)
    assert "inference (forward only)" in text
    assert "B0" not in text.split("schedule:")[1].split("solver")[0]
    assert "2 devices (3-4) idle" in text
    assert "<svg" in render_html(plan)


def test_units() -> None:
    assert fmt_bytes(0) == "0 B" and fmt_bytes(1536) == "1.50 KiB" and fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert fmt_seconds(0.000839) == "839 µs" and fmt_seconds(0.0123) == "12.3 ms" and fmt_seconds(2.5) == "2.50 s"
    assert fmt_seconds(1e-15) == "0 s" and fmt_seconds(0.0009999) == "1.00 ms"
    assert fmt_flops(28311552) == "28.3 MFLOP" and fmt_flops(1.2e13) == "12.0 TFLOP"
    assert fmt_count(236928) == "237 K" and fmt_count(1.34e9) == "1.34 B" and fmt_count(12) == "12"
    assert fmt_percent(0.4567) == "46%" and fmt_percent(1e-7) == "<0.01%" and fmt_percent(0) == "0%"
    assert fmt_ranges([1, 2, 3, 5]) == "1-3, 5"


def test_abbreviate_blocks() -> None:
    six = [f"transformer.h.{i}" for i in range(6)]
    assert abbreviate_blocks(six) == "transformer.h.0 … transformer.h.5 (6 blocks)"
    assert abbreviate_blocks(["a", "b"]) == "a, b"
    many = [f"x{i}.y" for i in range(20)]
    assert abbreviate_blocks(many) == "x0.y … x19.y (20 blocks)"


# ----------------------------------------------------------------------------- timing

@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_played_step_of_equal_stages_is_the_planner_formula(schedule: str) -> None:
    plan = synthetic_plan(num_stages=4, num_microbatches=6, schedule=schedule)
    actions = predicted_timeline(plan)
    assert len(actions) == 2 * 4 * 6
    assert makespan(actions) == pytest.approx(plan.predicted_step_seconds, rel=1e-9)
    for rank in range(4):  # a rank never runs two actions at once
        mine = sorted((a for a in actions if a.rank == rank), key=lambda a: a.start)
        assert all(x.end <= y.start + 1e-15 for x, y in zip(mine, mine[1:]))


def test_played_step_respects_dependencies(gpt2_pipeline: Plan) -> None:
    actions = {(a.kind, a.rank, a.microbatch): a for a in predicted_timeline(gpt2_pipeline)}
    for (kind, s, i), a in actions.items():
        if kind == "F" and s > 0:
            assert a.start >= actions[("F", s - 1, i)].end
        if kind == "B":
            assert a.start >= actions[("F", s, i)].end
            if s + 1 < gpt2_pipeline.num_stages:
                assert a.start >= actions[("B", s + 1, i)].end


# ----------------------------------------------------------------------------- html

def _check_html(plan: Plan) -> str:
    page = render_html(plan)
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1
    assert page.count("<svg") >= 3
    without_xmlns = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_xmlns and "https://" not in without_xmlns
    assert "<link" not in page and "<script" not in page and "@import" not in page
    for stage in plan.stages:
        assert f"stage {stage.index}" in page
        for block in stage.blocks:
            assert html.escape(block) in page
    return page


def test_html_of_real_plans(gpt2_pipeline: Plan, gpt2_free: Plan, mlp_plan: Plan) -> None:
    for plan in (gpt2_pipeline, gpt2_free, mlp_plan):
        page = _check_html(plan)
        assert "F3" in page or plan.num_microbatches < 4
        assert "tensor parallel" in page and "none (tp=1)" in page
        assert "capacity" in page and "Candidates" in page


def test_html_escapes_plan_strings() -> None:
    page = _check_html(synthetic_plan(num_stages=8, num_microbatches=64))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Net&amp;Co" in page and "slowest stage 0 &lt;b&gt;" in page


def test_compiled_model_writes_the_html(tmp_path, mlp_plan: Plan) -> None:
    example = zoo.mlp()
    compiled = autopart.compile(example.model, 2, example_inputs=example.args)
    path = tmp_path / "report.html"
    compiled.save_html(str(path))
    assert "<svg" in path.read_text(encoding="utf-8")
    assert compiled.report() == render_text(compiled.plan)


# ----------------------------------------------------------------------------- JSON

def test_json_round_trip(gpt2_pipeline: Plan, mlp_plan: Plan, gpt2_interleaved: Plan) -> None:
    for plan in (gpt2_pipeline, mlp_plan, gpt2_interleaved, synthetic_plan()):
        again = Plan.from_json(plan.to_json())
        assert again == plan
        assert render_text(again) == render_text(plan)
    # a version-1 plan written before virtual stages and dp modes existed reads with their defaults
    data = json.loads(gpt2_pipeline.to_json())
    data["version"] = 1
    for key in ("virtual_stages", "data_parallel_mode"):
        del data[key]
        for candidate in data["candidates"]:
            del candidate[key]
    for candidate in data["candidates"]:  # version 1 named a candidate's pipeline ranks num_stages
        candidate["num_stages"] = candidate.pop("pipeline_parallel")
    old = Plan.from_json(json.dumps(data))
    assert old.virtual_stages == 1 and old.data_parallel_mode == "ddp"


def test_json_version_1_reads_a_candidates_num_stages_as_its_pipeline_ranks(gpt2_interleaved: Plan) -> None:
    """Version 2 renamed Candidate.num_stages (pipeline ranks) to pipeline_parallel: Plan.num_stages
    counts model stages (ranks × virtual stages), and nothing else is called num_stages."""
    data = json.loads(gpt2_interleaved.to_json())
    assert data["version"] == PLAN_VERSION and all("num_stages" not in c for c in data["candidates"])
    data["version"] = 1
    for candidate in data["candidates"]:
        candidate["num_stages"] = candidate.pop("pipeline_parallel")
    old = Plan.from_json(json.dumps(data))
    assert old == gpt2_interleaved
    assert old.num_stages == 4 and {c.pipeline_parallel for c in old.candidates} == {2}


def test_json_unknown_version_is_an_input_error(mlp_plan: Plan) -> None:
    data = json.loads(mlp_plan.to_json())
    data["version"] = 99
    with pytest.raises(InputError, match=r"version 99 is not supported.*re-plan"):
        Plan.from_json(json.dumps(data))


def test_json_malformed_is_an_input_error(mlp_plan: Plan) -> None:
    with pytest.raises(InputError, match="not JSON"):
        Plan.from_json("{not json")
    with pytest.raises(InputError, match="expected a JSON object"):
        Plan.from_json("[1, 2]")
    data = json.loads(mlp_plan.to_json())
    del data["stages"][0]["memory"]
    with pytest.raises(InputError, match=r"malformed plan.*memory"):
        Plan.from_json(json.dumps(data))


def test_html_report_says_a_plan_replicates_its_experts(gpt2_free: Plan) -> None:
    """Under tensor parallelism the experts stay whole on every rank: the card says so, not just the text."""
    pytest.importorskip("transformers")
    entry = zoo.mixtral()
    with warnings.catch_warnings():   # this tiny model's tp group may split nothing, and is told so
        warnings.simplefilter("ignore", UserWarning)
        plan = autopart.compile(entry.model, 2, example_inputs=entry.args, tensor_parallel=2, pipeline_parallel=1,
                                data_parallel=1).plan
    cards = render_html(plan).split("<details>")[0]
    assert '<div class="k">experts</div><div class="v">replicated</div>' in cards
    assert "2 expert layers" in cards
    assert "replicated: every rank holds all experts (tensor parallelism leaves them whole)" in cards
    assert '<div class="k">experts</div>' not in render_html(gpt2_free)   # no card for a model without experts
