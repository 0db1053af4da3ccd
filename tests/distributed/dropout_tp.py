"""Run under torchrun (4 ranks: dp 2 × tp 2): dropout under tensor parallelism.

Two Megatron MLPs, each Linear (colwise) → GELU → Dropout (on the sharded hidden) → Linear
(rowwise) → Dropout (on the output, replicated or partial), fed one row repeated over the batch
so that only the masks differ between rows. Checks, printing "OK rank R":
- the tp ranks of a replica return bit-identical outputs (the replicated dropout drew the same mask);
- the sharded dropout drew independent masks on the two tp ranks (they agree on about half the
  elements, as independent Bernoulli(0.5) masks do, not on all);
- each microbatch and each replica drew its own masks;
- the observed drop rate of both dropouts is p = 0.5 within 5 standard deviations.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import autopart
from autopart.core.tp_random import sharded_random

P = 0.5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop_hidden, self.proj, self.drop_out = nn.Linear(32, 256), nn.Dropout(P), nn.Linear(256, 32), nn.Dropout(P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_out(self.proj(self.drop_hidden(torch.nn.functional.gelu(self.fc(x)))))


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MLP(), MLP())
    x = torch.randn(1, 32).repeat(16, 1)
    kernels = "--compile-kernels" in sys.argv  # the stage's regions through torch.compile (aot_eager)
    compiled = autopart.compile(model, 4, example_inputs=(x,), tensor_parallel=2, data_parallel=2, pipeline_parallel=1,
                                num_microbatches=2, tp_plan={"*.fc": "colwise", "*.proj": "rowwise"},
                                compile_kernels=kernels)
    # recorded on this rank's module before the runner compiles its regions (they are the same objects)
    masks = _record_sharded_masks(compiled.rank_module(int(os.environ["RANK"])))
    runner = compiled.distributed(timeout_s=120, kernels_backend="aot_eager")
    out = runner(x)

    world = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(world, out.contiguous())
    for rank, other in enumerate(world):  # every rank holds the gathered batch: tp peers must agree exactly
        assert torch.equal(other, out), f"rank {rank}'s output differs from rank {runner.rank}'s"
    dropped = out == 0
    rows = dropped.view(2, 2, 4, 32)  # replica, microbatch, rows of a microbatch, features
    assert not torch.equal(rows[0, 0], rows[0, 1]), "both microbatches drew the same mask"
    assert not torch.equal(rows[0], rows[1]), "both replicas drew the same masks"
    _check_rate(dropped, "replicated dropout")

    hidden = masks[0]  # this rank's sharded mask, first microbatch: [4, 128]
    peers = [torch.empty_like(hidden) for _ in range(dist.get_world_size())]
    dist.all_gather(peers, hidden)
    peer = peers[runner.rank ^ 1]  # the other tp rank of this replica (tp fastest)
    agree = float((hidden == peer).float().mean())
    n = hidden.numel()
    assert abs(agree - 0.5) < 5 * (0.25 / n) ** 0.5, f"tp ranks' sharded masks agree on {agree:.1%} of elements"
    _check_rate(hidden, "sharded dropout")
    print(f"OK rank {runner.rank}: drop rate {float(dropped.float().mean()):.3f} replicated, "
          f"{float(hidden.float().mean()):.3f} sharded; sharded masks of the tp ranks agree on {agree:.1%}",
          flush=True)
    dist.destroy_process_group()


def _check_rate(dropped: torch.Tensor, what: str) -> None:
    rate, n = float(dropped.float().mean()), dropped.numel()
    assert abs(rate - P) < 5 * (P * (1 - P) / n) ** 0.5, f"{what}: drop rate {rate:.3f} for p={P} over {n} elements"


def _record_sharded_masks(module: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Wrap the module's sharded random op so that each call's zero pattern is kept."""
    masks: list[torch.Tensor] = []

    def recording(stream, op, *args, **kwargs):
        result = sharded_random(stream, op, *args, **kwargs)
        masks.append((result == 0).to(torch.uint8))
        return result

    graphs = [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]  # region bodies too
    nodes = [(g, n) for g in graphs for n in g.graph.nodes if n.target is sharded_random]
    assert len(nodes) == 2, f"expected a sharded dropout per MLP in the rank module, found {len(nodes)}"
    owner, node = nodes[0]
    node.target = recording
    owner.recompile()
    return masks


if __name__ == "__main__":
    main()
