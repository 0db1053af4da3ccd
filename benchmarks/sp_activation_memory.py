"""Per-layer activation bytes with and without sequence parallelism, against Korthikanti et al.'s formula.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4),
for a GPT layer in 16-bit with dropout: s·b·h·(34 + 5·a·s/h) bytes on one device;
s·b·h·(10 + 24/t + 5·a·s/(h·t)) with tensor parallelism of t; s·b·h/t·(34 + 5·a·s/h) with
tensor and sequence parallelism. Their 34 counts 2·s·b·h of dropout masks (after attention and
after the MLP, one byte an element) and the 5·a·s/h term counts the materialised attention
scores; autopart's zoo GPT has no dropout and runs SDPA (flash attention keeps no scores, only
its log-sum-exp), so the comparable figures are s·b·h·32 unsplit, s·b·h·(8 + 24/t) under tp and
s·b·h·32/t under tp with sp; the log-sum-exp adds 4·a·s·b bytes (float32), / t under tp.

Measured: the saved-for-backward bytes autopart prices for one layer (passes/node_costs.py: what
autograd keeps of each op), restated per device of the tp group under the strategy ILP's choice
(passes/tensor_parallel/block_costs.py), for `sequence_parallel` False and True. The model is built
in bfloat16 on the meta device (every activation two bytes, as the formula's fp16).

    python benchmarks/sp_activation_memory.py [--hidden 4096 --heads 32 --seq 2048 --batch 1 --tp 8]
"""

from __future__ import annotations

import argparse

import torch

from autopart import zoo
from autopart.cost_models import Cluster
from autopart.frontend.analysis import analyse
from autopart.planner.mesh_search import tensor_parallel_blocks

MEGATRON = {"blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
            "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise"}


def layer_bytes(hidden: int, heads: int, seq: int, batch: int, tp: int) -> dict[str, float]:
    """Saved bytes of one middle layer per device: unsplit, tp, tp with sp."""
    entry = zoo.gpt(layers=3, d_model=hidden, heads=heads, vocab=1024, seq=seq, batch=batch, device="meta")
    model = entry.model.to(torch.bfloat16)
    cluster = Cluster.homogeneous(tp, "H100")
    analysis = analyse(model, entry.args, {}, cluster, None, reuse_layers=False)
    from autopart.passes.tensor_parallel import plan_placements

    fixed = plan_placements(analysis.gm, MEGATRON)

    def middle(blocks) -> int:
        layer = [b for b in blocks.blocks if "blocks.1" in b.name]
        return sum(b.saved_bytes for b in layer)

    out = {"unsplit": middle(analysis.blocks)}
    for label, sp in (("tp", False), ("tp+sp", True)):
        restated, assignment = tensor_parallel_blocks(analysis.gm, analysis.blocks, cluster, tp, training=True,
                                                      fixed=fixed, sequence_parallel=sp)
        assert assignment.sequence_parallel == sp, (label, assignment.sequence_parallel)
        out[label] = middle(restated)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tp", type=int, default=8)
    args = parser.parse_args()
    s, b, h, a, t = args.seq, args.batch, args.hidden, args.heads, args.tp
    sbh = s * b * h
    lse = 4 * a * s * b
    measured = layer_bytes(h, a, s, b, t)
    formula = {"unsplit": 32 * sbh + lse, "tp": (8 + 24 / t) * sbh + lse / t, "tp+sp": 32 / t * sbh + lse / t}
    korthikanti = {"unsplit": 34 * sbh, "tp": (10 + 24 / t) * sbh, "tp+sp": 34 / t * sbh}
    print(f"GPT layer h={h} a={a} s={s} b={b}, tp={t}, bfloat16 (MiB per device)")
    print("| layout | measured | formula without dropout masks, SDPA | Korthikanti (with dropout masks, "
          "no score term) | measured / formula |")
    print("|---|---|---|---|---|")
    for key in ("unsplit", "tp", "tp+sp"):
        print(f"| {key} | {measured[key] / 2**20:.1f} | {formula[key] / 2**20:.1f} | {korthikanti[key] / 2**20:.1f} "
              f"| {measured[key] / formula[key]:.3f} |")
    print(f"sp saves {measured['tp'] / measured['tp+sp']:.2f}x of the tp layer's activations "
          f"(formula {formula['tp'] / formula['tp+sp']:.2f}x)")


if __name__ == "__main__":
    main()
