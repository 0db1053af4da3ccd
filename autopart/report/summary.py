"""Facts the text and HTML reports share, derived from the Plan alone.

Everything here reads a `Plan` and returns plain strings or numbers: which
blocks a stage holds in short form, the schedule's text grid, why the planner
did not pick another stage count, what the idle devices could do, and how each
layer is split across a tensor-parallel group.
"""

from __future__ import annotations

import re
from collections import defaultdict

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


def abbreviate_blocks(blocks: tuple[str, ...] | list[str], max_items: int = 6) -> str:
    """Block names, first to last, with runs of numbered layers folded.

    ('transformer.h.0', ..., 'transformer.h.5') -> 'transformer.h.0 … transformer.h.5 (6 blocks)'.
    """
    blocks = list(blocks)
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
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items())) + f" (stage {stage.index}, tp={plan.mesh.tp})"


def tensor_parallel_summary(plan: Plan) -> str:
    """One line for the whole plan: 'none (tp=1)' or the group size."""
    if plan.mesh.tp == 1:
        return "none (tp=1)"
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
    if experts.ep > 1:
        return (f"{what}; split over ep={experts.ep} replicas: {experts.per_rank} experts per rank "
                "(weights sharded on the expert dim), tokens routed to them by all-to-all")
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


def depth_label(plan: Plan) -> str:
    """'4 stages', or '2 pipeline ranks' when each rank runs several (virtual) stages."""
    return plural(plan.mesh.pp, "stage" if plan.virtual_stages == 1 else "pipeline rank")


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
        return f"{change} step time ({why}; best at m={best.num_microbatches}, {best.schedule})"
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
    shape = f"{plan.mesh.pp}-rank pipeline" if plan.virtual_stages > 1 else f"{plan.mesh.pp}-stage pipeline"
    if replicas >= 1:
        could = f"they could hold {plural(replicas, 'more data-parallel replica')} of this {shape}"
    else:
        could = f"too few to hold another replica of this {shape}"
    return [f"{head}: {why}; {could}"]


def memory_line(stage: StagePlan) -> str:
    """'5.40 MiB of 74.5 GiB (<0.01%)'."""
    mem = stage.memory
    return f"{fmt_bytes(mem.total)} of {fmt_bytes(mem.capacity)} ({fmt_percent(mem.total / mem.capacity)})"
