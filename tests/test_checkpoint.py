"""Sharded checkpoints on real process groups (gloo, CPU, torchrun): resume, reshard, crash, bad input.

Each test runs tests/distributed/checkpoint_resume.py in several jobs, as a
training run that stops and restarts would; see that script for the checks.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from test_distributed import _finish, _torchrun

pytestmark = pytest.mark.multiprocess

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "checkpoint_resume.py")


def _job(nproc: int, phase: str, plan: str, directory, *args: str) -> str:
    code, out = _finish(_torchrun(nproc, "--phase", phase, "--plan", plan, "--dir", str(directory), *args,
                                  script=SCRIPT))
    assert code == 0, out[-4000:]
    assert out.count("CKPT OK rank") == nproc, out[-4000:]
    return out


def test_resume_is_bit_identical_with_dropout_and_async_save(tmp_path):
    """pp 2 × tp 2, dropout on (sharded and replicated masks), AdamW + StepLR: saved asynchronously at
    step 3 while training goes on; a new job loads it and steps 4-6 give the same float32 losses, bit
    for bit, as the uninterrupted run."""
    _job(4, "train", "pp2xtp2", tmp_path, "--dropout", "0.1", "--async-save")
    _job(4, "resume", "pp2xtp2", tmp_path, "--dropout", "0.1", "--losses-of", "pp2xtp2", "--exact")


def test_a_pp2_tp2_checkpoint_loads_under_zero3_one_rank_and_one_process(tmp_path):
    """Saved under pp 2 × tp 2 after 3 AdamW steps (its weights and moments checked against one device's
    training), loaded under dp 4 ZeRO-3 and under 1 rank: every parameter and optimizer moment equal to
    the checkpoint's by name, and steps 4-6 give the uninterrupted run's losses; ZeRO-3's re-save loads
    back into pp 2 × tp 2 and resumes bit for bit. Then in this process, into the plain model and a
    plain AdamW, without torch.distributed."""
    _job(4, "train", "pp2xtp2", tmp_path, "--check-reference")
    _job(4, "resume", "dp4-zero3", tmp_path, "--losses-of", "pp2xtp2", "--check-state")
    _job(1, "resume", "one", tmp_path, "--losses-of", "pp2xtp2", "--check-state")
    # and back: the ZeRO-3 run's re-save of step 3 resumes pp 2 × tp 2 bit for bit (no dropout here)
    _job(4, "resume", "pp2xtp2", tmp_path, "--from", "resaved-dp4-zero3", "--losses-of", "pp2xtp2", "--exact")

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import checkpoint_resume as script
    from autopart.runtime.checkpoint_offline import load_module, read_entries

    model = script.make_model(0.0)
    optimizer, scheduler = script.make_optimizer(model.parameters())
    path = str(tmp_path / "ckpts" / "step-3")
    extra = load_module(path, model, optimizer=optimizer)
    scheduler.load_state_dict(extra["scheduler"])
    saved = read_entries(path, "")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), saved[f"model/{name}"]), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[param][key], saved[f"optim/{key}/{name}"]), (key, name)
    batches, targets = script.data()
    losses = []
    for step in range(3, 6):
        optimizer.zero_grad()
        loss = script.loss_fn(model(batches[step]), targets[step])
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    expected = json.loads((tmp_path / "losses-pp2xtp2.json").read_text())[3:]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed while writing the step-4 save over the step-3 checkpoint: the job fails naming
    rank 1, and a new job finds the step-3 checkpoint whole and equal to what was saved."""
    code, out = _finish(_torchrun(4, "--phase", "crash", "--plan", "pp2xtp2", "--dir", str(tmp_path),
                                  script=SCRIPT))
    assert code != 0
    assert "rank      : 1" in out and "SIGKILL" in out, out[-3000:]
    ckpts = tmp_path / "ckpts"
    assert any(".partial-" in e for e in os.listdir(ckpts)), os.listdir(ckpts)  # the save was cut off
    _job(4, "verify-crash", "pp2xtp2", tmp_path)


def test_bad_checkpoints_are_refused_and_nothing_is_overwritten(tmp_path):
    """Another model's checkpoint (first mismatches listed), a truncated and a corrupt file (named),
    a directory without a checkpoint and a missing path; a save over a directory that is not a
    checkpoint is refused and leaves it as it was."""
    from autopart.runtime.checkpoint_offline import save_module
    from autopart.zoo import GPT

    torch.manual_seed(0)
    other = str(tmp_path / "other")
    save_module(other, GPT(3, 48, 4, 64, 8, attn_bias=False))
    _job(2, "bad-input", "pp2", tmp_path, "--other", other)


def test_hf_safetensors_load_into_a_plan_built_on_the_meta_device(tmp_path):
    """A model's weights exported as Hugging Face safetensors; a pp 2 × tp 2 plan of the model built on the
    meta device loads them with runner.load_hf, each rank reading exactly the bytes of its own slices,
    and computes what the model on one device computes."""
    from autopart import zoo
    from autopart.runtime.checkpoint_offline import export_hf, save_module

    torch.manual_seed(0)
    model = zoo.gpt(layers=4, d_model=64, heads=4, vocab=128, seq=8, batch=8, attn_bias=False).model
    save_module(str(tmp_path / "ckpt"), model)
    assert export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf")) == ["model.safetensors"]
    code, out = _finish(_torchrun(4, "--dir", str(tmp_path / "hf"),
                                  script=os.path.join(os.path.dirname(SCRIPT), "load_hf.py")))
    assert code == 0, out[-4000:]
    assert out.count("HF OK rank") == 4, out[-4000:]


def test_save_and_load_hold_at_most_one_piece_beyond_the_share(tmp_path):
    """2 ranks, 48 MB of weights and AdamW moments each, pieces of 4 MB: each rank's peak resident set
    during a save and a load exceeds the resident set before it (the share) by at most the largest
    piece plus 8 MB of margin (Python objects, the JSON index, allocator rounding), while torch.load
    of the same bytes takes a second copy of the share (asserted too, so the sampler is seen to work)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "checkpoint_io.py")
    code, out = _finish(_torchrun(2, "--layers", "4", "--width", "512", "--repeats", "1", "--check-margin-mb", "8",
                                  "--dir", str(tmp_path / "io"), script=script))
    assert code == 0, out[-4000:]
    assert out.count("MEMORY OK rank") == 2, out[-4000:]
