"""The blocks of the whole model from the blocks of a copy with a few of its identical layers.

The copy (passes/layer_stack.py) keeps layers 0 .. k−1 of L. Its blocks split
into a prologue (before layer 0), the blocks of each kept layer, and an
epilogue. The whole model's blocks are: the prologue; layer 0's blocks; layer
1's blocks once for every inner layer 1 .. L−2, renamed; layer k−1's blocks as
layer L−1's; the epilogue. Values between blocks follow the same rule: a value
of layer j read by layer j + 1 becomes, for every layer i that j stands for, a
value of layer i read by layer i + 1; a prologue value every layer reads is read
by all L. Anything else (a layer reading two layers back, the epilogue reading a
middle layer) has no such restatement, and `StackExpansion.of` returns None: the
caller analyses the whole model instead.

Restated blocks carry no node names (the whole model's graph, where they live,
is traced only when rank modules are asked for: autopart/materialize.py); costs,
parameters and names are the analysed layer's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from autopart.passes.layer_stack import LayerStack
from autopart.core.blocks import Block, BlockGraph, BlockValue

PROLOGUE, EPILOGUE = -1, -2
"""Segments of blocks outside the layers (layer segments are the layer index 0 .. k−1)."""


@dataclass(frozen=True, kw_only=True)
class StackExpansion:
    """How the analysed blocks become the whole model's blocks."""

    stack: LayerStack
    blocks: tuple[tuple[int, int, int], ...]
    """Per whole-model block: (analysed block index, analysed layer j or a segment, whole-model layer i)."""
    values: tuple[tuple[int, int, tuple[int, ...]], ...]
    """Per whole-model value: (analysed value index, producer block, consumer blocks)."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @staticmethod
    def of(graph: BlockGraph, stack: LayerStack) -> StackExpansion | None:
        """The expansion of `graph` (blocks of the copy with `stack.keep` layers), or None if its
        blocks or values do not repeat layer by layer."""
        segments = [_segment(block.name, stack) for block in graph.blocks]
        layout = _layout(segments, stack.keep)
        if layout is None:
            return None
        prologue, layers, epilogue = layout
        kind_of = {j: stack.representative(stack.kept_index(j)) for j in range(stack.keep)}
        by_kind: dict[int, set] = {}
        for j, members in enumerate(layers):
            by_kind.setdefault(kind_of[j], set()).add(tuple(_relative(graph.blocks[b].name, stack, j) for b in members))
        if any(len(names) != 1 for names in by_kind.values()) or (not stack.kept and len(by_kind) > 1 and len(
                {n for names in by_kind.values() for n in names}) != 1):
            return None  # the kept layers (of one kind) cut into differently named blocks
        full_of = _full_layers(stack)
        position = {b: (j, p) for j, members in enumerate(layers) for p, b in enumerate(members)}
        blocks: list[tuple[int, int, int]] = [(b, PROLOGUE, PROLOGUE) for b in prologue]
        index: dict[tuple[int, int], int] = {}  # (whole-model layer, position) -> whole-model block
        for i in range(stack.num_layers):
            j = representative_layer(i, stack)
            for p, b in enumerate(layers[j]):
                index[(i, p)] = len(blocks)
                blocks.append((b, j, i))
        epilogue_at = {b: len(blocks) + k for k, b in enumerate(epilogue)}
        blocks += [(b, EPILOGUE, EPILOGUE) for b in epilogue]
        prologue_at = {b: k for k, b in enumerate(prologue)}
        values = _values(graph, stack, segments, position, index, prologue_at, epilogue_at, full_of)
        if values is None:
            return None
        return StackExpansion(stack=stack, blocks=tuple(blocks), values=values)

    def apply(self, graph: BlockGraph) -> BlockGraph:
        """The whole model's blocks from the analysed ones (as analysed, or restated per tp group)."""
        blocks = tuple(_rename(graph.blocks[b], self.stack, j, i) for b, j, i in self.blocks)
        values = tuple(BlockValue(node_name=graph.values[v].node_name, producer=producer, consumers=consumers,
                                  num_bytes=graph.values[v].num_bytes)
                       for v, producer, consumers in self.values)
        return dataclasses.replace(graph, blocks=blocks, values=values)

    def analysed_block(self, whole: int) -> int:
        """The analysed block a whole-model block restates."""
        return self.blocks[whole][0]


def _segment(name: str, stack: LayerStack) -> int | None:
    """The kept layer a block belongs to, or None outside the layers."""
    prefix = re.escape(stack.layer_prefix(0)[:-1]) if stack.path else ""
    match = re.fullmatch(rf"{prefix}(\d+)([.#].*)?", name)
    return stack.position_of(int(match.group(1))) if match else None


def _layout(segments: list[int | None], keep: int):
    """(prologue, [blocks of each kept layer], epilogue) if the blocks run prologue, layer 0, ...,
    layer k−1, epilogue, each layer contiguous and non-empty; else None."""
    prologue, epilogue = [], []
    layers: list[list[int]] = [[] for _ in range(keep)]
    last = -1
    for b, seg in enumerate(segments):
        if seg is None:
            (prologue if last == -1 else epilogue).append(b)
            if last != -1:
                last = keep  # nothing of a layer may follow the epilogue's start
            continue
        if seg < last or seg >= keep or (last == keep):
            return None
        layers[seg].append(b)
        last = seg
    if any(not members for members in layers):
        return None
    return prologue, layers, epilogue


def _relative(name: str, stack: LayerStack, j: int) -> str:
    return "{}" + name[len(stack.kept_prefix(j)):]


def representative_layer(i: int, stack: LayerStack) -> int:
    """The kept layer that stands for layer i (`LayerStack.representative`)."""
    return stack.representative(i)


def _full_layers(stack: LayerStack) -> dict[int, list[int]]:
    """Kept layer j -> the whole-model layers it stands for."""
    out: dict[int, list[int]] = {}
    for i in range(stack.num_layers):
        out.setdefault(representative_layer(i, stack), []).append(i)
    return out


def _values(graph, stack, segments, position, index, prologue_at, epilogue_at, full_of):
    """Whole-model values; None when some value does not repeat layer by layer."""
    keep, last = stack.keep, stack.num_layers - 1
    kinds: dict[int, set[int]] = {}  # kind -> the kept positions of that kind
    for j in range(keep):
        kinds.setdefault(stack.kind_of_position(j), set()).add(j)
    patterns: dict[int, set] = {}  # kept layer -> what its values look like relative to it
    reads: dict[int, set] = {}  # kept layer -> which prologue values it reads, where
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for v, value in enumerate(graph.values):
        seg = segments[value.producer]
        if seg is None and value.producer in prologue_at:
            # a prologue value: read by the first layer alone (the layers' input), or by every layer
            # at the same places (rotary tables, masks), and by the prologue and epilogue
            readers = {segments[c] for c in value.consumers} - {None}
            # every kept layer of a kind, or none of them (a mask or rotary table of one kind)
            whole_kinds = all(not (readers & members) or members <= readers for members in kinds.values())
            if readers and readers != {0} and not whole_kinds:
                return None
            consumers: list[int] = []
            for c in value.consumers:
                cseg = segments[c]
                if cseg is None:
                    consumers.append(prologue_at[c] if c in prologue_at else epilogue_at[c])
                    continue
                _, p = position[c]
                if readers != {0}:
                    reads.setdefault(cseg, set()).add((v, p))
                consumers += [index[(i, p)] for i in (full_of.get(cseg, []) if readers != {0} else [0])]
            out.append((v, prologue_at[value.producer], tuple(sorted(set(consumers)))))
            continue
        if seg is None:  # an epilogue value: read by the epilogue only
            if any(segments[c] is not None or c not in epilogue_at for c in value.consumers):
                return None
            out.append((v, epilogue_at[value.producer], tuple(epilogue_at[c] for c in value.consumers)))
            continue
        j, p = position[value.producer]
        shape = []
        for c in value.consumers:
            cseg = segments[c]
            if cseg is None and c in epilogue_at and j == keep - 1:
                shape.append(("epilogue", c))
            elif cseg in (j, j + 1):
                shape.append((cseg - j, position[c][1]))
            else:
                return None  # a layer read two layers on, or the epilogue reading an inner layer
        patterns.setdefault(j, set()).add((p, value.num_bytes, tuple(s for s in shape if s[0] != "epilogue")))
        for i in full_of.get(j, []):
            consumers = []
            for kind, where in shape:
                if kind == "epilogue":
                    consumers.append(epilogue_at[where])
                elif i + kind > last:
                    return None
                else:
                    consumers.append(index[(i + kind, where)])
            out.append((v, index[(i, p)], tuple(sorted(set(consumers)))))
    # the inner layer's values look like the first layer's (both feed a next layer), and every
    # layer reads the prologue's values at the same places
    if not stack.kept and keep >= 3 and patterns.get(0, set()) != patterns.get(1, set()):
        return None
    if stack.kept and len({frozenset(p) for j, p in patterns.items() if j < keep - 1}) > 1:
        return None  # layers of different kinds hand the next layer different values
    for members in kinds.values():  # the layers of a kind read the prologue's values at the same places
        if len({frozenset(reads.get(j, set())) for j in members}) > 1:
            return None
    out.sort(key=lambda item: (item[1], graph.values[item[0]].node_name))
    return tuple(out)


def _rename(block: Block, stack: LayerStack, j: int, i: int) -> Block:
    """Block of kept layer j restated as layer i (names of the block and its parameters)."""
    if j < 0:
        return dataclasses.replace(block, node_names=())
    old, new = stack.kept_prefix(j), stack.layer_prefix(i)

    def move(name: str) -> str:
        return new + name[len(old):] if name == old or name.startswith(old + ".") or name.startswith(old + "#") \
            else name

    return dataclasses.replace(
        block, name=move(block.name), node_names=(), param_names=tuple(move(t) for t in block.param_names),
        parameters=tuple((move(t), size, trainable, numel) for t, size, trainable, numel in block.parameters))
