"""The named choices of a plan, each defined once: schedules, data-parallel modes, recompute modes.

Each is a `Literal` type (the values a Plan's JSON holds), the tuple of its values in the
order the planner tries them, and the predicates other layers ask of it. Strings rather than
`enum.Enum` members keep the Plan's JSON and every f-string the same on Python 3.10–3.13.
"""

from __future__ import annotations

from typing import Literal, get_args

Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)
"""Pipeline schedules (autopart/core/schedules.py holds their action lists)."""
VIRTUAL_SCHEDULES: tuple[Schedule, ...] = ("interleaved_1f1b", "zero_bubble")
"""Schedules that run several stages per pipeline rank."""

DataParallelMode = Literal["ddp", "zero2", "zero3", "hsdp"]
DATA_PARALLEL_MODES: tuple[DataParallelMode, ...] = get_args(DataParallelMode)
"""How data-parallel replicas hold and synchronise the training state:
'ddp': each replica holds all of it, gradients are all-reduced (DDP; FSDP2's replicate in a pipeline);
'zero2': optimizer state, master weights and reduced gradients sharded over the replicas, parameters
gathered once per step and kept until the step's last backward (FSDP2 reshard_after_forward=False);
'zero3': everything sharded, each block's parameters gathered for its forward and again for its
backward, then freed (FSDP2 reshard_after_forward=True, one FSDP unit per block);
'hsdp': 'zero3' within each host, replicated across hosts (FSDP2 on a 2-D mesh)."""
DATA_PARALLEL_MODE_ALIASES: dict[str, DataParallelMode] = {"fsdp": "zero2"}
"""Older names: 'fsdp' was ZeRO-2 before 'zero3' existed."""

RecomputeMode = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[RecomputeMode, ...] = get_args(RecomputeMode)
"""From the most kept (fastest backward) to the least kept (a whole extra forward);
autopart/core/recompute.py says what each keeps."""

MixedPrecision = Literal["bf16"]
MIXED_PRECISIONS: tuple[MixedPrecision, ...] = get_args(MixedPrecision)


def data_parallel_mode_name(mode: str | None) -> DataParallelMode | None:
    """The current name of a data-parallel mode (aliases resolved), or a ValueError naming the choices."""
    if mode is None:
        return None
    mode = DATA_PARALLEL_MODE_ALIASES.get(mode, mode)
    if mode not in DATA_PARALLEL_MODES:
        raise ValueError(f"data_parallel_mode={mode!r} is not known; use one of {DATA_PARALLEL_MODES} or None")
    return mode  # type: ignore[return-value]


def shards_state(mode: str) -> bool:
    """Whether replicas in `mode` shard the optimizer state (FSDP2 in any form)."""
    return mode in ("zero2", "zero3", "hsdp")


def reshards_parameters(mode: str) -> bool:
    """Whether `mode` frees each block's gathered parameters after its forward (ZeRO-3, HSDP)."""
    return mode in ("zero3", "hsdp")


def check_recompute(recompute: str | None, what: str = "recompute") -> RecomputeMode | None:
    """`recompute` if it is a mode (or None), else a ValueError naming the modes."""
    if recompute is not None and recompute not in RECOMPUTE_MODES:
        raise ValueError(f"{what}={recompute!r} is not known; use one of {RECOMPUTE_MODES} or None "
                         "(None: the planner recomputes per block, where memory demands it)")
    return recompute  # type: ignore[return-value]


def recompute_label(modes: tuple[str, ...]) -> str:
    """One word for the modes of several blocks: the mode all share, or 'mixed'."""
    distinct = set(modes or ("none",))
    return distinct.pop() if len(distinct) == 1 else "mixed"


def recompute_counts(modes: tuple[str, ...]) -> str:
    """The mode all blocks share, else the count of each, e.g. '3 full, 2 none'."""
    modes = modes or ("none",)
    if len(set(modes)) == 1:
        return modes[0]
    return ", ".join(f"{modes.count(m)} {m}" for m in reversed(RECOMPUTE_MODES) if m in modes)
