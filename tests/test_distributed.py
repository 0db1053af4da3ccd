"""Plans train on real process groups (gloo, CPU) exactly as the single-device model.

Each case starts `torchrun` on tests/distributed/train_equivalence.py, which
trains 3 steps on the plan and on one device and asserts, on every rank, each
step's loss (rtol 1e-5 / atol 1e-5), the forward-only output, and on rank 0 the
gathered final weights (rtol 1e-5 / atol 4e-5).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.multiprocess

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "train_equivalence.py")
FAMILY_SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "family_step.py")


def _torch_before(major: int, minor: int) -> bool:
    import torch

    return tuple(int(x) for x in torch.__version__.split(".")[:2]) < (major, minor)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
              timeout: float = 240, script: str = SCRIPT) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
               f"--master_port={port or _free_port()}", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # its own process group, so every worker can be killed with it, even orphaned ones
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        out, _ = process.communicate(timeout=30)
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}")
    finally:
        _kill_group(process)  # no worker outlives its test
    return process.returncode, out


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.parametrize("nproc,args", [
    (2, ["--stages", "2", "--optimizer", "sgd"]),
    (2, ["--stages", "2", "--optimizer", "adam", "--schedule", "gpipe"]),
    (4, ["--stages", "4", "--microbatches", "4", "--optimizer", "sgd"]),
    (4, ["--stages", "2", "--dp", "2", "--optimizer", "sgd"]),
    (4, ["--stages", "2", "--dp", "2", "--optimizer", "adam"]),
    (2, ["--stages", "1", "--dp", "2", "--optimizer", "adam"]),
    (2, ["--stages", "1", "--tp", "2", "--optimizer", "sgd"]),
    (4, ["--stages", "2", "--tp", "2", "--optimizer", "adam"]),
    (2, ["--stages", "2", "--schedule", "interleaved_1f1b", "--virtual-stages", "2", "--microbatches", "4",
         "--optimizer", "adam"]),
    (2, ["--stages", "2", "--schedule", "zero_bubble", "--optimizer", "adam"]),
    (4, ["--stages", "2", "--tp", "2", "--schedule", "zero_bubble", "--virtual-stages", "2"]),
    (4, ["--stages", "2", "--dp", "2", "--schedule", "interleaved_1f1b", "--virtual-stages", "2",
         "--dp-mode", "fsdp", "--optimizer", "adam"]),
    (4, ["--stages", "2", "--dp", "2", "--schedule", "zero_bubble", "--virtual-stages", "2", "--dp-mode", "ddp"]),
    (2, ["--stages", "1", "--dp", "2", "--schedule", "gpipe", "--dp-mode", "ddp", "--optimizer", "adam"]),
    (2, ["--stages", "1", "--dp", "2", "--dp-mode", "fsdp", "--optimizer", "adam"]),
], ids=["pp2-sgd", "pp2-adam-gpipe", "pp4-sgd", "dp2xpp2-sgd", "dp2xpp2-adam", "dp2-adam", "tp2-sgd",
        "pp2xtp2-adam", "pp2v2-interleaved-adam", "pp2-zero-bubble-adam", "pp2v2xtp2-zero-bubble-sgd",
        "dp2-fsdp-x-pp2v2-interleaved-adam", "dp2-ddp-x-pp2v2-zero-bubble-sgd", "dp2-ddp-gpipe-adam",
        "dp2-fsdp-adam"])
def test_training_matches_single_device(nproc, args):
    code, out = _finish(_torchrun(nproc, *args))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == nproc, out[-4000:]


@pytest.mark.parametrize("nproc,args", [
    (2, ["--stages", "1", "--dp", "2", "--dp-mode", "zero3", "--optimizer", "adam"]),
    (4, ["--stages", "2", "--dp", "2", "--dp-mode", "zero3", "--optimizer", "adam"]),
    (4, ["--stages", "1", "--dp", "4", "--hosts", "2", "--dp-mode", "hsdp", "--optimizer", "adam"]),
    (4, ["--stages", "1", "--dp", "4", "--hosts", "2", "--dp-mode", "hsdp", "--microbatches", "1",
         "--recompute", "full", "--optimizer", "adam"]),
], ids=["dp2-zero3-adam", "dp2-zero3-x-pp2-adam", "dp4-hsdp-2-hosts-adam", "dp4-hsdp-recompute-full-adam"])
def test_full_sharding_matches_single_device(nproc, args):
    """ZeRO-3 (a FSDP2 unit per block, parameters resharded after forward) and HSDP (ZeRO-3 within
    each of 2 pretended hosts, replicated across them): 3 Adam steps equal one device's."""
    code, out = _finish(_torchrun(nproc, *args))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == nproc, out[-4000:]


@pytest.mark.parametrize("nproc,args", [
    (2, ["--stages", "2", "--recompute", "full", "--optimizer", "adam"]),
    (2, ["--stages", "2", "--schedule", "gpipe", "--recompute", "selective"]),
    (2, ["--stages", "2", "--schedule", "interleaved_1f1b", "--virtual-stages", "2", "--microbatches", "4",
         "--recompute", "selective", "--optimizer", "adam"]),
    (2, ["--stages", "2", "--schedule", "zero_bubble", "--recompute", "selective", "--optimizer", "adam"]),
    (2, ["--stages", "2", "--schedule", "zero_bubble", "--recompute", "full"]),
    (4, ["--stages", "2", "--tp", "2", "--recompute", "selective", "--optimizer", "adam"]),
    (4, ["--stages", "2", "--dp", "2", "--recompute", "full", "--optimizer", "adam"]),
    (2, ["--stages", "1", "--dp", "2", "--dp-mode", "zero3", "--recompute", "full", "--mixed-precision", "bf16"]),
    (2, ["--stages", "1", "--tp", "2", "--recompute", "full", "--mixed-precision", "bf16"]),
], ids=["pp2-full-adam", "pp2-gpipe-selective", "pp2v2-interleaved-selective-adam", "pp2-zero-bubble-selective-adam",
        "pp2-zero-bubble-full", "pp2xtp2-selective-adam", "dp2xpp2-full-adam", "dp2-zero3-full-bf16",
        "tp2-full-bf16"])
def test_recomputing_plans_train_like_one_device(nproc, args):
    """Recomputation on real process groups: every schedule (zero bubble's split backward replays a
    region twice), tp (the replay runs the tp collectives again), dp, and bf16 autocast."""
    code, out = _finish(_torchrun(nproc, *args))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == nproc, out[-4000:]


@pytest.mark.parametrize("family,schedule,virtual_stages", [
    ("gpt2", "interleaved_1f1b", 2), ("llama", "interleaved_1f1b", 2), ("t5", "interleaved_1f1b", 2),
    ("bert", "1f1b", 1), ("vit", "gpipe", 1), ("gpt2", "zero_bubble", 2), ("bert", "zero_bubble", 1),
])
def test_model_families_train_on_two_ranks(family, schedule, virtual_stages):
    """Real models through PipelineStage: integer ids, masks and skips crossing stages, views and
    strided tensors at boundaries, tied embeddings; one step's loss and every gradient."""
    if (family, schedule) == ("gpt2", "zero_bubble") and _torch_before(2, 13):
        pytest.skip("torch < 2.13's split backward cannot take GPT-2's integer tensors between stages "
                    "(the runner says so and names the fix)")
    code, out = _finish(_torchrun(2, "--family", family, "--schedule", schedule,
                                  "--virtual-stages", str(virtual_stages), script=FAMILY_SCRIPT))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == 2, out[-4000:]


@pytest.mark.parametrize("nproc,args", [
    (1, ["--stages", "1"]),
    (2, ["--stages", "2", "--schedule", "interleaved_1f1b", "--virtual-stages", "2", "--microbatches", "4"]),
    (2, ["--stages", "1", "--tp", "2"]),
    (2, ["--stages", "1", "--dp", "2", "--dp-mode", "fsdp"]),
], ids=["one-rank", "pp2v2-interleaved", "tp2", "dp2-fsdp"])
def test_mixed_precision_training_matches_eager_autocast(nproc, args):
    """bf16 autocast over float32 weights: 3 SGD steps against eager torch.autocast (tolerances in the script)."""
    code, out = _finish(_torchrun(nproc, *args, "--mixed-precision", "bf16"))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == nproc, out[-4000:]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rotary_families_train_in_mixed_precision(family):
    code, out = _finish(_torchrun(2, "--family", family, "--mixed-precision", "bf16", script=FAMILY_SCRIPT))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == 2, out[-4000:]


def test_zero_bubble_names_the_fix_where_pytorch_cannot_split_the_backward():
    """T5's graph breaks PyTorch's split weight pass; the rank says so and how to re-plan."""
    code, out = _finish(_torchrun(2, "--family", "t5", "--schedule", "zero_bubble", "--virtual-stages", "2",
                                  script=FAMILY_SCRIPT))
    assert code != 0
    assert "re-plan with schedule='interleaved_1f1b'" in out, out[-4000:]


@pytest.mark.parametrize("layout", [["--dp", "2"], ["--tp", "2"],
                                    ["--tp", "2", "--schedule", "interleaved_1f1b", "--virtual-stages", "2"]],
                         ids=["dp2xpp2", "pp2xtp2", "pp2v2xtp2-interleaved"])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, layout):
    code, out = _finish(_torchrun(4, "--stages", "2", *layout, "--checkpoint", str(tmp_path / "ckpt")))
    assert code == 0, out[-4000:]
    assert out.count("CHECKPOINT OK") == 4, out[-4000:]


def test_two_nodes_on_loopback():
    port = _free_port()
    nodes = [_torchrun(1, "--stages", "2", nnodes=2, node_rank=r, port=port) for r in range(2)]
    results = [_finish(node) for node in nodes]
    for code, out in results:
        assert code == 0, out[-4000:]
    assert sum(out.count("OK rank") for _, out in results) == 2


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_failed_rank_stops_the_others_in_bounded_time(mode):
    started = time.monotonic()
    code, out = _finish(_torchrun(2, "--stages", "2", "--fail-rank", "1", "--fail-mode", mode, "--timeout", "20"),
                        timeout=180)
    elapsed = time.monotonic() - started
    assert code != 0
    assert elapsed < 120, f"took {elapsed:.0f} s"
    if mode == "hang":  # the waiting rank gives up after timeout_s=20 and names itself
        assert "rank 0 (stage 0 of 2" in out and "timeout_s=20" in out, out[-3000:]
    else:  # the dead rank is reported, by our error on the peer or by torchrun
        assert "rank 0 (stage 0 of 2" in out or "rank: 1" in out or "exitcode  : 17" in out, out[-3000:]


MOE_SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "moe_equivalence.py")


@pytest.mark.parametrize("nproc,args", [
    (4, ["--ep", "2", "--dp", "4", "--dp-mode", "zero2"]),
    (4, ["--ep", "2", "--dp", "4", "--dp-mode", "zero3"]),
    (4, ["--ep", "2", "--dp", "2", "--stages", "2"]),
    (4, ["--ep", "2", "--dp", "4", "--dp-mode", "zero2", "--mixed-precision", "--optimizer", "sgd"]),
], ids=["ep2-of-dp4-zero2-adam", "ep2-of-dp4-zero3-adam", "ep2xdp2xpp2-adam", "ep2-of-dp4-zero2-bf16-sgd"])
def test_expert_parallel_training_matches_single_device(nproc, args):
    """HF Mixtral with its experts split over ep replicas (all-to-all dispatch on gloo, expert
    gradients summed over the replicas holding the same experts; under ZeRO-2/3 the expert blocks
    FSDP-sharded over those replicas, edp = 2): 3 Adam steps equal one device's. In bf16 mixed
    precision (FSDP gathers bf16 expert blocks; the grouped matmuls take bf16 operands) 3 SGD steps
    equal eager autocast with bf16 expert operands at bf16 tolerances (as the dense bf16 runs, SGD:
    Adam's normalised steps turn bf16 noise on near-zero gradients into full-size updates)."""
    pytest.importorskip("transformers")
    code, out = _finish(_torchrun(nproc, *args, script=MOE_SCRIPT))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == nproc, out[-4000:]
