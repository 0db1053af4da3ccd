"""The `autopart` command line: `python -m autopart plan ...` end to end, and its error paths."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from autopart.cli.commands import build_parser, main
from autopart.core.plan import Plan


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autopart", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_plan_gpt2_writes_report_json_and_html(tmp_path) -> None:
    html_path, json_path = tmp_path / "report.html", tmp_path / "plan.json"
    done = _run("plan", "autopart.zoo:gpt2", "--devices", "4xH100", "--batch-size", "8", "--pipeline-parallel", "2",
                "--factory-arg", "layers=4", "--html", str(html_path), "--json", str(json_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("autopart plan: GPT2LMHeadModel on 4 × H100")
    assert "stage 1 · device 1 (H100)" in done.stdout and "candidates (" in done.stdout
    assert "tracing" in done.stderr and "[autopart" in done.stderr  # progress goes to stderr
    assert "Traceback" not in done.stderr
    plan = Plan.from_json(json_path.read_text(encoding="utf-8"))
    assert plan.batch_size == 8 and plan.num_stages == 2
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page


def test_bad_factory_exits_2_with_a_clear_message(capsys) -> None:
    assert main(["plan", "autopart.zoo:no_such_model", "--devices", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("autopart: error: autopart.zoo has no attribute 'no_such_model'")
    assert "gpt2" in captured.err  # names what is there
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


@pytest.mark.parametrize("target, message", [
    ("autopart.zoo", "is not MODULE:FACTORY"),
    ("no_such_package.models:make", "cannot import module 'no_such_package.models'"),
    ("missing/models.py:make", "no file 'missing/models.py'"),
])
def test_bad_targets(capsys, target: str, message: str) -> None:
    assert main(["plan", target, "--devices", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("autopart: error: ")


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--devices", "--batch-size", "--seq-len", "--input-shape", "--input-dtype", "--pipeline-parallel",
                   "--num-microbatches", "--schedule", "--optimizer", "--inference", "--html", "--json",
                   "--quiet", "--factory-arg", "examples:", "autopart.zoo:gpt2", "--recompute",
                   "--data-parallel-mode", "zero3", "hsdp", "--sequence-parallel", "--context-parallel"):
        assert option in out, option
    for action in build_parser()._subparsers._group_actions[0].choices["plan"]._actions:
        assert action.help, action.dest


@pytest.fixture
def models_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def bare():
            return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def tokens():
            return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))

        def with_inputs(batch_size=4):
            return bare(), (torch.randn(batch_size, 16),)

        def fixed_inputs():
            return bare(), torch.randn(4, 16), {}

        def broken():
            raise RuntimeError("no weights here")

        def not_a_model():
            return 42
    """))
    return path


def test_file_factory_with_input_shape(capsys, models_file, tmp_path) -> None:
    out_json = tmp_path / "p.json"
    code = main(["plan", f"{models_file}:bare", "--devices", "2", "--input-shape", "8,16", "--batch-size", "6",
                 "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "on 2 × CPU" in captured.out and "tracing" in captured.err
    assert Plan.from_json(out_json.read_text()).batch_size == 6


def test_recompute_and_zero3_from_the_command_line(capsys, models_file, tmp_path) -> None:
    out_json = tmp_path / "p.json"
    code = main(["plan", f"{models_file}:bare", "--devices", "2", "--input-shape", "8,16", "--batch-size", "8",
                 "--data-parallel", "2", "--data-parallel-mode", "zero3", "--recompute", "full", "--quiet",
                 "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = Plan.from_json(out_json.read_text())
    assert plan.data_parallel_mode == "zero3" and "full" in plan.stages[0].recompute
    assert "recompute:" in captured.out and "ZeRO-3" in captured.out


def test_context_parallel_from_the_command_line(capsys, tmp_path) -> None:
    out_json = tmp_path / "p.json"
    code = main(["plan", "autopart.zoo:llama", "--devices", "4xH100", "--batch-size", "2", "--factory-arg", "seq=64",
                 "--data-parallel", "4", "--context-parallel", "2", "--quiet", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert Plan.from_json(out_json.read_text()).mesh.cp == 2
    assert "cp=2 (each sequence over 2 replicas, the batch over 2 groups)" in captured.out


def test_file_factory_with_seq_len_and_batch_keyword(capsys, models_file) -> None:
    assert main(["plan", f"{models_file}:tokens", "--devices", "2", "--seq-len", "5", "-q"]) == 0
    assert "8 samples" in capsys.readouterr().out  # default batch when autopart builds the inputs
    assert main(["plan", f"{models_file}:with_inputs", "--devices", "2", "--batch-size", "6", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "6 samples" in captured.out and captured.err == ""


@pytest.mark.parametrize("factory, extra, message", [
    ("bare", [], "returned a bare nn.Module, so autopart must build its example inputs"),
    ("fixed_inputs", ["--batch-size", "8"], "returned inputs with batch size 4, not --batch-size 8"),
    ("fixed_inputs", ["--seq-len", "8"], "returns its own example inputs"),
    ("broken", [], "raised RuntimeError: no weights here"),
    ("not_a_model", [], "returned an object of type int; return an nn.Module"),
    ("bare", ["--input-shape", "8,x"], "--input-shape '8,x'"),
    ("bare", ["--input-shape", "8,16", "--optimizer", "lion"], "--optimizer lion"),
    ("bare", ["--input-shape", "8,16", "--num-microbatches", "3"], "does not divide the batch"),
    ("bare", ["--factory-arg", "oops"], "write NAME=VALUE"),
])
def test_factory_errors_exit_2(capsys, models_file, factory: str, extra: list[str], message: str) -> None:
    assert main(["plan", f"{models_file}:{factory}", "--devices", "2", "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_report_command_rerenders_a_saved_plan(capsys, models_file, tmp_path) -> None:
    plan_json, page = tmp_path / "plan.json", tmp_path / "again.html"
    assert main(["plan", f"{models_file}:with_inputs", "--devices", "2", "-q", "--json", str(plan_json)]) == 0
    first = capsys.readouterr().out
    assert main(["report", str(plan_json), "--html", str(page)]) == 0
    assert capsys.readouterr().out == first
    assert "<svg" in page.read_text()
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_check_proves_a_mixed_precision_plan_against_eager_autocast():
    result = _run("plan", "autopart.zoo:gpt2", "--devices", "4", "--pipeline-parallel", "2", "--tensor-parallel", "2",
                  "--mixed-precision", "bf16", "--check", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "against eager torch.autocast(bfloat16)" in result.stdout and "gradients of all" in result.stdout
    assert "bf16 mixed precision" in result.stdout  # the report says how the plan computes


def test_no_reuse_layers_traces_every_layer_up_front(capsys, tmp_path) -> None:
    out_json = tmp_path / "p.json"
    args = ["plan", "autopart.zoo:gpt2", "--factory-arg", "layers=6", "--devices", "2", "--pipeline-parallel", "2",
            "--quiet", "--json", str(out_json)]
    assert main(args) == 0
    assert not any(s.node_names for s in Plan.from_json(out_json.read_text()).stages)  # a stack analysed once
    assert main(args + ["--no-reuse-layers"]) == 0
    assert all(s.node_names for s in Plan.from_json(out_json.read_text()).stages)
    capsys.readouterr()


def test_check_proves_the_plan_on_the_cpu():
    result = _run("plan", "autopart.zoo:gpt2", "--devices", "4", "--pipeline-parallel", "2", "--tensor-parallel", "2",
                  "--check", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forward equal" in result.stdout and "gradients of all" in result.stdout
    assert "mesh:            dp=1 × pp=2 × tp=2" in result.stdout


def test_expert_parallel_from_the_command_line_and_in_the_html_report(capsys, tmp_path) -> None:
    pytest.importorskip("transformers")
    out_json, page = tmp_path / "p.json", tmp_path / "r.html"
    code = main(["plan", "autopart.zoo:mixtral", "--devices", "4", "--data-parallel", "4", "--expert-parallel", "2",
                 "--pipeline-parallel", "1", "--tensor-parallel", "1", "--quiet", "--json", str(out_json),
                 "--html", str(page)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = Plan.from_json(out_json.read_text())
    assert plan.mesh.ep == 2 and plan.experts.ep == 2 and plan.experts.per_rank == 2
    assert "split over ep=2 replicas: 2 experts per rank" in captured.out   # the text report's experts line
    cards = page.read_text().split("<details>")[0]   # the cards, before the embedded text report
    assert '<div class="k">experts</div><div class="v">ep=2</div>' in cards
    assert "2 expert layers" in cards and "split over ep=2 replicas: 2 experts per rank" in cards
    assert "(ep=2)" in cards   # the mesh card
    assert main(["plan", "autopart.zoo:mixtral", "--devices", "4", "--expert-parallel", "3", "--quiet"]) == 2
    assert "expert_parallel=3" in capsys.readouterr().err   # an ep that divides nothing names itself
