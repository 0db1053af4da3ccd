"""Run under torchrun: sharded checkpoints saved, resumed, resharded, crashed and refused.

A GPT of 4 blocks (Megatron tp plan: fused q/k/v column-parallel, so a tp slice
is three interleaved chunks; tied embedding and head, held by the first and
the last stage) with dropout, AdamW and a StepLR schedule, on 6 fixed batches.
Phases (--phase):

- train: 6 steps, saving at steps 1, 2, 3 into DIR/ckpts/step-N (keep=2); the
  step losses go to DIR/losses-<plan>.json. --check-reference: rank 0 checks
  the checkpoint's parameters and AdamW moments against the model trained on
  one device.
- resume: a new job loads DIR/ckpts/step-3 (or --from) and runs steps 4-6; their losses
  equal the uninterrupted run's (bit for bit with --exact, else rtol/atol
  1e-5). --check-state: the loaded parameters and every optimizer moment equal
  the checkpoint's, by name (re-saved under this plan and consolidated; and
  gathered through full_state_dict).
- crash: saves at step 3, trains a step, then rank 1 is SIGKILLed while it
  writes the next save to the same path.
- verify-crash: retrains 3 steps and checks the checkpoint at the path is the
  step-3 one, bit for bit, then saves there again.
- bad-input: refused loads (another model, a truncated and a corrupt file, no
  checkpoint) and refused saves (over a directory that is not a checkpoint,
  an extra that is not JSON); the runner is unchanged after each.

Prints "CKPT OK rank R <phase>".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autopart
from autopart.runtime import checkpoint_store
from autopart.runtime.checkpoint_offline import read_entries
from autopart.zoo import GPT, _GPTBlock

STEPS = 6
CLOSE = dict(rtol=1e-5, atol=1e-5)
WEIGHTS = dict(rtol=1e-5, atol=4e-5)
MEGATRON = {"blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
            "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"}


class DropoutBlock(_GPTBlock):
    """zoo's GPT block with dropout on the MLP's hidden (sharded under tp) and on both residual
    branches (replicated under tp)."""

    def __init__(self, d_model: int, heads: int, p: float) -> None:
        super().__init__(d_model, heads, attn_bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.attn_qkv(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(b, s, d)))
        return x + self.drop(self.mlp_proj(self.drop(F.gelu(self.mlp_fc(self.ln_2(x))))))


def make_model(dropout: float, d_model: int = 32) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(4, d_model, 4, 64, 8, attn_bias=False)
    model.blocks = nn.ModuleList(DropoutBlock(d_model, 4, dropout) for _ in range(4))
    return model


def data():
    generator = torch.Generator().manual_seed(1)  # leaves the default generator to the model
    batches = [torch.randint(0, 64, (8, 8), generator=generator) for _ in range(STEPS)]
    targets = [torch.randint(0, 64, (8, 8), generator=generator) for _ in range(STEPS)]
    return batches, targets


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


PLANS = {
    "pp2xtp2": dict(pipeline_parallel=2, tensor_parallel=2, data_parallel=1, tp_plan=MEGATRON),
    "dp4-zero3": dict(pipeline_parallel=1, tensor_parallel=1, data_parallel=4, data_parallel_mode="zero3"),
    "pp2": dict(pipeline_parallel=2, tensor_parallel=1, data_parallel=1),
    "one": dict(pipeline_parallel=1, tensor_parallel=1, data_parallel=1),
}


def make_optimizer(params):
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True, choices=["train", "resume", "crash", "verify-crash", "bad-input"])
    parser.add_argument("--plan", required=True, choices=sorted(PLANS))
    parser.add_argument("--dir", required=True)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--losses-of", help="plan whose uninterrupted losses a resume must reproduce")
    parser.add_argument("--exact", action="store_true")
    parser.add_argument("--check-state", action="store_true")
    parser.add_argument("--check-reference", action="store_true")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--other", help="bad-input: a checkpoint of another model")
    parser.add_argument("--from", dest="source", default="ckpts/step-3", help="resume: the checkpoint, under DIR")
    args = parser.parse_args()

    model = make_model(args.dropout)
    reference = make_model(args.dropout)
    batches, targets = data()
    world = int(os.environ["WORLD_SIZE"])
    compiled = autopart.compile(model, world, example_inputs=(batches[0],), num_microbatches=2, schedule="1f1b",
                                **PLANS[args.plan])
    runner = compiled.distributed(timeout_s=60)
    optimizer, scheduler = make_optimizer(runner.parameters())
    ckpts = os.path.join(args.dir, "ckpts")

    def train(step: int) -> float:
        optimizer.zero_grad()
        loss = runner.step(batches[step - 1], target=targets[step - 1], loss_fn=loss_fn)
        optimizer.step()
        scheduler.step()
        return loss.item()

    def extra(step: int) -> dict:
        return {"scheduler": scheduler.state_dict(), "data_position": step * 8, "tensor": torch.arange(4.0) * step,
                "pair": (step, "steps")}

    if args.phase == "train":
        losses = []
        for step in range(1, STEPS + 1):
            losses.append(train(step))
            if step <= 3:
                runner.save(os.path.join(ckpts, f"step-{step}"), optimizer=optimizer, extra=extra(step), step=step,
                            keep=2, async_save=args.async_save)
        runner.wait_for_save()
        if runner.rank == 0:
            assert sorted(os.listdir(ckpts)) == ["step-2", "step-3"], os.listdir(ckpts)  # keep=2
            with open(os.path.join(args.dir, f"losses-{args.plan}.json"), "w") as f:
                json.dump(losses, f)
            if args.check_reference:
                _check_against_reference(reference, batches, targets, os.path.join(ckpts, "step-3"))
    elif args.phase == "resume":
        path = os.path.join(args.dir, args.source)
        saved = runner.load(path, optimizer=optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        assert runner.loaded_step == 3 and saved["data_position"] == 24 and saved["pair"] == (3, "steps"), saved
        assert torch.equal(saved["tensor"], torch.arange(4.0) * 3), saved["tensor"]
        if args.check_state:
            _check_loaded_state(runner, optimizer, path, os.path.join(args.dir, f"resaved-{args.plan}"), saved)
        losses = [train(step) for step in range(4, STEPS + 1)]
        with open(os.path.join(args.dir, f"losses-{args.losses_of}.json")) as f:
            expected = json.load(f)[3:]
        if args.exact:
            assert losses == expected, f"resumed losses {losses} != uninterrupted {expected}"
        else:
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), **CLOSE)
        print(f"losses {losses} uninterrupted {expected}", flush=True)
    elif args.phase == "crash":
        path = os.path.join(ckpts, "latest")
        for step in range(1, 4):
            train(step)
        runner.save(path, optimizer=optimizer, extra=extra(3), step=3)
        train(4)
        if runner.rank == 1:
            _die_while_writing()
        runner.save(path, optimizer=optimizer, extra=extra(4), step=4)
        raise AssertionError("the save with a killed rank returned")
    elif args.phase == "verify-crash":
        path = os.path.join(ckpts, "latest")
        for step in range(1, 4):
            train(step)
        expected = {name: t.clone() for name, t in runner.state_dict().items()}
        names = runner._param_names()
        moments = {names[id(p)][0]: {k: v.clone() for k, v in optimizer.state[p].items()}
                   for g in optimizer.param_groups for p in g["params"]}
        with torch.no_grad():
            for param in runner.parameters():
                param.add_(1.0)
        fresh, _ = make_optimizer(runner.parameters())
        saved = runner.load(path, optimizer=fresh)
        assert runner.loaded_step == 3 and saved["data_position"] == 24, (runner.loaded_step, saved)
        for name, tensor in runner.state_dict().items():
            assert torch.equal(tensor, expected[name]), f"{name} differs from the step-3 checkpoint"
        for group in fresh.param_groups:
            for param in group["params"]:
                for key, value in fresh.state[param].items():
                    assert torch.equal(value, moments[names[id(param)][0]][key]), (names[id(param)][0], key)
        runner.save(path, optimizer=fresh, step=3)  # the next save clears what the killed one left
        if runner.rank == 0:
            left = [e for e in os.listdir(ckpts) if ".partial-" in e or ".old-" in e]
            assert not left, left
    elif args.phase == "bad-input":
        _check_bad_input(runner, optimizer, ckpts, args.other)
    print(f"CKPT OK rank {runner.rank} {args.phase}", flush=True)
    dist.destroy_process_group()


def _check_against_reference(reference: nn.Module, batches, targets, path: str) -> None:
    """The checkpoint of step 3 against the same 3 AdamW steps of the model on one device."""
    optimizer, scheduler = make_optimizer(reference.parameters())
    for step in range(3):
        optimizer.zero_grad()
        loss_fn(reference(batches[step]), targets[step]).backward()
        optimizer.step()
        scheduler.step()
    model, optim = read_entries(path, "model/"), read_entries(path, "optim/")
    for name, param in reference.named_parameters():
        torch.testing.assert_close(model[name], param.detach(), **WEIGHTS, msg=lambda m: f"{name}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optim[f"{key}/{name}"], optimizer.state[param][key], **WEIGHTS,
                                       msg=lambda m: f"{key} of {name}: {m}")
        assert optim[f"step/{name}"].item() == 3.0


def _check_loaded_state(runner, optimizer, path: str, resaved: str, extra: dict) -> None:
    """What this plan loaded equals the checkpoint by name: re-saved from this plan, every entry is
    bit-identical; gathered by the older full_state_dict path, every parameter too."""
    runner.save(resaved, optimizer=optimizer, extra=extra, step=runner.loaded_step)
    full = runner.full_state_dict()
    if runner.rank == 0:
        before, after = read_entries(path, ""), read_entries(resaved, "")
        assert set(before) == set(after), sorted(set(before) ^ set(after))[:5]
        assert any(k.startswith("optim/exp_avg_sq/") for k in before)
        for key, tensor in before.items():
            assert torch.equal(after[key], tensor), f"{key} changed through load and save"
        for name, tensor in full.items():
            assert torch.equal(tensor, before[f"model/{name}"]), f"{name} gathered differs from the checkpoint"


def _die_while_writing() -> None:
    """This rank writes a few bytes of its file and is then killed (SIGKILL)."""
    def dying_write(path, entries, metadata=None, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_store.write_file = dying_write


def _check_bad_input(runner, optimizer, ckpts: str, other: str) -> None:
    good = os.path.join(ckpts, "good")
    runner.save(good, optimizer=optimizer, step=0)
    before = {name: t.clone() for name, t in runner.state_dict().items()}
    files_before = {f: os.path.getsize(os.path.join(good, f)) for f in os.listdir(good)}

    def refused(path: str, *needles: str, what: str) -> None:
        try:
            runner.load(path, optimizer=optimizer)
        except autopart.InputError as error:
            if runner.rank == 0:
                print(f"refused {what}: {error}", flush=True)
            for needle in needles:
                assert needle in str(error), f"{what}: {needle!r} not in: {error}"
        else:
            raise AssertionError(f"{what} was loaded")
        for name, tensor in runner.state_dict().items():
            assert torch.equal(tensor, before[name]), f"{what}: {name} changed by a refused load"

    refused(other, "another model", "missing ['blocks.3.", "wte.weight: saved (64, 48), this model (64, 32)", what="another model's checkpoint")
    truncated, corrupt, empty = (os.path.join(ckpts, n) for n in ("truncated", "corrupt", "empty"))
    if runner.rank == 0:
        shutil.copytree(good, truncated)
        with open(os.path.join(truncated, "rank00001.safetensors"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
        shutil.copytree(good, corrupt)
        name = os.path.join(corrupt, "rank00001.safetensors")
        with open(name, "r+b") as f:  # flip one byte of the first tensor's data, keeping the size
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header + 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.makedirs(empty)
        with open(os.path.join(empty, "notes.txt"), "w") as f:
            f.write("not a checkpoint")
    dist.barrier()
    refused(truncated, "rank00001.safetensors", "truncated", what="a truncated file")
    refused(empty, "holds no autopart checkpoint", what="a directory without a checkpoint")
    refused(os.path.join(ckpts, "nowhere"), "does not exist", what="a missing path")
    try:
        runner.save(empty, optimizer=optimizer)
    except autopart.InputError as error:
        assert "not an autopart checkpoint" in str(error), error
    else:
        raise AssertionError("a save replaced a directory that is not a checkpoint")
    assert os.listdir(empty) == ["notes.txt"], os.listdir(empty)
    try:  # rank 0's extra cannot be stored: every rank raises, nothing is written
        runner.save(os.path.join(ckpts, "bad-extra"), extra={"callback": print})
    except autopart.InputError as error:
        assert "extra['callback'] is a builtin_function_or_method" in str(error), error
    else:
        raise AssertionError("a save took an extra that is not JSON")
    assert not any(e.startswith((".bad-extra", "bad-extra")) for e in os.listdir(ckpts)), os.listdir(ckpts)
    try:  # last: a CRC mismatch is found while reading, after other tensors were already copied
        runner.load(corrupt, optimizer=optimizer)
    except autopart.InputError as error:
        assert "rank00001.safetensors" in str(error) and "corrupt" in str(error), error
    else:
        raise AssertionError("a corrupt file was loaded")
    assert {f: os.path.getsize(os.path.join(good, f)) for f in os.listdir(good)} == files_before


if __name__ == "__main__":
    main()
