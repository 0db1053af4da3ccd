"""Run under torchrun (4 ranks): Hugging Face safetensors into a plan compiled on the meta device.

The GPT is built on the meta device (no memory), planned pp 2 × tp 2, and each
rank fills its own slices from DIR/model.safetensors with `runner.load_hf`.
Checks: the forward output equals the model on one device loaded from the same
file (rtol/atol 1e-5), and no rank read more bytes of the file than its own
slices hold (its share; the tied embedding counted on both stages holding it).
Prints "HF OK rank R".
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import autopart
from autopart import zoo
from autopart.runtime import safetensors_file

MEGATRON = {"blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
            "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    read = {"bytes": 0}
    reader = safetensors_file.SafetensorsFile
    read_rows, read_box = reader.read_rows, reader.read_box

    def counting_rows(self, key, start, stop, crcs=None, scratch=None):
        rows = read_rows(self, key, start, stop, crcs, scratch)
        read["bytes"] += rows.numel() * rows.element_size()
        return rows

    def counting_box(self, key, start, sizes, scratch=None):
        box = read_box(self, key, start, sizes, scratch)
        read["bytes"] += box.numel() * box.element_size()  # 2-D boxes: exactly what was read
        return box

    reader.read_rows, reader.read_box = counting_rows, counting_box
    entry = zoo.gpt(layers=4, d_model=64, heads=4, vocab=128, seq=8, batch=8, attn_bias=False, device="meta")
    ids = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(3))
    compiled = autopart.compile(entry.model, 4, example_inputs=(ids,), pipeline_parallel=2, tensor_parallel=2,
                                data_parallel=1, num_microbatches=2, tp_plan=MEGATRON)
    runner = compiled.distributed(timeout_s=60, init_fn=lambda name, tensor: None)
    runner.load_hf(args.dir)

    from safetensors.torch import load_file

    reference = zoo.gpt(layers=4, d_model=64, heads=4, vocab=128, seq=8, batch=8, attn_bias=False).model
    weights = load_file(os.path.join(args.dir, "model.safetensors"))
    reference.load_state_dict(weights, strict=False)  # the tied head is saved once, as wte.weight
    assert torch.equal(reference.lm_head.weight, weights["wte.weight"])
    with torch.no_grad():
        torch.testing.assert_close(runner(ids), reference(ids), rtol=1e-5, atol=1e-5)
    total = os.path.getsize(os.path.join(args.dir, "model.safetensors"))
    share = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else t.numel() * t.element_size()
                for t in runner.state_dict().values())
    largest = max(t.numel() * t.element_size() for t in weights.values())
    assert read["bytes"] <= share, (read["bytes"], share)
    assert read["bytes"] < total, (read["bytes"], total)
    print(f"HF OK rank {runner.rank}: read {read['bytes']} of {total} bytes; its share {share}, "
          f"largest tensor {largest}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
