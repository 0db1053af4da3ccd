"""The models, the data and the plain-PyTorch ways to train them, for benchmarks/gpu_compare.py.

A mode is a name, the number of processes it needs and a function that builds,
in each process, a `Trainer` (one training step on the global batch). The
plain modes are one function, `build_plain`, over a `Layout` (dp × pp × tp,
DDP or FSDP2, the pipeline schedule), so a new mesh is one line in
`plain_modes`. Nothing here imports autopart except `autopart.zoo` for the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autopart import zoo

# ---------------------------------------------------------------------------- presets


@dataclass(frozen=True, kw_only=True)
class Preset:
    """One model and its training setting."""

    name: str
    layers: int
    d_model: int
    heads: int
    vocab: int
    seq: int
    batch: int
    """Global batch: sequences per step over all replicas."""
    dtype: torch.dtype
    """The parameters' dtype (float32 master weights when `autocast`)."""
    autocast: bool
    """Compute in bfloat16 under torch.autocast (FSDP2: MixedPrecisionPolicy) over float32 weights."""
    optimizer: str
    """'sgd' or 'adamw' (fused)."""
    loss_rtol: float
    """Step-0 loss tolerance against one device, relative (see `loss_tolerance`)."""


def loss_tolerance(dtype: torch.dtype, autocast: bool) -> float:
    """Relative tolerance on the step-0 loss of a parallel run against one device.

    float32: the parallel runs only reorder sums (microbatches, all-reduces,
    sharded matmuls); reordering moves a float32 mean by about 1e-6 relative,
    so 1e-4 keeps a wide margin and still catches any real error (a wrong
    shard or a missing reduction moves the loss by 1e-2 or more on the tiny model).
    bfloat16 (weights or autocast): 8 mantissa bits, unit round-off 2^-8 ≈ 4e-3
    per op; another split (tp partial sums, another batch shape picking another
    matmul kernel) rounds every activation differently, through every layer.
    The errors mostly average out in the mean loss (about 1e-3 is typical), so
    2e-2 allows for that; at this tolerance the check catches gross errors only,
    the float32 run on the CPU is the exact proof.
    """
    return 2e-2 if (autocast or dtype != torch.float32) else 1e-4


def _preset(name: str, layers: int, d_model: int, heads: int, batch: int, dtype: torch.dtype, autocast: bool,
            optimizer: str, vocab: int = 32000, seq: int = 1024) -> Preset:
    return Preset(name=name, layers=layers, d_model=d_model, heads=heads, vocab=vocab, seq=seq, batch=batch,
                  dtype=dtype, autocast=autocast, optimizer=optimizer, loss_rtol=loss_tolerance(dtype, autocast))


PRESETS: dict[str, Preset] = {p.name: p for p in [
    # GPU presets (REFERENCES.md "Measured here: two H200s"); vocabulary 32000, untied head:
    # 217M, 1.34B and 8.3B parameters.
    _preset("small", 12, 1024, 16, 16, torch.bfloat16, False, "sgd"),
    _preset("large", 24, 2048, 16, 16, torch.bfloat16, False, "sgd"),
    _preset("tight", 40, 4096, 32, 8, torch.float32, True, "adamw"),
    # CPU proofs of the same code paths: float32 (exact), bf16 weights, fp32 + autocast + AdamW.
    _preset("tiny", 4, 64, 4, 8, torch.float32, False, "sgd", vocab=256, seq=32),
    _preset("tiny-bf16", 4, 64, 4, 8, torch.bfloat16, False, "sgd", vocab=256, seq=32),
    _preset("tiny-amp", 4, 64, 4, 8, torch.float32, True, "adamw", vocab=256, seq=32),
]}


def preset_dict(preset: Preset) -> dict[str, Any]:
    """The preset as JSON-ready values, with its parameter count (counted on the meta device)."""
    params = sum(p.numel() for p in build_gpt(preset).parameters())
    return {**{k: v for k, v in dataclasses.asdict(preset).items() if k != "dtype"},
            "dtype": str(preset.dtype).removeprefix("torch."), "parameters": params}


# ---------------------------------------------------------------------------- the model and its weights


def build_gpt(preset: Preset) -> nn.Module:
    """The zoo GPT on the meta device with an untied head, in the preset's dtype (no memory)."""
    model = zoo.gpt(layers=preset.layers, d_model=preset.d_model, heads=preset.heads, vocab=preset.vocab,
                    seq=preset.seq, batch=1, device="meta", attn_bias=False).model
    # zoo.gpt ties the head to the embedding; these benchmarks train an untied head.
    model.lm_head.weight = nn.Parameter(torch.empty_like(model.wte.weight))
    return model.to(preset.dtype)


def init_value(name: str, shape: torch.Size | tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    """The float32 initial value of parameter `name`, the same in every mode and process.

    Each tensor has its own generator seeded from its name, so a process can
    make any one tensor without making the others (a pipeline stage makes only
    its own). GPT-2's scheme: weights N(0, 0.02), biases 0, norm scales 1.
    """
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    if len(shape) == 1:
        return torch.ones(shape, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, device=device) * 0.02


def materialise(module: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta module on `device` and fill every parameter with `init_value` of its name."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(init_value(name, param.shape, device, seed))
    return module


class InitialState:
    """A read-only full state dict whose tensors are made on demand (for autopart's `state_dict=`)."""

    def __init__(self, shapes: dict[str, torch.Size], device: torch.device, seed: int) -> None:
        self.shapes, self.device, self.seed = shapes, device, seed

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return init_value(name, self.shapes[name], self.device, self.seed)


class GPTStage(nn.Module):
    """A contiguous part of the zoo GPT for one pipeline stage, under the original parameter names.

    Blocks live in a ModuleDict keyed by their index in the whole model
    ("blocks.6.mlp_fc.weight" stays that name on stage 1), so every stage
    initialises exactly as the whole model does.
    """

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        self.wte = model.wte if first else None
        self.wpe = model.wpe if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        self.ln_f = model.ln_f if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:  # x: token ids
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks.values():
            x = block(x)
        if self.lm_head is not None:
            x = self.lm_head(self.ln_f(x))
        return x


def stage_blocks(layers: int, pp: int, pp_rank: int) -> range:
    """A hand split: the blocks in equal contiguous runs (the first stages take one more if uneven)."""
    if layers < pp:
        raise ValueError(f"{layers} layers cannot fill {pp} pipeline stages; use a model with >= {pp} layers")
    base, extra = divmod(layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens, on float32 logits (the same in every mode)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def batches(preset: Preset, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` global batches of random token ids (ids, next-token labels), on the CPU, from one seed."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, preset.vocab, (preset.batch, preset.seq + 1), generator=generator)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


# ---------------------------------------------------------------------------- tensor parallelism


def _tp_attention_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The zoo block's forward on local shards: `heads` is this rank's head count and the
    qkv output holds this rank's q, k and v (see `tensor_parallel`)."""
    b, s, _ = x.shape
    q, k, v = block.attn_qkv(block.ln_1(x)).chunk(3, dim=-1)
    q, k, v = (t.view(b, s, block.heads, -1).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + block.attn_proj(y.transpose(1, 2).reshape(b, s, -1))
    return x + block.mlp_proj(F.gelu(block.mlp_fc(block.ln_2(x))))


def tensor_parallel(blocks: Iterable[nn.Module], mesh, heads: int) -> None:
    """Megatron's layout with DTensor: qkv and mlp_fc column-wise, attn_proj and mlp_proj row-wise.

    The zoo's fused qkv weight stacks [q; k; v] along its output rows; a plain
    column split would give rank 0 all of q and half of k. Its rows are
    reordered first to [q_0; k_0; v_0; q_1; k_1; v_1; ...] (rank r's heads), so
    each rank's contiguous shard is its own heads' q, k and v; the block then
    runs on heads / tp heads. Embeddings, norms and the head stay replicated.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    if heads % tp:
        raise ValueError(f"{heads} attention heads do not split over tp={tp}; use a tp size dividing {heads}")
    plan = {"attn_qkv": ColwiseParallel(), "attn_proj": RowwiseParallel(),
            "mlp_fc": ColwiseParallel(), "mlp_proj": RowwiseParallel()}
    for block in blocks:
        with torch.no_grad():
            weight = block.attn_qkv.weight
            d_in = weight.shape[1]
            weight.copy_(weight.view(3, tp, -1, d_in).transpose(0, 1).reshape(-1, d_in))
            if block.attn_qkv.bias is not None:
                bias = block.attn_qkv.bias
                bias.copy_(bias.view(3, tp, -1).transpose(0, 1).reshape(-1))
        parallelize_module(block, mesh, plan)
        block.heads = heads // tp
        block.forward = types.MethodType(_tp_attention_forward, block)


# ---------------------------------------------------------------------------- plain modes


@dataclass(frozen=True, kw_only=True)
class Context:
    """What a worker process knows when it builds a mode."""

    preset: Preset
    rank: int
    world_size: int
    device: torch.device
    seed: int
    timeout_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    """Mode-specific inputs from the parent (autopart: the calibrated cluster)."""


@dataclass(kw_only=True)
class Trainer:
    """One process's share of a mode: `step(ids, labels)` trains on the global batch and returns
    this rank's loss over its share (None where the rank computes no loss: inner pipeline stages)."""

    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
    mesh: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)
    reference_loss: Callable[[torch.Tensor, torch.Tensor], float] | None = None
    """One device only: the loss without training (no grad), for when training runs out of memory."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A plain-PyTorch parallel layout: dp × pp × tp processes."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    dp_kind: str = "ddp"
    """'ddp' (DistributedDataParallel) or 'fsdp' (FSDP2 fully_shard per block, then the root)."""
    schedule: str = "1f1b"
    """'gpipe' or '1f1b' when pp > 1."""
    microbatches: int = 8

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp


@dataclass(frozen=True, kw_only=True)
class Mode:
    """A way to train: its name, how many processes it takes and how each builds its Trainer."""

    name: str
    nproc: int
    build: Callable[[Context], Trainer]
    layout: Layout | None = None


def plain_modes(n: int) -> list[Mode]:
    """The plain-PyTorch peers for `n` processes: one device first (the reference), then the rest."""
    layouts: dict[str, Layout] = {"single": Layout()}
    if n > 1:
        layouts |= {"ddp": Layout(dp=n), "fsdp2": Layout(dp=n, dp_kind="fsdp"),
                    "pp_gpipe": Layout(pp=n, schedule="gpipe"), "pp_1f1b": Layout(pp=n, schedule="1f1b"),
                    "tp": Layout(tp=n)}
    if n >= 4 and n % 2 == 0:  # the 2-D meshes
        layouts |= {f"pp2_tp{n // 2}": Layout(pp=2, tp=n // 2), f"dp{n // 2}_pp2": Layout(dp=n // 2, pp=2),
                    f"fsdp{n // 2}_tp2": Layout(dp=n // 2, tp=2, dp_kind="fsdp")}
    return [Mode(name=name, nproc=layout.world_size, layout=layout,
                 build=lambda ctx, layout=layout: build_plain(ctx, layout)) for name, layout in layouts.items()]


def build_plain(ctx: Context, layout: Layout) -> Trainer:
    """Build `layout` in this process: its part of the model, materialised, sharded, wrapped."""
    preset = ctx.preset
    if layout.world_size != ctx.world_size:
        raise ValueError(f"layout dp={layout.dp} pp={layout.pp} tp={layout.tp} needs {layout.world_size} "
                         f"processes, got {ctx.world_size}")
    mesh = _device_mesh(ctx, layout)
    coord = {name: (mesh[name].get_local_rank() if mesh is not None and size > 1 else 0)
             for name, size in (("dp", layout.dp), ("pp", layout.pp), ("tp", layout.tp))}
    model = build_gpt(preset)
    if layout.pp > 1:
        model = GPTStage(model, stage_blocks(preset.layers, layout.pp, coord["pp"]),
                         first=coord["pp"] == 0, last=coord["pp"] == layout.pp - 1)
    model = materialise(model, ctx.device, ctx.seed)
    blocks = list(model.blocks.values()) if isinstance(model.blocks, nn.ModuleDict) else list(model.blocks)
    if layout.tp > 1:
        tensor_parallel(blocks, mesh["tp"], preset.heads)
    mixed = preset.autocast and layout.dp > 1 and layout.dp_kind == "fsdp"  # FSDP2 casts, autocast does not
    if layout.dp > 1:
        model = _data_parallel(model, blocks, mesh["dp"], layout, ctx.device, mixed)
    optimizers = make_optimizers(model.parameters(), preset)
    share = preset.batch // layout.dp
    if share * layout.dp != preset.batch:
        raise ValueError(f"global batch {preset.batch} does not split over dp={layout.dp}")
    rows = slice(coord["dp"] * share, (coord["dp"] + 1) * share)
    autocast = _autocast(ctx.device) if preset.autocast and not mixed else contextlib.nullcontext
    mesh_sizes = {"dp": layout.dp, "pp": layout.pp, "tp": layout.tp}
    if layout.pp > 1:
        step = _pipeline_step(ctx, layout, model, coord["pp"], mesh["pp"].get_group(), optimizers, rows,
                              autocast, mixed)
        return Trainer(step=step, mesh=mesh_sizes, info={"schedule": layout.schedule, "microbatches":
                       min(layout.microbatches, share), "dp_kind": layout.dp_kind if layout.dp > 1 else None})

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(ids[rows])
        loss = loss_fn(logits, labels[rows])
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        return loss.detach()

    reference = _reference_loss(model, optimizers, autocast) if layout.world_size == 1 else None
    return Trainer(step=step, mesh=mesh_sizes, reference_loss=reference,
                   info={"dp_kind": layout.dp_kind if layout.dp > 1 else None})


def _device_mesh(ctx: Context, layout: Layout):
    """A DeviceMesh over the axes of size > 1 (dp, pp, tp in that order; tp innermost), or None."""
    from torch.distributed.device_mesh import init_device_mesh

    axes = [(name, size) for name, size in (("dp", layout.dp), ("pp", layout.pp), ("tp", layout.tp)) if size > 1]
    if not axes:
        return None
    return init_device_mesh(ctx.device.type, tuple(s for _, s in axes), mesh_dim_names=tuple(n for n, _ in axes))


def _autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _data_parallel(model: nn.Module, blocks: list[nn.Module], mesh, layout: Layout, device: torch.device,
                   mixed: bool) -> nn.Module:
    """DDP over the dp group, or FSDP2: each block its own unit, then the root (embeddings, head)."""
    if layout.dp_kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed \
            else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)
    if layout.dp_kind != "ddp":
        raise ValueError(f"dp_kind {layout.dp_kind!r}: use 'ddp' or 'fsdp'")
    if layout.tp > 1:
        raise ValueError("DDP does not take DTensor parameters; combine tp with dp_kind='fsdp'")
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: gradients live in DDP's buckets, not in a second copy
    return DistributedDataParallel(model, process_group=mesh.get_group(), gradient_as_bucket_view=True,
                                   device_ids=[device] if device.type == "cuda" else None)


def _pipeline_step(ctx: Context, layout: Layout, stage_module: nn.Module, pp_rank: int, group,
                   optimizers: list[torch.optim.Optimizer], rows: slice, autocast, mixed: bool):
    """torch.distributed.pipelining on a hand split: one PipelineStage per rank, GPipe or 1F1B."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    preset = ctx.preset
    share = rows.stop - rows.start
    m = min(layout.microbatches, share)
    if share % m:
        raise ValueError(f"{share} sequences per replica do not split into {m} microbatches")
    micro = share // m
    # Static shapes and dtypes, so PipelineStage needs no shape inference. Under autocast the
    # residual stream stays float32 (embedding + bf16 projections promote) and the logits are bf16;
    # under FSDP2's bf16 parameters everything is bf16.
    act_dtype = torch.bfloat16 if mixed else (torch.float32 if preset.autocast else preset.dtype)
    logits_dtype = torch.bfloat16 if preset.autocast else preset.dtype
    # requires_grad marks what flows back: torch 2.13 makes receive buffers (and so the
    # gradients sent back) only for inputs that require it.
    hidden = torch.empty(micro, preset.seq, preset.d_model, dtype=act_dtype, device=ctx.device, requires_grad=True)
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    inputs = torch.zeros(micro, preset.seq, dtype=torch.long, device=ctx.device) if first else hidden
    outputs = torch.empty(micro, preset.seq, preset.vocab, dtype=logits_dtype, device=ctx.device) if last \
        else hidden
    stage = PipelineStage(stage_module, pp_rank, layout.pp, ctx.device, input_args=(inputs,),
                          output_args=(outputs,), group=group)
    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[layout.schedule]
    schedule = schedule_class(stage, n_microbatches=m, loss_fn=loss_fn)
    # The last stage need not keep every microbatch's logits for us (torch >= 2.12 lets it drop them).
    keep = {"return_outputs": False} if "return_outputs" in inspect.signature(schedule.step).parameters else {}

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        with autocast():
            if first:
                schedule.step(ids[rows], **keep)
            elif last:
                schedule.step(target=labels[rows], losses=losses, **keep)
            else:
                schedule.step(**keep)
        for optimizer in optimizers:
            optimizer.step()
        return torch.stack(losses).mean().detach() if last else None

    return step


def _reference_loss(model: nn.Module, optimizers: list[torch.optim.Optimizer], autocast):
    """The loss of one forward without gradients, after dropping gradients and optimizer state:
    the one-device reference when one device cannot train the model."""

    def run(ids: torch.Tensor, labels: torch.Tensor) -> float:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with torch.no_grad(), autocast():
            return loss_fn(model(ids), labels).item()

    return run


def make_optimizers(params: Iterable[torch.nn.Parameter], preset: Preset) -> list[torch.optim.Optimizer]:
    """The preset's optimizer, one instance per kind of parameter.

    Fused AdamW and foreach SGD take one list of tensors per call, and a list
    may not mix DTensors (tp, FSDP2) with plain tensors or DTensors of two
    meshes; one optimizer per (type, mesh) keeps each call uniform.
    """
    groups: dict[Any, list[torch.nn.Parameter]] = {}
    for param in params:
        mesh = getattr(param, "device_mesh", None)
        key = (type(param).__name__, None if mesh is None else (mesh.mesh_dim_names, tuple(mesh.mesh.flatten().tolist())))
        groups.setdefault(key, []).append(param)
    if preset.optimizer == "sgd":
        return [torch.optim.SGD(group, lr=1e-2) for group in groups.values()]
    if preset.optimizer == "adamw":
        return [torch.optim.AdamW(group, lr=1e-4, fused=True) for group in groups.values()]
    raise ValueError(f"optimizer {preset.optimizer!r}: use 'sgd' or 'adamw'")


def local_loss_value(loss: torch.Tensor | None) -> float | None:
    """A rank's loss as a float (a collective-free read)."""
    return None if loss is None else float(loss.float().item())


def barrier() -> None:
    """Align the ranks before a timed step (a no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
