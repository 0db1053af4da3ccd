"""Random numbers under tensor parallelism, with Megatron's RNG-tracker semantics.

A dropout on a *replicated* activation must drop the same elements on every
rank of a tensor-parallel group (else the replicas diverge); a dropout on a
*sharded* activation must draw independent masks on each rank (else every
shard repeats the same pattern). Megatron keeps two generator states for this
(the default one, seeded alike within the tp group, and a "model-parallel"
one seeded per tp rank, forked into around sharded regions: Shoeybi et al.
2019, `CudaRNGStatesTracker`). autopart does the same:

- replicated random ops draw from the default generator, which every rank of a
  tp group holds in the same state (the runner seeds it alike within the group
  and differently across data-parallel replicas, so every replica and every
  microbatch draws fresh masks);
- `passes/random_ops.py` routes each sharded random op through
  `sharded_random`, which swaps in the rank module's own `ShardedStream` (seeded
  per tp rank) for the one call.

Random ops are `RANDOM_OPS` plus `scaled_dot_product_attention` with a nonzero
`dropout_p`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx

_aten = torch.ops.aten
RANDOM_OPS = {
    _aten.dropout.default, _aten.native_dropout.default, _aten.feature_dropout.default,
    _aten.alpha_dropout.default, _aten.bernoulli.default, _aten.bernoulli.p, _aten.rand_like.default,
    _aten.randn_like.default, _aten.randint_like.default, _aten.rand.default, _aten.randn.default,
    _aten.randint.default, _aten.randperm.default,
}
_SDPA = {_aten.scaled_dot_product_attention.default}

STREAM_ATTR = "_tp_random"
"""Attribute of a rank module holding its `ShardedStream` (set by passes/random_ops.py)."""

SHARDED_SEED_OFFSET = 2718
"""Megatron's offset between the default seed and the model-parallel one (`model_parallel_cuda_manual_seed`)."""


def draws_random(node: torch.fx.Node) -> bool:
    """Whether a graph node draws from the default generator."""
    if node.op != "call_function":
        return False
    if node.target in RANDOM_OPS:
        return True
    if node.target in _SDPA:
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return bool(dropout)
    return False


class ShardedStream(torch.nn.Module):
    """One tp rank's generator state for random ops on sharded values, per device.

    A module without parameters or buffers, so that a rank GraphModule holds it as a submodule
    (`get_attr`) and `.to()`, `deepcopy` and state dicts leave it be.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = int(seed)
        self._states: dict[str, torch.Tensor] = {}

    def reseed(self, seed: int) -> None:
        """Start the stream over from `seed` (the runner gives each tp rank and replica its own)."""
        self.seed = int(seed)
        self._states.clear()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The stream's generator states, to draw the same numbers again (`restore`)."""
        return dict(self._states)

    def restore(self, states: dict[str, torch.Tensor]) -> None:
        self._states = dict(states)

    @contextlib.contextmanager
    def forked(self, device: torch.device) -> Iterator[None]:
        """Run the block with this stream as `device`'s default generator, then put the default back."""
        key = str(device)
        if device.type == "cuda":
            get, put = (lambda: torch.cuda.get_rng_state(device)), (lambda s: torch.cuda.set_rng_state(s, device))
        else:
            get, put = torch.get_rng_state, torch.set_rng_state
        if key not in self._states:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._states[key] = generator.get_state()
        saved = get()
        put(self._states[key])
        try:
            yield
        finally:
            self._states[key] = get()
            put(saved)


def sharded_random(stream: ShardedStream, op: Any, *args: Any, **kwargs: Any) -> Any:
    """`op(*args, **kwargs)` drawing from this rank's own stream (called from rank modules)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is None:
        device = torch.device(kwargs.get("device") or "cpu")
    with stream.forked(device):
        return op(*args, **kwargs)


def streams_of(body: Any) -> list[ShardedStream]:
    """The sharded streams a region body draws from: a module's own, or those a function lists
    in its `sharded_streams` attribute (the one-process tensor-parallel simulation's)."""
    if isinstance(body, torch.nn.Module):
        return [m for m in body.modules() if isinstance(m, ShardedStream)]
    return list(getattr(body, "sharded_streams", ()))


@contextlib.contextmanager
def replaying(streams: list[ShardedStream], states: list[dict[str, torch.Tensor]]) -> Iterator[None]:
    """Draw from `streams` as from `states` (a recomputed forward redraws its dropout masks), then
    put them back where they were."""
    after = [stream.snapshot() for stream in streams]
    for stream, state in zip(streams, states):
        stream.restore(state)
    try:
        yield
    finally:
        for stream, state in zip(streams, after):
            stream.restore(state)


def sharded_seed(base_seed: int, tp_index: int, dp_index: int = 0, tp: int = 1) -> int:
    """Seed of tp rank `tp_index`'s sharded stream in replica `dp_index`: independent of every other
    rank's and of the default generator's."""
    return base_seed + SHARDED_SEED_OFFSET + tp_index + dp_index * tp


def replica_seed(base_seed: int, dp_index: int) -> int:
    """Seed of the default generator in replica `dp_index`: equal within a tp group, fresh per replica."""
    return base_seed + 1_000_003 * dp_index
