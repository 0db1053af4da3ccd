"""What one training setting costs per block and per stage: memory (bytes) and time (seconds).

A setting is the part of a candidate the pipeline ILP does not choose: the
data-parallel mode and its replicas, and how each block recomputes its
activations (`core.setting.Setting`). The planner (planner/pricing.py) turns these
figures into the arrays of a `PipelineProblem` and, after the solve, adds the
data-parallel synchronisation and the optimizer step that no stage cut
changes.

Memory, per block (bytes, at the traced batch unless scaled):
- state: parameters + buffers + optimizer state, sharded over `dp_shard`
  replicas under FSDP (`block_state_bytes`);
- gradients: allocated by the first backward (`block_gradient_bytes`);
- activations kept per microbatch in flight, after recomputation
  (`Block.kept_bytes`) plus the loss's float32 log-softmax for the block that
  computes the model's outputs (`activation_bytes`);
- reserved once per stage (`reserved_bytes`): the activations a recomputed
  block rebuilds during its backward (the largest block's), and under ZeRO-3
  the parameters of the units FSDP has gathered (the one computing and the
  one prefetched) and one unit's unreduced gradients.

Time: a recomputed block's backward replays its forward, or the part of it
'selective' does not keep (`recompute_seconds`); the optimizer step
(`optimizer_seconds`). What each parallel axis adds to a step (the
data-parallel synchronisation per mode) is the axis's own (autopart/axes/).
"""

from __future__ import annotations

import dataclasses
import functools

from typing import Sequence

from autopart.cost_models import Cluster, gradient_bytes, optimizer_state_bytes, optimizer_step_bytes
from autopart.core.blocks import Block, BlockGraph
from autopart.core.modes import reshards_parameters
from autopart.core.schedules import schedule_keeps_outputs
from autopart.core.setting import Setting
from autopart.axes.context import gathered_kv_bytes
from autopart.axes.data import experts_sharded_over_edp, unsharded_fraction


def weights_in_compute_dtype(request, setting: Setting) -> bool:
    """Whether FSDP hands the blocks bf16 weights, so that autocast copies none (mixed precision)."""
    return setting.shards > 1 and request.mixed_precision == "bf16"


def expert_weights_in_compute_dtype(request, setting: Setting) -> bool:
    """Whether FSDP hands the expert weights in bf16, so that their casts copy nothing: as for the dense
    weights; under expert parallelism only where FSDP shards the expert blocks over edp."""
    return weights_in_compute_dtype(request, setting) and (setting.ep == 1 or experts_sharded_over_edp(setting))


def expert_copy_bytes(block: Block, request, setting: Setting, recompute: str = "none") -> float:
    """Bytes of the bf16 expert weight copies one microbatch in flight keeps for backward (mixed
    precision: passes/expert_precision.py): E / ep experts' worth, whatever the microbatch's size;
    none when the block is recomputed or FSDP hands bf16 weights. `activation_bytes` leaves them out."""
    if not request.training or not block.expert_cast_bytes or expert_weights_in_compute_dtype(request, setting):
        return 0.0
    if recompute != "none" and block.recomputable:
        return 0.0
    return block.expert_cast_bytes / setting.ep


def block_state_bytes(block: Block, request, setting: Setting) -> float:
    """Parameters + optimizer state + buffers of a block (bytes), held the whole step.

    'zero2': optimizer state and master parameters in 1/dp_shard shards, and the gathered
    parameters kept from the first forward to the step's end (FSDP2 reshard_after_forward=False),
    in bf16 under mixed precision. 'zero3'/'hsdp': only the shards; the gathered parameters are
    transient (`reserved_bytes`) or, in a pipeline, kept after the first backward
    (`block_gradient_bytes`). Experts under expert parallelism: `expert_split`.
    """
    if setting.ep > 1 and block.expert_param_bytes:
        return sum(block_state_bytes(part, request, held) for part, held in expert_split(block, setting))
    state = float(block.param_bytes + block.buffer_bytes)
    if not request.training:
        return state
    optimizer = optimizer_state_bytes(block.trainable_param_bytes, request.optimizer)
    shards = setting.shards
    if shards == 1:
        return state + optimizer
    sharded = (optimizer + block.param_bytes) / shards + block.buffer_bytes
    if reshards_parameters(setting.mode):
        return sharded
    return sharded + block.param_bytes * unsharded_fraction(request, setting)


def block_gradient_bytes(block: Block, request, setting: Setting, num_microbatches: int = 1,
                         pipelined: bool = False) -> float:
    """Gradients of a block (bytes): allocated by its first backward, kept to the step's end.

    'ddp' on one stage: the gradients and DistributedDataParallel's bucket copy of them.
    'zero2': the unreduced full gradients and the reduced 1/dp_shard shard. 'zero3'/'hsdp': the
    shard; with several microbatches the unreduced gradients accumulate until the last one
    reduces them (FSDP2's gradient accumulation, float32 as the reduce dtype); in a pipeline
    (torch.distributed.pipelining) the stage also keeps its gathered parameters from its first
    backward until the step's end, where it reduces (PipelineStage.perform_reduce_grad).
    """
    if not request.training:
        return 0.0
    if setting.ep > 1 and block.expert_param_bytes:
        return sum(block_gradient_bytes(part, request, held, num_microbatches, pipelined)
                   for part, held in expert_split(block, setting))
    grads = float(gradient_bytes(block.trainable_param_bytes))
    shards = setting.shards
    if shards == 1 and setting.mode == "ddp" and setting.dp > 1 and not pipelined:
        # DistributedDataParallel copies every gradient into its flat all-reduce buckets
        # (gradient_as_bucket_view=False, its default): the gradients are held twice.
        return 2 * grads
    if shards == 1:
        return grads
    if not reshards_parameters(setting.mode):
        return grads * unsharded_fraction(request, setting) + grads / shards
    held = grads / shards
    if pipelined:
        held += grads + block.param_bytes * unsharded_fraction(request, setting)
    elif num_microbatches > 1:
        held += grads
    return held


def expert_split(block: Block, setting: Setting) -> list[tuple[Block, Setting]]:
    """A block as its dense part (held as `setting` says) and its experts' share under expert
    parallelism: 1/ep of the expert weights per rank, with their gradients and optimizer state.
    Under ZeRO with edp = dp / ep > 1 replicas per expert block, FSDP shards that share over edp as
    the mode shards the dense part over dp (ZeRO-3 for 'hsdp': the experts shard over all of edp);
    otherwise it is held whole (the runner leaves the expert blocks out of DDP and sums their
    gradients over edp itself: no bucket copy). Activations are not split: each rank computes, on
    average, as many routed rows as without ep (uniform routing)."""
    dense, experts = _expert_parts(block, setting.ep)
    dense_setting, expert_setting = _expert_settings(setting)
    return [(dense, dense_setting), (experts, expert_setting)]


_EXPERT_PARTS: dict[tuple[int, int], tuple[Block, Block, Block]] = {}
"""(id(block), ep) → (block, its dense part, its experts' share): the search prices the same blocks
under ep hundreds of thousands of times (DeepSeek-V3: 283k calls, 10 s of dataclass copies)."""


def _expert_parts(block: Block, ep: int) -> tuple[Block, Block]:
    hit = _EXPERT_PARTS.get((id(block), ep))
    if hit is not None and hit[0] is block:   # the block itself is kept, so its id is not reused
        return hit[1], hit[2]
    dense = dataclasses.replace(block, param_bytes=block.param_bytes - block.expert_param_bytes,
                                trainable_param_bytes=block.trainable_param_bytes - block.expert_trainable_param_bytes,
                                expert_param_bytes=0, expert_trainable_param_bytes=0)
    experts = dataclasses.replace(block, param_bytes=block.expert_param_bytes // ep,
                                  trainable_param_bytes=block.expert_trainable_param_bytes // ep, buffer_bytes=0,
                                  expert_param_bytes=0, expert_trainable_param_bytes=0)
    if len(_EXPERT_PARTS) > 4096:
        _EXPERT_PARTS.clear()
    _EXPERT_PARTS[(id(block), ep)] = (block, dense, experts)
    return dense, experts


@functools.lru_cache(maxsize=4096)
def _expert_settings(setting: Setting) -> tuple[Setting, Setting]:
    """How the dense part and the experts' share of a block are held under `setting`."""
    dense = dataclasses.replace(setting, ep=1)
    if experts_sharded_over_edp(setting):
        edp = setting.dp // setting.ep
        mode = "zero3" if reshards_parameters(setting.mode) else "zero2"
        return dense, dataclasses.replace(setting, dp=edp, mode=mode, dp_shard=edp, ep=1)
    return dense, dataclasses.replace(setting, dp=1, mode="ddp", dp_shard=1, ep=1)


def activation_bytes(block: Block, request, setting: Setting, recompute: str = "none") -> float:
    """Bytes a block keeps per microbatch in flight (traced batch): what autograd keeps under
    `recompute` (`Block.kept_bytes`), plus, for the block computing the model's outputs, the
    float32 log-softmax of them that a cross-entropy loss saves (the loss is not traced;
    cross-entropy is assumed), and the outputs themselves, which the stage holds until the
    microbatch's backward (not to the step's end: `keeps_model_outputs`). Not the expert weight
    copies, which do not scale with the batch (`expert_copy_bytes`). Under context parallelism
    attention also keeps the keys and values it gathered (`gathered_kv_bytes`)."""
    if not request.training:
        return 0.0
    held_output = 0 if keeps_model_outputs(2, 1) else block.model_output_bytes  # see keeps_model_outputs
    kept = block.kept_bytes(recompute, weights_in_compute_dtype(request, setting))
    if recompute == "none" or not block.recomputable:   # the expert weight copies: expert_copy_bytes
        kept = max(kept - block.expert_cast_bytes, 0)
    return kept + block.model_output_float32_bytes + held_output + gathered_kv_bytes(block, setting, recompute)


def loss_backward_bytes(block: Block) -> int:
    """Bytes the loss's backward holds at once, beyond what is saved (traced batch): cross-entropy's
    two float32 gradients of its logits' size (nll_loss's, then log_softmax's). With them (and
    attention priced as the fused kernel, passes/node_costs.py) the bf16 GPT 24×2048 on one H200
    at batch 32 comes out at 67.5 GiB against the 69 GiB `torch.cuda.max_memory_allocated`
    measured (REFERENCES.md)."""
    return 2 * block.model_output_float32_bytes


def loss_seconds(block: Block, device, scale: float, request) -> tuple[float, float]:
    """(forward, backward) seconds of the loss on the block's model outputs: cross-entropy, as
    assumed for memory. With F the float32 size of the logits, it streams about 3F forward
    (the float32 conversion, log-softmax's read and write) and 5F backward (nll_loss's
    gradient written, log-softmax's backward reading 2F and writing F, the conversion back),
    memory bound at the device's achieved bandwidth. 0 for blocks without outputs and for
    inference."""
    if not block.model_output_float32_bytes or not request.training:
        return 0.0, 0.0
    per_byte = block.model_output_float32_bytes * scale / device.achieved_bandwidth
    return 3 * per_byte, 5 * per_byte


def returned_output_bytes(block: Block, request, num_microbatches: int, scale: float, keeps: bool = True) -> float:
    """Model outputs of every microbatch, which the last stage keeps until the training step
    returns them all (torch.distributed.pipelining merges them at the end); 0 for inference,
    and 0 when the runtime does not keep them (`keeps_model_outputs`)."""
    return block.model_output_bytes * scale * num_microbatches if request.training and keeps else 0.0


def keeps_model_outputs(num_stages: int, dp: int) -> bool:
    """Whether the runtime keeps every microbatch's model output to the step's end. It does not:
    one stage with replicas is driven microbatch by microbatch (runtime/distributed.py, each output
    freed by its backward), and a pipelining schedule computes the loss per microbatch on the last
    stage and returns no outputs (`step(return_outputs=False)`), so an output lives only while its
    microbatch is in flight, as the activations it is part of. Only a torch whose schedules cannot
    do that keeps them all (`schedule_keeps_outputs`)."""
    if num_stages == 1 and dp > 1:
        return False
    return schedule_keeps_outputs()


def recompute_transient_bytes(block: Block, request, setting: Setting, recompute: str) -> float:
    """Bytes a recomputed block rebuilds for its own backward (traced batch): what 'none' would keep
    less what `recompute` keeps. One block at a time, so a stage reserves its largest."""
    if not request.training or recompute == "none":
        return 0.0
    keep_all = block.kept_bytes("none", weights_in_compute_dtype(request, setting))
    return max(0.0, float(keep_all - block.kept_bytes(recompute, weights_in_compute_dtype(request, setting))))


def fsdp_unit_bytes(blocks: Sequence[Block], request, setting: Setting) -> tuple[float, float]:
    """(gathered parameters, unreduced gradients) ZeRO-3 holds for a stage's FSDP units beyond the
    shards: the parameters of the unit computing and of the one prefetched (FSDP2's default
    prefetch depth of one), and the gradients of the unit whose backward just ran (before its
    reduce-scatter frees them); (0, 0) without ZeRO-3."""
    if not request.training or not reshards_parameters(setting.mode) or setting.shards == 1:
        return 0.0, 0.0
    held = [_fsdp_unit_held(b, setting) for b in blocks]
    sizes = sorted((p for p, _ in held), reverse=True)
    gathered = sum(sizes[:2]) * unsharded_fraction(request, setting)
    return gathered, float(max((gradient_bytes(t) for _, t in held), default=0))


def _fsdp_unit_held(block: Block, setting: Setting) -> tuple[float, float]:
    """(parameter, trainable parameter) bytes FSDP gathers for a block's unit: all of them; under expert
    parallelism its dense part and, where FSDP shards the experts over edp, its E / ep experts."""
    if setting.ep == 1:
        return float(block.param_bytes), float(block.trainable_param_bytes)
    kept = 1 - (1 / setting.ep if experts_sharded_over_edp(setting) else 0.0)
    return (block.param_bytes - block.expert_param_bytes * kept,
            block.trainable_param_bytes - block.expert_trainable_param_bytes * kept)


def fsdp_unit_transient_bytes(blocks: Sequence[Block], request, setting: Setting) -> float:
    """All `fsdp_unit_bytes` together: what a stage reserves once for its units."""
    return sum(fsdp_unit_bytes(blocks, request, setting))


def recompute_seconds(block: Block, device: str, recompute: str, scale: float, schedule: str) -> float:
    """Forward a recomputed block replays per microbatch (s): the whole forward for 'full', the ops
    'selective' does not keep otherwise. Zero bubble's split backward (input gradients, later
    weight gradients: two autograd passes) replays it in each."""
    replay = block.recompute_time_on(device, recompute).fwd(scale)
    return 2 * replay if schedule == "zero_bubble" else replay


def unique_parameters(blocks: Sequence[Block]) -> list[tuple[str, int, bool, int]]:
    """(name, bytes, trainable, elements) of the parameters some block of `blocks` reads, each once."""
    return list({entry[0]: entry for block in blocks for entry in block.parameters}.values())


def optimizer_seconds(graph: BlockGraph, cluster: Cluster, request, problem, solution, setting: Setting) -> float:
    """The optimizer step after the last backward, the slowest rank's: the bytes it streams
    (`cost_models.optimizer_step_bytes`; a 1/dp_shard shard under FSDP) at the device's achieved
    bandwidth. The step is not overlapped with anything."""
    if not request.training:
        return 0.0
    slowest = 0.0
    for rank in range(problem.num_ranks):
        stages = set(range(rank, problem.num_stages, problem.num_ranks))
        members = [graph.blocks[b] for b, stage in enumerate(solution.stage_of_block) if stage in stages]
        trainable = sum(b for _, b, train, _ in unique_parameters(members) if train)
        moved = optimizer_step_bytes(trainable, request.optimizer) / setting.shards
        slowest = max(slowest, moved / cluster.devices[rank].achieved_bandwidth)
    return slowest


