"""The strategy problem solved exactly by variable elimination, where its graph is narrow.

The objective of strategy_ilp.py is a sum of small cost tables: one per group (its
compute and the bytes tie-break), one per edge (its forbidden pairs) and one per
shared collective over the groups it names (paid when its source and any trigger
are chosen). Summed costs over a graph of low treewidth are minimised exactly by
bucket (variable) elimination, Dechter, "Bucket elimination: a unifying framework
for reasoning" (Artificial Intelligence 113, 1999): eliminate the groups one at a
time, each time replacing the tables that name group g by their sum minimised over
g's strategies (a table over g's neighbours), and read the choices back in reverse.
Its time is the sum of the tables built, exponential only in the width of the
elimination order (greedy: the group whose new table is smallest).

Transformer layers are narrow: a chain of ops with a residual branch and a few
values read across it (the rotary tables, the attention mask). DeepSeek-V3's
six-layer copy (305 groups, 371 edges, 2216 shared collectives; MLA attention and
the MoE block) keeps its largest table under 2,500 entries; CP-SAT stopped at its
10 s limit on it three times (tp = 2, 4, 8) with a feasible, unproven answer.

The costs are CP-SAT's own integers (strategy_ilp.py: each term's seconds scaled and
rounded, times the tie-break weight, plus the parameter MiB of the tie-break), so
the minimum is the integer program's optimum without the memory row. When that
choice fits the memory budget it is the optimum of the whole program too (a
relaxation's optimum that is feasible is optimal). Otherwise, or when a table
would exceed `max_table_entries`, `solve_by_elimination` returns None and the
caller keeps CP-SAT.
"""

from __future__ import annotations

import math

import numpy as np

INFINITE = np.int64(2**61)
"""A forbidden choice's cost: above any finite objective (CP-SAT needs those under 2^63 too),
and two of them still sum below int64's limit; sums are clipped back to it."""

_Table = tuple[tuple[int, ...], np.ndarray]
"""A cost table: the groups it names (ascending), and int64 costs over their allowed strategies."""


def solve_by_elimination(unary: list[np.ndarray], pair_terms: list[tuple[int, int, np.ndarray]],
                         shared_terms: list[tuple[int, tuple[int, int] | None, tuple[tuple[int, int], ...]]], *,
                         max_table_entries: int = 1 << 20) -> tuple[int, ...] | None:
    """The choice minimising the integer objective given as tables, or None when too wide.

    `unary[g]`: int64 [K_g] costs (INFINITE = not allowed); `pair_terms`: (u, v, int64 [K_u, K_v]);
    `shared_terms`: (cost, source (g, k) or None, triggers): `cost` paid when the source and any
    trigger are chosen. The memory budget is not looked at (the caller checks it)."""
    allowed = [np.flatnonzero(u < INFINITE) for u in unary]
    if any(a.size == 0 for a in allowed):
        return None
    tables: list[_Table] = [((g,), np.asarray(u, np.int64)[allowed[g]]) for g, u in enumerate(unary)]
    for u, v, mat in pair_terms:
        table = np.asarray(mat, np.int64)[np.ix_(allowed[u], allowed[v])]
        tables.append(((u, v), table) if u < v else ((v, u), table.T))
    for cost, source, triggers in shared_terms:
        table = _shared_table(cost, source, triggers, allowed, max_table_entries)
        if table is None:
            return None
        tables.append(table)
    sizes = [a.size for a in allowed]
    order = _elimination_order([names for names, _ in tables], sizes, max_table_entries)
    if order is None:
        return None
    live: dict[int, _Table] = dict(enumerate(tables))
    holding: list[set[int]] = [set() for _ in sizes]   # group → ids of the live tables that name it
    for i, (names, _) in live.items():
        for h in names:
            holding[h].add(i)
    picks: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    for g in order:
        ids = sorted(holding[g])
        touching = [live.pop(i) for i in ids]
        for names, _ in touching:
            for h in names:
                holding[h].difference_update(ids)
        scope = tuple(sorted({h for names, _ in touching for h in names}))
        total = np.zeros([sizes[h] for h in scope], np.int64)
        for names, values in touching:
            total = np.minimum(total + _broadcast(names, values, scope), INFINITE)
        axis = scope.index(g)
        rest = scope[:axis] + scope[axis + 1:]
        picks.append((g, rest, np.argmin(total, axis=axis)))
        new = len(tables) + len(picks)
        live[new] = (rest, np.min(total, axis=axis))
        for h in rest:
            holding[h].add(new)
    tables = list(live.values())
    if any(int(values) >= INFINITE for names, values in tables if not names):
        return None  # every choice is forbidden somewhere
    chosen: dict[int, int] = {}
    for g, rest, best in reversed(picks):
        chosen[g] = int(best[tuple(chosen[h] for h in rest)])
    return tuple(int(allowed[g][chosen[g]]) for g in range(len(unary)))


def _broadcast(names: tuple[int, ...], values: np.ndarray, scope: tuple[int, ...]) -> np.ndarray:
    """`values` (axes in `names` order, a subset of `scope`, both ascending) shaped to broadcast over `scope`."""
    shape = [values.shape[names.index(h)] if h in names else 1 for h in scope]
    return values.reshape(shape)


def _shared_table(cost: int, source: tuple[int, int] | None, triggers: tuple[tuple[int, int], ...],
                  allowed: list[np.ndarray], max_entries: int) -> _Table | None:
    """The table of one shared collective over its source's and triggers' groups (None: too large)."""
    scope = tuple(sorted({g for g, _ in triggers} | ({source[0]} if source is not None else set())))
    if np.prod([allowed[g].size for g in scope], dtype=float) > max_entries:
        return None
    hit = np.zeros([allowed[g].size for g in scope], bool)
    for g, k in triggers:
        hit |= _indicator(g, k, scope, allowed)
    if source is not None:
        hit &= _indicator(source[0], source[1], scope, allowed)
    return scope, np.where(hit, np.int64(cost), np.int64(0))


def _indicator(g: int, k: int, scope: tuple[int, ...], allowed: list[np.ndarray]) -> np.ndarray:
    """Whether group g chooses strategy k, shaped to broadcast over `scope`."""
    shape = [allowed[h].size if h == g else 1 for h in scope]
    return (allowed[g] == k).reshape(shape)


def _elimination_order(scopes: list[tuple[int, ...]], sizes: list[int], max_entries: int) -> list[int] | None:
    """Greedy order: next, the group whose table (itself and its neighbours) is smallest; None if
    some table would exceed `max_entries`."""
    neighbours: list[set[int]] = [set() for _ in sizes]
    for names in scopes:
        for g in names:
            neighbours[g].update(names)
    for g, near in enumerate(neighbours):
        near.discard(g)
    entries = lambda h: sizes[h] * math.prod(sizes[n] for n in neighbours[h])  # noqa: E731
    cost = {g: entries(g) for g in range(len(sizes))}
    order = []
    while cost:
        g = min(cost, key=lambda h: (cost[h], h))
        if cost.pop(g) > max_entries:
            return None
        order.append(g)
        for n in neighbours[g]:
            neighbours[n].discard(g)
            neighbours[n].update(neighbours[g] - {n})
        for n in neighbours[g]:
            cost[n] = entries(n)
    return order
