"""Which values of the traced graph hold a rank's positions only, and what each op then needs.

`analyse_context(gm, cp)` works on the whole traced graph (whole shapes, the node names every
later pass keeps) and returns a `ContextLayout`: the layout of every value (whole, or a
`SeqShard`), the conversions each op needs of its inputs, and the ops rewritten
(rules.py). The rank-module rewrite (rewrite.py) applies it to every stage and tp rank.

Which inputs are split (the token inputs). The sequence length S is the length of the queries
of the graph's self-attention (SDPA, or attention written as matmul → softmax → matmul with
queries, keys and values of one length). A model input is a token input when splitting it alone
along a dim of S elements splits the queries, keys and values of an attention along their
sequence dims: the tokens (`input_ids`, `inputs_embeds`, the input of an encoder) are, while
position ids and rotary tables (they reach the queries and keys, not the values), attention and
padding masks, and labels (shifted: a slice along the sequence) are not. Those stay whole on
every rank and are index-selected to the local positions where they meet a split value.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from autopart.core.context_chunks import check_divisible
from autopart.core.errors import PlanError
from autopart.passes.attrs import named_arguments
from autopart.passes.context_parallel.rules import Context, Conversion, Rewrite, SeqShard, rule_of

aten = torch.ops.aten
_SOFTMAX = {aten._softmax.default, aten.softmax.int}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_PASS_UP = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.masked_fill.Scalar,
            aten.masked_fill.Tensor, aten.where.self, aten.to.dtype, aten._to_copy.default, aten.clone.default,
            aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.mul.Scalar, aten.div.Scalar,
            aten.add.Scalar}
"""Ops between attention's score matmul and its softmax (mask, scale, casts, views)."""
_PASS_DOWN = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.dropout.default,
              aten.native_dropout.default, operator.getitem, aten.type_as.default, aten.contiguous.default}
"""Ops between attention's softmax and its value matmul."""


@dataclass(frozen=True)
class AttentionSite:
    """One attention of the graph: its queries, keys and values and the dim of each that holds the
    sequence (keys of eager attention arrive transposed: their last dim)."""

    node: str
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    key_dim: int


@dataclass(frozen=True, kw_only=True)
class ContextLayout:
    """The context-parallel layout of a traced graph (module docstring)."""

    cp: int
    sequence_length: int
    tokens: dict[str, SeqShard]
    """Model inputs (placeholder names) split along the sequence: each rank takes its positions."""
    layouts: dict[str, Any]
    """Node name -> SeqShard, None (whole), or a tuple of them (ops returning several tensors)."""
    conversions: dict[tuple[str, str], Conversion] = field(default_factory=dict)
    """(consumer, input) node names -> what the input needs before the consumer."""
    rewrites: dict[str, Rewrite] = field(default_factory=dict)
    mixing: tuple[str, ...] = ()
    """Ops (not attention) that read a whole sequence: their split inputs are gathered first."""

    def layout(self, name: str) -> Any:
        return self.layouts.get(name)


def attention_site(node: torch.fx.Node) -> AttentionSite | None:
    """The attention `node` is: an SDPA, or the softmax(last dim) of a matmul → softmax → matmul
    chain (eager attention); None for any other node."""
    if node.op != "call_function":
        return None
    if node.target is aten.scaled_dot_product_attention.default:
        args = named_arguments(node)
        return AttentionSite(node.name, args["query"], args["key"], args["value"], -2)
    if node.target in _SOFTMAX and _last_dim(node):
        scores = _walk_up(node.args[0])
        values = _walk_down(node)
        if scores is not None and values is not None:
            return AttentionSite(node.name, scores.args[0], scores.args[1], values.args[1], -1)
    return None


def attention_sites(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every attention of the graph (`attention_site`)."""
    return [site for node in gm.graph.nodes if (site := attention_site(node)) is not None]


def _last_dim(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and node.args[1] % val.dim() == val.dim() - 1


def _walk_up(node: Any, depth: int = 8) -> torch.fx.Node | None:
    """The score matmul behind a softmax's input (through any operand: `where(mask, scores, -inf)`)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or depth == 0:
        return None
    if node.target in _MATMUL:
        return node
    if node.target not in _PASS_UP:
        return None
    return next((m for a in node.all_input_nodes if (m := _walk_up(a, depth - 1)) is not None), None)


def _walk_down(node: torch.fx.Node) -> torch.fx.Node | None:
    for user in node.users:
        if user.op != "call_function":
            continue
        if user.target in _MATMUL and user.args[0] is node:
            return user
        if user.target in _PASS_DOWN and (user.target is not operator.getitem or user.args[1] == 0):
            found = _walk_down(user)
            if found is not None:
                return found
    return None


def _seq_len(site: AttentionSite) -> int | None:
    """S of a self-attention (queries and keys of one length), None for cross-attention."""
    q, k = site.query.meta["val"], site.key.meta["val"]
    return int(q.shape[-2]) if q.shape[-2] == k.shape[site.key_dim] else None


def _splits_site(site: AttentionSite, layouts: dict[str, Any]) -> bool:
    def on(node: torch.fx.Node, dim: int) -> bool:
        layout = layouts.get(node.name)
        return isinstance(layout, SeqShard) and layout.dim == dim % node.meta["val"].dim()
    return on(site.query, -2) and on(site.key, site.key_dim) and on(site.value, -2)


def propagate(gm: torch.fx.GraphModule, sequence_length: int, tokens: dict[str, SeqShard]):
    """(layouts, conversions, rewrites, mixing) of every node, token inputs split."""
    layouts: dict[str, Any] = {}
    conversions: dict[tuple[str, str], Conversion] = {}
    rewrites: dict[str, Rewrite] = {}
    mixing: list[str] = []
    ctx = Context(sequence_length, layouts)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            layouts[node.name] = tokens.get(node.name)
        elif node.op == "call_function" and any(_holds_shard(layouts.get(a.name)) for a in node.all_input_nodes):
            decision = rule_of(node)(node, ctx)
            layouts[node.name] = decision.out
            conversions.update({(node.name, a.name): c for a, c in decision.convert.items()})
            if decision.rewrite is not None:
                rewrites[node.name] = decision.rewrite
            if decision.mixes:
                mixing.append(node.name)
        else:
            layouts[node.name] = None
    return layouts, conversions, rewrites, tuple(mixing)


def _holds_shard(layout: Any) -> bool:
    return isinstance(layout, SeqShard) or (isinstance(layout, tuple) and any(isinstance(x, SeqShard) for x in layout))


def find_tokens(gm: torch.fx.GraphModule) -> tuple[int, dict[str, SeqShard]]:
    """(S, the token inputs and the dim of each that holds the sequence): module docstring."""
    sites = attention_sites(gm)
    lengths = sorted({n for n in map(_seq_len, sites) if n is not None})
    if not lengths:
        raise PlanError("context parallelism splits the sequence of a self-attention, and this model has none "
                        "(no scaled_dot_product_attention, nor matmul → softmax → matmul over queries and keys of "
                        "one length); use context_parallel=1")
    if len(lengths) > 1:
        raise PlanError(f"context parallelism splits one sequence length, and this model attends over sequences of "
                        f"{lengths} tokens; use context_parallel=1")
    S = lengths[0]
    tokens: dict[str, SeqShard] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        for dim in (d for d, size in enumerate(val.shape) if size == S):
            layouts = propagate(gm, S, {node.name: SeqShard(dim)})[0]
            if any(_splits_site(site, layouts) for site in sites):
                tokens[node.name] = SeqShard(dim)
                break
    if not tokens:
        raise PlanError(f"context parallelism found no model input that carries the {S} tokens into the queries, "
                        "keys and values of an attention; use context_parallel=1")
    return S, tokens


def analyse_context(gm: torch.fx.GraphModule, cp: int) -> ContextLayout:
    """The layout of every value of `gm` with its sequences split over `cp` ranks."""
    S, tokens = find_tokens(gm)
    try:
        check_divisible(S, cp)
    except ValueError as error:
        raise PlanError(str(error)) from error
    layouts, conversions, rewrites, mixing = propagate(gm, S, tokens)
    return ContextLayout(cp=cp, sequence_length=S, tokens=tokens, layouts=layouts, conversions=conversions,
                         rewrites=rewrites, mixing=mixing)
