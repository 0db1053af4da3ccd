"""The checkpoint format in one process: boxes of tp slices, safetensors files, the commit, bad input, HF."""

from __future__ import annotations

import json
import os

import pytest
import torch

from autopart.core.errors import AutopartError, InputError
from autopart.core.interfaces import ParamSlice
from autopart.runtime import safetensors_file
from autopart.runtime.checkpoint_layout import boxes_of, tiles
from autopart.runtime.checkpoint_offline import export_hf, load_module, read_entries, save_module
from autopart.runtime.checkpoint_store import prune, wait_for_markers
from autopart.runtime.safetensors_file import SafetensorsFile, write_file


@pytest.mark.parametrize("dim,groups,tp", [(0, 1, 2), (0, 3, 2), (1, 1, 4), (1, 2, 2), (0, 3, 4)])
def test_boxes_of_a_tp_slice_are_where_its_elements_came_from(dim, groups, tp):
    """Every element of every rank's slice (take_shard's interleaved chunks) sits in its box at the
    position it had in the whole tensor, and the ranks' boxes tile the whole tensor."""
    whole = torch.arange(24 * 8, dtype=torch.float32).view(24, 8)
    all_boxes = []
    for rank in range(tp):
        piece = ParamSlice(name="w", dim=dim, groups=groups, index=rank, tp=tp)
        local = piece.take(whole)
        full, boxes = boxes_of(local, piece)
        assert full == tuple(whole.shape)
        assert len(boxes) == groups
        for box in boxes:
            region = whole[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))]
            assert torch.equal(box.local_view(local), region)
            all_boxes.append((box.offsets, box.sizes))
    assert tiles(tuple(whole.shape), all_boxes)
    assert not tiles(tuple(whole.shape), all_boxes[1:])


def test_files_are_safetensors_and_read_by_rows(tmp_path):
    load_file = pytest.importorskip("safetensors.torch").load_file

    tensors = {"a": torch.randn(5, 3), "b": torch.randn(4, 2).to(torch.bfloat16), "step": torch.tensor(3.0),
               "ids": torch.arange(7), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "x.safetensors")
    write_file(path, tensors.items(), {"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key
    with SafetensorsFile(path) as file:
        assert torch.equal(file.read_rows("a", 1, 4), tensors["a"][1:4])
        assert torch.equal(file.read("step"), tensors["step"])


def test_a_truncated_or_corrupt_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_file, "CRC_BLOCK_BYTES", 64)  # several blocks per tensor
    tensor = torch.randn(64, 4)
    path = str(tmp_path / "rank00001.safetensors")
    crcs = write_file(path, [("w", tensor)])["w"]
    assert len(crcs) == tensor.numel() * 4 // 64
    with open(path, "r+b") as f:  # flip a byte in row 40
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header + 40 * 16)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with SafetensorsFile(path) as file:
        assert torch.equal(file.read_rows("w", 0, 8, crcs), tensor[:8])  # blocks before it verify
        with pytest.raises(InputError, match="rank00001.safetensors is corrupt"):
            file.read_rows("w", 38, 42, crcs)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(InputError, match="rank00001.safetensors is truncated"):
        SafetensorsFile(path)


def _trained(steps: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def test_a_plain_model_resumes_bit_for_bit(tmp_path):
    model, optimizer = _trained()
    path = str(tmp_path / "ckpt")
    save_module(path, model, optimizer=optimizer, step=2,
                extra={"sched": {"last_epoch": 2}, "t": torch.arange(3), "pair": (1, "a"), "none": None})
    fresh, fresh_optimizer = _trained(0)
    extra = load_module(path, fresh, optimizer=fresh_optimizer)
    assert extra["sched"] == {"last_epoch": 2} and extra["pair"] == (1, "a") and extra["none"] is None
    assert torch.equal(extra["t"], torch.arange(3))
    x = torch.randn(4, 6)
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    assert set(read_entries(path, "optim/")) == {f"{k}/{n}" for n, _ in model.named_parameters()
                                                 for k in ("step", "exp_avg", "exp_avg_sq")}


def test_bad_paths_and_models_are_refused_and_nothing_is_replaced(tmp_path):
    model, optimizer = _trained()
    with pytest.raises(InputError, match="does not exist"):
        load_module(str(tmp_path / "nowhere"), model)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no autopart checkpoint"):
        load_module(str(tmp_path / "notes"), model)
    with pytest.raises(InputError, match="not an autopart checkpoint"):
        save_module(str(tmp_path / "notes"), model)
    assert os.listdir(tmp_path / "notes") == ["a.txt"]
    path = str(tmp_path / "ckpt")
    save_module(path, model)
    other = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.GELU(), torch.nn.Linear(9, 3), torch.nn.Linear(3, 3))
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(InputError, match=r"missing \['3.bias', '3.weight'\].*shapes differ.*0.weight"):
        load_module(path, other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    with pytest.raises(InputError, match="holds no optimizer state"):
        load_module(path, model, optimizer=optimizer)


def test_keep_prunes_the_oldest_checkpoints_of_the_model(tmp_path):
    model, _ = _trained(0)
    for n in range(4):
        save_module(str(tmp_path / f"step-{n}"), model, step=n)
    (tmp_path / "unrelated").mkdir()
    removed = prune(str(tmp_path / "step-3"), 2, json.loads((tmp_path / "step-3" / "autopart_checkpoint.json")
                                                             .read_text())["model_class"])
    assert sorted(os.path.basename(p) for p in removed) == ["step-0", "step-1"]
    assert sorted(os.listdir(tmp_path)) == ["step-2", "step-3", "unrelated"]


def test_waiting_for_ranks_names_those_that_never_finished(tmp_path):
    (tmp_path / "rank00000.json").write_text("{}")
    (tmp_path / "rank00001.safetensors").write_bytes(b"\0" * 64)  # killed after 64 bytes
    with pytest.raises(AutopartError, match=r"rank\(s\) \[1, 2\] did not finish writing \(no progress"):
        wait_for_markers(str(tmp_path), 3, timeout_s=0.1)


def test_a_rank_whose_file_grows_is_waited_for(tmp_path):
    import threading
    import time

    (tmp_path / "rank00000.json").write_text("{}")

    def slow_rank() -> None:  # writes for 3 s, three times the timeout, then its marker
        with open(tmp_path / "rank00001.safetensors", "wb") as f:
            for _ in range(30):
                f.write(b"\0" * 1000)
                f.flush()
                time.sleep(0.1)
        (tmp_path / "rank00001.json").write_text('{"rank": 1}')

    thread = threading.Thread(target=slow_rank)
    thread.start()
    markers = wait_for_markers(str(tmp_path), 2, timeout_s=1.0)
    thread.join()
    assert markers[1] == {"rank": 1}


@pytest.mark.parametrize("max_shard_bytes", [5 << 30, 40_000], ids=["one-file", "sharded"])
def test_exported_weights_load_with_from_pretrained(tmp_path, max_shard_bytes):
    transformers = pytest.importorskip("transformers")
    from autopart.zoo import gpt2

    model = gpt2(layers=2, d_model=32, vocab=64).model
    path = str(tmp_path / "ckpt")
    save_module(path, model)
    out = str(tmp_path / "hf")
    files = export_hf(path, out, max_shard_bytes=max_shard_bytes)
    assert (len(files) > 1) == (max_shard_bytes < 1 << 20)
    model.config.save_pretrained(out)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_checkpoint_loads_into_a_compiled_plan_in_one_process(tmp_path):
    """A plain model's checkpoint into the rank modules of a pp 2 × tp 2 plan (fused q/k/v split in
    interleaved chunks) of a differently initialised copy: cm.simulate computes what the model does."""
    import autopart
    from autopart import zoo
    from autopart.runtime.checkpoint_offline import load_compiled

    torch.manual_seed(0)
    trained = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4, attn_bias=False)
    save_module(str(tmp_path / "ckpt"), trained.model)
    torch.manual_seed(1)
    other = zoo.gpt(layers=2, d_model=32, heads=4, vocab=64, seq=8, batch=4, attn_bias=False)
    cm = autopart.compile(other.model, 4, example_inputs=other.args, pipeline_parallel=2, tensor_parallel=2,
                          data_parallel=1, num_microbatches=2,
                          tp_plan={"blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
                                   "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"})
    with torch.no_grad():
        assert not torch.allclose(cm.simulate(*trained.args), trained.model(*trained.args))
        load_compiled(str(tmp_path / "ckpt"), cm)
        torch.testing.assert_close(cm.simulate(*trained.args), trained.model(*trained.args), rtol=1e-5, atol=1e-5)


def test_a_crash_between_the_commit_renames_leaves_the_old_checkpoint_found(tmp_path):
    """The commit moves the old checkpoint aside before renaming the new one into place; a crash in
    between leaves no checkpoint at the path, and a load finds the old one aside."""
    model, _ = _trained()
    path = str(tmp_path / "ckpt")
    save_module(path, model, step=7)
    os.rename(path, str(tmp_path / ".ckpt.old-123"))  # as if killed right after the first rename
    fresh, _ = _trained(0)
    load_module(path, fresh)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
