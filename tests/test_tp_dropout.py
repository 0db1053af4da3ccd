"""Dropout under tensor parallelism: Megatron's RNG-tracker semantics (autopart/tp_random.py).

Replicated activations drop the same elements on every tp rank, sharded ones draw independent
masks, and every microbatch and replica draws fresh ones; the drop rate is p (within 5 σ of a
Bernoulli(p) count)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import autopart
from autopart.core.tp_random import ShardedStream, sharded_random

from test_distributed import _finish, _torchrun

P = 0.5


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop_hidden, self.proj, self.drop_out = (nn.Linear(32, 256), nn.Dropout(P), nn.Linear(256, 32),
                                                               nn.Dropout(P))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_out(self.proj(self.drop_hidden(torch.nn.functional.gelu(self.fc(x)))))


def test_simulated_tp_ranks_drop_alike_on_replicated_values():
    """In one process the tp ranks run in lock step; a replicated dropout must give every rank the
    same mask (the simulation refuses outputs that differ between ranks)."""
    torch.manual_seed(0)
    model = nn.Sequential(_MLP(), _MLP())
    x = torch.randn(1, 32).repeat(64, 1)
    cm = autopart.compile(model, 2, example_inputs=(x,), tensor_parallel=2, pipeline_parallel=1,
                          tp_plan={"*.fc": "colwise", "*.proj": "rowwise"})
    out = cm.simulate(x)
    rate, n = float((out == 0).float().mean()), out.numel()
    assert abs(rate - P) < 5 * (P * (1 - P) / n) ** 0.5


def test_sharded_streams_are_independent_and_reproducible():
    x = torch.ones(64, 64)
    masks = [sharded_random(ShardedStream(seed), torch.ops.aten.dropout.default, x, P, True) == 0
             for seed in (10, 11, 10)]
    assert torch.equal(masks[0], masks[2])  # a stream is its seed
    agree = float((masks[0] == masks[1]).float().mean())
    assert abs(agree - 0.5) < 5 * (0.25 / x.numel()) ** 0.5  # independent Bernoulli(0.5) masks agree half the time
    before = torch.get_rng_state()
    sharded_random(ShardedStream(3), torch.ops.aten.dropout.default, x, P, True)
    assert torch.equal(torch.get_rng_state(), before)  # the default generator is left where it was


@pytest.mark.multiprocess
def test_dropout_under_dp_and_tp_on_gloo():
    script = os.path.join(os.path.dirname(__file__), "distributed", "dropout_tp.py")
    code, out = _finish(_torchrun(4, script=script))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == 4, out[-4000:]
