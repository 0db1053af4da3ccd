"""Facts the text and HTML reports share, derived from the Plan alone.

Everything here reads a `Plan` and returns plain strings or numbers: which
blocks a stage holds in short form, the schedule's text grid, why the planner
did not pick another stage count, what the idle devices could do, and how each
layer is split across a tensor-parallel group.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from autopart.axes import AXES
from autopart.core.plan import QUIET_STRATEGIES, Candidate, Plan, StagePlan
from autopart.core.units import fmt_seconds, fmt_bytes, fmt_percent, fmt_ranges, plural
from autopart.core.schedules import Action, bubble_fraction, build_schedule, grid, peak_in_flight, timeline

MEMORY_KINDS = ("params", "grads", "optimizer", "buffers", "activations", "boundary")
"""StageMemory fields, in the order reports stack them."""


def precision_label(plan: Plan) -> str:
    """How the plan computes: 'bf16 autocast over float32 state' or the model's own dtypes."""
    if plan.mixed_precision == "bf16":
        return "bf16 mixed precision (autocast over float32 parameters and optimizer state)"
    return "model's own precision"


def step_parts(plan: Plan) -> list[tuple[str, float]]:
    """The predicted step's parts, which add up to `predicted_step_seconds`: the pipeline's step (the
    solver's objective: the schedule's slots × the slowest stage, tp collectives inside the stages'
    times), the exposed data-parallel synchronisation and the optimizer step. A plan of schema 3 did
    not store the last two: what the step has beyond the pipeline is then one part."""
    pipeline = plan.solver.objective_seconds
    parts = [("pipeline", pipeline)]
    itemised = plan.data_parallel_sync_seconds + plan.optimizer_seconds
    if plan.data_parallel_sync_seconds > 0:
        parts.append(("data-parallel sync", plan.data_parallel_sync_seconds))
    if plan.optimizer_seconds > 0:
        parts.append(("optimizer step", plan.optimizer_seconds))
    rest = plan.predicted_step_seconds - pipeline - itemised
    if rest > 1e-9 * max(plan.predicted_step_seconds, 1e-30):
        parts.append(("sync and optimizer (not itemised)", rest))
    return parts


def kernels_label(plan: Plan) -> str:
    """How each rank runs its graph: TorchInductor's fused kernels or op by op."""
    if plan.compile_kernels:
        return "kernels compiled by TorchInductor (each distinct block once, priced as fused kernels)"
    return "op by op (eager kernels)"


def is_training(plan: Plan) -> bool:
    """True when the plan prices a backward pass (inference plans have no bwd work)."""
    return any(s.bwd_seconds > 0 or s.bwd_flops > 0 for s in plan.stages)


def cluster_label(plan: Plan) -> str:
    """'4 × H100' or '2 × H100 + 2 × A100-80GB'."""
    names = [d["name"] for d in plan.cluster["devices"]]
    runs: list[list] = []
    for name in names:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return " + ".join(f"{count} × {name}" for name, count in runs)


def model_name(plan: Plan) -> str:
    """Class name without its module: 'GPT2LMHeadModel'."""
    return plan.model_class.rsplit(".", 1)[-1]


def mesh_label(plan: Plan) -> str:
    """Each axis's part in the rank layout's order (autopart/axes/), e.g. 'dp=1 × pp=4 × tp=1 (4 of 8
    devices)', or 'dp=2 zero2 × pp=2 (2 stages each) × tp=1 (4 of 4 devices)'."""
    total = len(plan.cluster["devices"])
    parts = " × ".join(part for part in (axis.describe(plan) for axis in AXES.values()) if part)
    return f"{parts} ({plan.mesh.num_devices} of {plural(total, 'device')})"


def devices_of_stage(plan: Plan, stage: StagePlan) -> list[int]:
    """Every device that runs `stage`: its tensor-parallel group in every data-parallel replica."""
    return plan.mesh.devices_of(stage.index % plan.mesh.pp)


def used_devices(plan: Plan) -> list[int]:
    """The devices the plan runs on, all stages' tp groups and replicas."""
    return sorted({d for stage in plan.stages for d in devices_of_stage(plan, stage)})


DATA_PARALLEL_LABELS = {
    "ddp": "DDP: every replica holds the whole state, gradients all-reduced",
    "zero2": "ZeRO-2 (FSDP2, parameters kept gathered through the step): optimizer state, master weights "
             "and gradients sharded",
    "zero3": "ZeRO-3 (FSDP2, each block's parameters gathered for its forward and backward, then freed): "
             "all state sharded",
    "hsdp": "HSDP (FSDP2 on a 2-D mesh): ZeRO-3 within each host, replicated across hosts",
}


def data_parallel_summary(plan: Plan) -> str:
    """How the replicas hold the state: 'zero3 — ZeRO-3 (…): all state sharded 4 ways'."""
    mode = plan.data_parallel_mode
    ways = f", {plan.mesh.dp_shard} ways" if plan.mesh.dp_shard > 1 else ""
    return f"{mode}, {DATA_PARALLEL_LABELS.get(mode, mode)}{ways}"


def recompute_summary(plan: Plan) -> str:
    """What the plan recomputes and what it costs: 'none', or '20 full, 4 none: 93.1 ms of forward
    replayed per step'."""
    modes = [m for s in plan.stages for m in (s.recompute or ("none",) * len(s.blocks))]
    if all(m == "none" for m in modes):
        return "none (every block keeps its activations)"
    counts = ", ".join(f"{modes.count(m)} {m}" for m in ("full", "selective", "none") if m in modes)
    replay = sum(s.recompute_seconds for s in plan.stages) * plan.num_microbatches
    return (f"{counts} of {len(modes)} blocks; {fmt_seconds(replay)} of forward replayed per step "
            "(all stages, all microbatches)")


# ----------------------------------------------------------------------------- blocks

_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_PART = re.compile(r"^(.*)#(\d+)$")


def block_label(name: str) -> str:
    """A block's name as the reports print it: 'transformer#2' (the second run of ops of module
    `transformer` directly, after its numbered layers) reads 'transformer (part 2)'."""
    match = _PART.match(name)
    return f"{match.group(1)} (part {match.group(2)})" if match else name


def parts_note(plan: Plan) -> str:
    """What '(part k)' means, when a plan has such blocks; else ''."""
    parted = sorted({_PART.match(b).group(1) for s in plan.stages for b in s.blocks if _PART.match(b)})
    if not parted:
        return ""
    return (f"'{parted[0]} (part 2)': ops of {parted[0]} outside its numbered layers, those after them "
            "('part 1': before them)")


def abbreviate_blocks(blocks: tuple[str, ...] | list[str], max_items: int = 6) -> str:
    """Block names, first to last, with runs of numbered layers folded.

    ('transformer.h.0', ..., 'transformer.h.5') -> 'transformer.h.0 … transformer.h.5 (6 blocks)'.
    """
    blocks = [block_label(b) for b in blocks]
    if not blocks:
        return "(no blocks)"
    items: list[str] = []
    i = 0
    while i < len(blocks):
        j = i
        match = _NUMBERED.match(blocks[i])
        while match and j + 1 < len(blocks):
            nxt = _NUMBERED.match(blocks[j + 1])
            if not nxt or nxt.group(1) != match.group(1) or int(nxt.group(2)) != int(match.group(2)) + (j + 1 - i):
                break
            j += 1
        items.append(f"{blocks[i]} … {blocks[j]}" if j - i >= 2 else ", ".join(blocks[i:j + 1]))
        i = j + 1
    if len(items) > max_items:
        return f"{blocks[0]} … {blocks[-1]} ({plural(len(blocks), 'block')})"
    text = ", ".join(items)
    return text if len(blocks) <= 2 else f"{text} ({plural(len(blocks), 'block')})"


def tensor_parallel_split(plan: Plan, stage: StagePlan, block: str) -> str:
    """How the ops of `stage` are split across its tensor-parallel group.

    Counts the strategies the tp ILP chose for the stage's ops (colwise,
    rowwise, heads, vocab, ...); views that follow a split and replicated ops
    are left out. The Plan keeps placements per node, so the count is per stage.
    """
    if plan.mesh.tp == 1 or not plan.tensor_parallel:
        return "none"
    nodes = plan.tensor_parallel.nodes
    counts: dict[str, int] = {}
    for name in stage.node_names:
        split = nodes.get(name)
        strategy = split.strategy if split is not None else "replicate"
        if strategy not in QUIET_STRATEGIES:
            counts[strategy] = counts.get(strategy, 0) + 1
    by_block = plan.tensor_parallel.block_strategies
    if not stage.node_names and by_block:  # a layer stack analysed once: counted per block
        for name in stage.blocks:
            for strategy, count in by_block.get(name, {}).items():
                counts[strategy] = counts.get(strategy, 0) + count
    if not counts:
        return f"replicated on tp={plan.mesh.tp}"
    return (", ".join(f"{k} ×{v} ops" for k, v in sorted(counts.items()))
            + f" (stage {stage.index}, tp={plan.mesh.tp})")


TP_COUNT_NOTE = ("'colwise ×N ops': N ops of the stage split by output features over the tp group; "
                 "'rowwise': by input features (partial sums all-reduced)")
"""What the counts of `tensor_parallel_split` count."""


def splits_nothing(plan: Plan) -> bool:
    """True when the plan has a tp group but no op of any stage is split: its devices do identical work."""
    return plan.mesh.tp > 1 and all(tensor_parallel_split(plan, s, b).startswith("replicated")
                                    for s in plan.stages for b in s.blocks[:1])


def tensor_parallel_summary(plan: Plan) -> str:
    """One line for the whole plan: 'none (tp=1)' or the group size, whether the activations between
    split regions are sequence-sharded, and a warning when it splits nothing."""
    if plan.mesh.tp == 1:
        return "none (tp=1)"
    if splits_nothing(plan):
        return (f"tp={plan.mesh.tp} per stage, but no op is split: the {plan.mesh.tp} devices of each group do "
                "identical work (replicated); tensor_parallel=1 frees them")
    if plan.tensor_parallel is not None and plan.tensor_parallel.sequence_parallel:
        return (f"tp={plan.mesh.tp} per stage, sequence parallel (norms, residuals, dropout on 1/{plan.mesh.tp} "
                "of the tokens: reduce-scatter and all-gather for each all-reduce)")
    return f"tp={plan.mesh.tp} per stage"


def experts_summary(plan: Plan) -> str | None:
    """One line on the mixture-of-experts layers: which, and how their experts are held (None without)."""
    experts = plan.experts
    if experts is None:
        return None
    layers = experts.layers
    names = ", ".join(layers) if len(layers) <= 3 else f"{layers[0]} … {layers[-1]}"
    what = (f"{plural(len(layers), 'expert layer')} ({names}), {experts.num_experts} experts each, "
            f"{fmt_bytes(experts.weight_bytes)} of expert weights")
    split = (f"; each expert split over tp={experts.tp} (expert tensor parallelism: gate/up by columns, down by "
             "rows, the sum reduced after)" if experts.tp > 1 else "")
    if experts.ep > 1:
        return (f"{what}; split over ep={experts.ep} replicas: {experts.per_rank} experts per rank "
                f"(weights sharded on the expert dim), tokens routed to them by all-to-all{split}")
    if experts.tp > 1:
        return f"{what}; every rank holds all experts (expert_parallel=1){split}"
    tp_note = " (tensor parallelism leaves them whole)" if plan.mesh.tp > 1 else ""
    return f"{what}; replicated: every rank holds all experts{tp_note} (expert_parallel=1)"


# ----------------------------------------------------------------------------- schedule

def schedule_slots(plan: Plan) -> list[list[Action | None]]:
    """The plan's schedule played in lock-step (one action per slot)."""
    training = is_training(plan)
    return timeline(_schedule(plan, training), plan.num_microbatches, training)


def _schedule(plan: Plan, training: bool):
    return build_schedule(plan.schedule, plan.mesh.pp, plan.num_microbatches, training, plan.virtual_stages)


def in_flight(plan: Plan) -> list[int]:
    """Per stage, the most microbatches whose activations it holds at once under the schedule."""
    counts = peak_in_flight(_schedule(plan, is_training(plan)))
    return [counts.get(s, 0) for s in range(plan.num_stages)]


def schedule_grid(plan: Plan, max_slots: int = 28, tail_slots: int = 6) -> str:
    """The text grid of the schedule; long ones keep the first and last slots with '…' between."""
    slots = schedule_slots(plan)
    show_stage = plan.virtual_stages > 1
    if len(slots) <= max_slots:
        return grid(slots, show_stage)
    head = grid(slots[:max_slots - tail_slots], show_stage).splitlines()
    tail = grid(slots[-tail_slots:], show_stage).splitlines()
    hidden = len(slots) - max_slots
    lines = [f"{h}  …  {t.split(': ', 1)[1]}" for h, t in zip(head, tail)]
    return "\n".join(lines) + f"\n({hidden} of {len(slots)} slots not shown)"


def counts_ranks(plan: Plan) -> bool:
    """True when a pipeline rank may run several stages in this plan or a candidate: counts then name ranks."""
    return plan.virtual_stages > 1 or any(c.virtual_stages > 1 for c in plan.candidates)


def depth_label(plan: Plan, count: int | None = None) -> str:
    """'4 stages', or '2 pipeline ranks' when a rank runs several (virtual) stages here or in a candidate."""
    return plural(plan.mesh.pp if count is None else count, "pipeline rank" if counts_ranks(plan) else "stage")


# ----------------------------------------------------------------------------- candidates

def stage_count_notes(plan: Plan) -> list[tuple[int, str]]:
    """Why not another stage count: (stage count, reason), one per count tried other than the chosen.

    '4 stages: +12% step time (bubble 43% vs 0%)'; '2 stages: infeasible: stage 0 short by 3.1 GiB'.
    """
    chosen_step = plan.predicted_step_seconds
    by_count: dict[int, list[Candidate]] = defaultdict(list)
    for c in plan.candidates:
        by_count[c.pipeline_parallel].append(c)
    notes = []
    for count in sorted(by_count):
        if count == plan.mesh.pp:
            continue
        notes.append((count, _reason(plan, count, by_count[count], chosen_step)))
    return notes


def _reason(plan: Plan, count: int, tried: list[Candidate], chosen_step: float) -> str:
    feasible = [c for c in tried if c.step_seconds is not None]
    infeasible = [c for c in tried if c.status == "infeasible"]
    pruned = [c for c in tried if c.status == "pruned"]
    if feasible:
        best = min(feasible, key=lambda c: c.step_seconds)
        slower = best.step_seconds / chosen_step - 1 if chosen_step > 0 else 0.0
        if count > plan.mesh.pp:
            bubble = bubble_fraction(best.schedule, count, best.num_microbatches, best.virtual_stages)
            why = (f"bubble {fmt_percent(bubble)} vs "
                   f"{fmt_percent(plan.bubble_fraction)}, more boundary traffic")
        else:
            why = f"less parallelism; {best.detail.split(';')[0]}"
        change = f"{slower:+.1%}" if abs(slower) < 0.1 else f"{slower:+.0%}"
        virtual = (f" v={best.virtual_stages} ({best.pipeline_parallel * best.virtual_stages} stages)"
                   if best.virtual_stages > 1 else "")
        return f"{change} step time ({why}; best at m={best.num_microbatches}, {best.schedule}{virtual})"
    if infeasible:
        extra = f"; {len(pruned)} other choices pruned" if pruned else ""
        return f"infeasible: {infeasible[0].detail}{extra}"
    if pruned:
        return f"pruned: cannot beat the chosen plan ({pruned[0].detail})"
    return "not tried"


def idle_notes(plan: Plan) -> list[str]:
    """What the devices the plan leaves unused are doing, and what they could do."""
    idle = list(plan.idle_devices)
    if not idle:
        return []
    counts = {c.pipeline_parallel for c in plan.candidates}
    pipeline = plan.mesh.pp * plan.mesh.tp
    replicas = len(idle) // pipeline if pipeline else 0
    head = f"{plural(len(idle), 'device')} ({fmt_ranges(idle)}) idle"
    num_blocks = sum(len(s.blocks) for s in plan.stages)
    if counts == {plan.mesh.pp}:
        why = f"the stage count was fixed at {plan.mesh.pp}"
    elif max(counts, default=0) >= num_blocks and plan.num_stages == num_blocks:
        why = f"the model splits into only {plural(num_blocks, 'block')}, one per stage"
    else:
        why = f"a faster plan uses {depth_label(plan)}"
    shape = f"{plan.mesh.pp}-rank pipeline" if counts_ranks(plan) else f"{plan.mesh.pp}-stage pipeline"
    if replicas >= 1:
        could = f"they could hold {plural(replicas, 'more data-parallel replica')} of this {shape}"
    else:
        could = f"too few to hold another replica of this {shape}"
    return [f"{head}: {why}; {could}"]


def memory_line(plan: Plan, stage: StagePlan) -> str:
    """'5.40 MiB of 74.5 GiB (<0.01%)'; with virtual stages, of the stage's share of its device."""
    mem = stage.memory
    line = f"{fmt_bytes(mem.total)} of {fmt_bytes(mem.capacity)} ({fmt_percent(mem.total / mem.capacity)})"
    if plan.virtual_stages > 1:
        device = device_capacity(plan, stage.device)
        line = (f"{fmt_bytes(mem.total)} of its {fmt_bytes(mem.capacity)} share, 1/{plan.virtual_stages} of "
                f"device {stage.device}'s {fmt_bytes(device)} ({fmt_percent(mem.total / mem.capacity)} of the share)")
    return line


def device_capacity(plan: Plan, device: int) -> int:
    """Memory of device `device`, bytes (the plan's cluster)."""
    return int(plan.cluster["devices"][device]["memory_bytes"])


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    """What one pipeline rank's devices hold: the sum of its stages' peaks, by kind, against the whole device."""

    rank: int
    stages: tuple[int, ...]
    devices: tuple[int, ...]
    """Every device that runs this rank (its tp group in every replica): each holds what the row shows."""
    device_name: str
    kinds: dict[str, int]
    """`MEMORY_KINDS` -> bytes, summed over the rank's stages (`StageMemory` fields)."""
    capacity: int
    """One device's memory (the plan's cluster)."""

    @property
    def total(self) -> int:
        return sum(self.kinds.values())


def device_memory(plan: Plan) -> list[DeviceMemory]:
    """One row per pipeline rank (a device with several virtual stages is one row): the sum of its
    stages' peak bytes, which the planner holds within the device (each stage within 1/v of it)."""
    rows = []
    for rank in range(plan.mesh.pp):
        stages = [plan.stages[s] for s in plan.stages_of_rank(rank)]
        kinds = {kind: sum(getattr(s.memory, kind) for s in stages) for kind in MEMORY_KINDS}
        rows.append(DeviceMemory(rank=rank, stages=tuple(s.index for s in stages),
                                 devices=tuple(devices_of_stage(plan, stages[0])), device_name=stages[0].device_name,
                                 kinds=kinds, capacity=device_capacity(plan, stages[0].device)))
    return rows
