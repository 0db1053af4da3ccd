"""benchmarks/gpu_compare.py: the tiny CPU comparison end to end (gloo), and its bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "gpu_compare.py")
sys.path.insert(0, BENCHMARKS)

import gpu_compare  # noqa: E402
import peers  # noqa: E402


@pytest.mark.multiprocess
@pytest.mark.slow
def test_tiny_cpu_comparison_writes_matching_losses(tmp_path):
    """One device, 1F1B over two ranks and autopart's plan: each runs, and its step-0 loss is one device's."""
    out = tmp_path / "result.json"
    command = [sys.executable, SCRIPT, "--model", "tiny", "--nproc", "2", "--modes", "single,pp_1f1b,autopart",
               "--device", "cpu", "--steps", "1", "--warmup", "1", "--timeout", "120", "--out", str(out), "--strict"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "autopart / best peer" in done.stdout and "predicted/measured step" in done.stdout, done.stdout
    result = json.loads(out.read_text())
    assert result["model"]["name"] == "tiny" and result["nproc"] == 2
    assert list(result["modes"]) == ["single", "pp_1f1b", "autopart"]
    for name, mode in result["modes"].items():
        assert mode["status"] == "ok", (name, mode.get("output_tail"))
        assert mode["tokens_per_second"] > 0 and mode["vs_single"] > 0
        assert mode["loss0_ok"] and mode["loss0_rel_diff"] <= 1e-4, (name, mode["loss0_rel_diff"])
        assert mode["peak_memory_bytes"] == [None] * mode["nproc"]  # not measured on the CPU
    assert result["modes"]["pp_1f1b"]["mesh"] == {"dp": 1, "pp": 2, "tp": 1}
    assert result["modes"]["pp_1f1b"]["info"]["microbatches"] == 8
    ours = result["modes"]["autopart"]
    assert ours["info"]["predicted_step_seconds"] > 0 and ours["info"]["cluster_source"]
    assert result["summary"]["predicted_over_measured_step"] > 0
    assert result["summary"]["best_peer"] in ("single", "pp_1f1b")


def _rank(rank, status="ok", error=None, at=0.0, losses=(1.0,), seconds=(0.5,), peak=None):
    return {"rank": rank, "status": status, "error": error, "written_at": at, "losses": list(losses),
            "step_seconds": list(seconds), "peak_bytes": peak, "mesh": {"dp": 2, "pp": 1, "tp": 1}, "info": {}}


def test_a_mode_out_of_memory_on_one_rank_is_oom():
    mode = next(m for m in peers.plain_modes(2) if m.name == "ddp")
    ranks = [_rank(0, "failed", "DistBackendError: peer closed", at=2.0), _rank(1, "OOM", "OutOfMemoryError", at=3.0)]
    assert gpu_compare.summarise(mode, ranks, 1, "", 60)["status"] == "OOM"


def test_the_first_rank_to_fail_names_the_failure():
    mode = next(m for m in peers.plain_modes(2) if m.name == "tp")
    ranks = [_rank(0, "failed", "RuntimeError: connection reset", at=5.0), _rank(1, "failed", "ValueError: bad", at=4.0)]
    assert gpu_compare.summarise(mode, ranks, 1, "", 60)["status"] == "failed: ValueError: bad"
    assert gpu_compare.summarise(mode, [], None, "", 60)["status"] == "failed: timed out after 60 s"


def test_compare_takes_the_slowest_rank_and_the_mean_loss_of_the_ranks_that_have_one():
    preset = peers.PRESETS["tiny"]
    modes = {m.name: m for m in peers.plain_modes(2)}
    records = {
        "single": gpu_compare.summarise(modes["single"], [_rank(0, losses=(2.0,), seconds=(1.0,))], 0, "", 60),
        "pp_1f1b": gpu_compare.summarise(modes["pp_1f1b"], [_rank(0, losses=(None,), seconds=(0.4,)),
                                                             _rank(1, losses=(2.0001,), seconds=(0.5,))], 0, "", 60),
        "ddp": gpu_compare.summarise(modes["ddp"], [_rank(0, losses=(1.0,)), _rank(1, losses=(3.0,))], 0, "", 60),
    }
    summary = gpu_compare.compare(records, preset)
    assert records["pp_1f1b"]["vs_single"] == pytest.approx(2.0)  # 0.5 s (slowest rank) against 1.0 s
    assert records["pp_1f1b"]["loss0_rel_diff"] == pytest.approx(5e-5) and records["pp_1f1b"]["loss0_ok"]
    assert records["ddp"]["loss0"] == 2.0 and records["ddp"]["loss0_ok"]
    assert summary["best_peer"] in ("pp_1f1b", "ddp") and "autopart_vs_best_peer" not in summary
    assert "pp_1f1b" in gpu_compare.table(records, summary)


def test_every_stage_and_autopart_start_from_the_weights_of_the_whole_model():
    preset = peers.PRESETS["tiny"]
    whole = dict(peers.materialise(peers.build_gpt(preset), torch.device("cpu"), seed=3).named_parameters())
    assert not torch.equal(whole["lm_head.weight"], whole["wte.weight"])  # untied
    split = [peers.stage_blocks(preset.layers, 3, r) for r in range(3)]
    assert [list(r) for r in split] == [[0, 1], [2], [3]]
    for r, blocks in enumerate(split):
        stage = peers.GPTStage(peers.build_gpt(preset), blocks, first=r == 0, last=r == 2)
        for name, param in peers.materialise(stage, torch.device("cpu"), seed=3).named_parameters():
            assert torch.equal(param, whole[name]), name
    lazy = peers.InitialState({n: p.shape for n, p in whole.items()}, torch.device("cpu"), seed=3)
    assert "blocks.3.mlp_fc.weight" in lazy and "nothing" not in lazy
    assert torch.equal(lazy["blocks.3.mlp_fc.weight"], whole["blocks.3.mlp_fc.weight"])


def test_the_mode_list_grows_with_the_devices():
    assert [m.name for m in gpu_compare.all_modes(1)] == ["single", "autopart"]
    two = {m.name: m.nproc for m in gpu_compare.all_modes(2)}
    assert two == {"single": 1, "ddp": 2, "fsdp2": 2, "pp_gpipe": 2, "pp_1f1b": 2, "tp": 2, "autopart": 2}
    four = [m.name for m in gpu_compare.all_modes(4)]
    assert {"pp2_tp2", "dp2_pp2", "fsdp2_tp2"} <= set(four) and four[-1] == "autopart"
