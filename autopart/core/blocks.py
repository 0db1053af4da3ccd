"""The block graph: runs of graph nodes placed together, and the values between them.

Plain frozen dataclasses every layer shares: passes/coarsen.py builds a `BlockGraph` from a
costed GraphModule, the planner prices and cuts it, the report names its blocks. Times are
seconds, sizes bytes, at the traced batch size unless stated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BlockTimes:
    """Time of one block on one device: fixed launch cost plus a part linear in batch."""

    device: str
    """Device name (DeviceSpec.name)."""
    fwd_fixed_s: float
    """Of the forward, what each call costs whatever its batch (s): kernel launches, autocast's
    conversions of the weights and reading them (passes/node_costs.py `NodeCost.per_call_seconds`)."""
    fwd_scaled_s: float
    """Forward roofline time at the traced batch size, scales linearly with batch (s)."""
    bwd_fixed_s: float
    """Of the backward, the same (s)."""
    bwd_scaled_s: float
    """Backward roofline time at the traced batch size (s)."""

    def fwd(self, scale: float) -> float:
        return self.fwd_fixed_s + scale * self.fwd_scaled_s

    def bwd(self, scale: float) -> float:
        return self.bwd_fixed_s + scale * self.bwd_scaled_s


@dataclass(frozen=True, kw_only=True)
class Block:
    """A run of nodes placed together."""

    name: str
    """Module path (e.g. 'model.layers.3'); '#k' marks the k-th run of a repeated path."""
    node_names: tuple[str, ...]
    """call_function nodes of the block, graph order (placeholders and get_attrs excluded)."""
    param_names: tuple[str, ...]
    """get_attr targets the block reads (parameters and buffers)."""
    signature: str
    """Structural hash: equal for identical layers."""
    fwd_flops: int
    bwd_flops: int
    param_bytes: int
    """Bytes of the parameters the block reads."""
    num_params: int
    """Elements of those parameters."""
    trainable_param_bytes: int
    """Of which require grad (gradients and optimizer state follow them)."""
    buffer_bytes: int
    saved_bytes: int
    """Activations kept for backward at the traced batch size (bytes)."""
    times: tuple[BlockTimes, ...]
    """One entry per distinct device of the cluster."""
    model_output_bytes: int = 0
    """Bytes of the model outputs the block computes (traced batch): the pipeline keeps them
    for every microbatch in flight until its backward."""
    model_output_float32_bytes: int = 0
    """Those outputs' floating elements × 4: the size of the float32 log-softmax a
    cross-entropy loss saves of them, and of each gradient its backward makes."""
    parameters: tuple[tuple[str, int, bool, int], ...] = ()
    """(get_attr target, bytes, trainable, elements) of each parameter the block reads: a parameter
    read by several blocks of one stage (tied weights) is held there once."""
    input_bytes: int = 0
    """Tensors the block reads from other blocks or the model's inputs (traced batch): what a
    checkpoint of the block keeps ('full' recomputation, autopart/recompute.py)."""
    selective_saved_bytes: int = 0
    """Outputs of its matmul and attention ops (traced batch): what 'selective' keeps besides the inputs."""
    selective_times: tuple[BlockTimes, ...] = ()
    """Per device, the forward of the ops 'selective' recomputes (the rest of the block; bwd fields 0)."""
    autocast_weight_bytes: int = 0
    """Of `saved_bytes`, the reduced-precision copies of float32 weights that autocast makes for the
    block's matmuls, one per weight per microbatch. FSDP's bf16 parameters (MixedPrecisionPolicy)
    need none: autocast finds the weights already in bf16."""
    expert_param_bytes: int = 0
    """Of `param_bytes`, the experts' weights a grouped expert matmul reads ([E, K, N], sharded on the
    expert dim by expert parallelism: passes/expert_parallel.py)."""
    expert_trainable_param_bytes: int = 0
    """Of those, the ones that require grad."""
    num_experts: int = 0
    """Experts per grouped expert matmul of the block (their greatest common divisor; 0 without)."""
    expert_rows_bytes: int = 0
    """Per call at the traced batch: the rows in and products out of the block's grouped expert matmuls
    (tokens × top-k × (K + N) × element size), what expert parallelism's all-to-alls move (the part
    leaving a rank: (ep - 1) / ep)."""
    attention_kv_bytes: int = 0
    """Bytes of the keys and values the block's attention ops read (traced batch): under context
    parallelism each rank all-gathers them over its cp group in the forward (and reduce-scatters
    their gradients in the backward), and attention saves the gathered copy (axes/context.py)."""
    attention_sequence: int = 0
    """Longest key sequence of the block's attention ops (tokens; 0 without attention)."""
    expert_cast_bytes: int = 0
    """The compute-dtype copies of its expert weights that mixed precision makes each forward and the
    grouped matmuls save for backward (passes/expert_precision.py), whole (not split by ep), each once."""
    expert_cast_times: tuple[BlockTimes, ...] = ()
    """Those casts' forward and backward time per device (part of `times`), whole."""
    eager_times: tuple[BlockTimes, ...] = ()
    """Per device, the block's times op by op where `times` price compiled kernels (empty: `times`
    are op by op): a block recomputed 'selective' runs op by op in a compiled plan too."""
    recomputable: bool = True
    """False when an op writes into a tensor it did not make (a buffer's running statistics): a
    replay would apply the write twice, so the block is never recomputed."""

    def time_on(self, device: str) -> BlockTimes:
        for entry in self.times:
            if entry.device == device:
                return entry
        raise KeyError(f"block {self.name} has no time for device {device!r}")

    def run_time_on(self, device: str, recompute: str) -> BlockTimes:
        """Forward and backward (without the replay) on `device` as the block runs under `recompute`:
        op by op when 'selective' keeps the region eager in a compiled plan, else `time_on`."""
        if recompute == "selective" and self.recomputable and self.eager_times:
            for entry in self.eager_times:
                if entry.device == device:
                    return entry
        return self.time_on(device)

    def kept_bytes(self, recompute: str, weights_in_compute_dtype: bool = False) -> int:
        """Bytes kept for backward per microbatch at the traced batch under `recompute`;
        `weights_in_compute_dtype`: FSDP gathers the weights in bf16, so autocast copies none."""
        if recompute == "none" or not self.recomputable:
            # never below 0: a copy is saved only where the matmul's other operand needs a gradient
            # (not after the model's inputs), which the count of copies does not see
            return max(self.saved_bytes - (self.autocast_weight_bytes if weights_in_compute_dtype else 0), 0)
        if recompute == "full":
            return min(self.input_bytes, self.saved_bytes)
        return min(self.input_bytes + self.selective_saved_bytes, self.saved_bytes)

    def recompute_time_on(self, device: str, recompute: str) -> BlockTimes:
        """The forward that `recompute` replays in the block's backward, on `device` (bwd fields 0)."""
        if recompute == "none" or not self.recomputable:
            return BlockTimes(device=device, fwd_fixed_s=0.0, fwd_scaled_s=0.0, bwd_fixed_s=0.0, bwd_scaled_s=0.0)
        if recompute == "full":
            t = self.time_on(device)
            return BlockTimes(device=device, fwd_fixed_s=t.fwd_fixed_s, fwd_scaled_s=t.fwd_scaled_s,
                              bwd_fixed_s=0.0, bwd_scaled_s=0.0)
        for entry in self.selective_times:
            if entry.device == device:
                return entry
        raise KeyError(f"block {self.name} has no selective recompute time for device {device!r}")


@dataclass(frozen=True, kw_only=True)
class BlockValue:
    """A tensor computed in one block and read in others."""

    node_name: str
    producer: int
    consumers: tuple[int, ...]
    num_bytes: int
    """Bytes at the traced batch size."""


@dataclass(frozen=True, kw_only=True)
class BlockGraph:
    """Blocks in topological order, and the values that flow between them."""

    blocks: tuple[Block, ...]
    values: tuple[BlockValue, ...]
    depth: int
    """Module depth the blocks were cut at (0: repeated layers)."""

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        pairs = {(v.producer, c) for v in self.values for c in v.consumers}
        return tuple(sorted(pairs))

    def block_of_node(self) -> dict[str, int]:
        return {name: i for i, block in enumerate(self.blocks) for name in block.node_names}
