"""The user's tensor-parallel plan (`compile(tp_plan=...)`), DTensor style, as fixed placements.

`parallelize_module` in torch.distributed.tensor.parallel takes a plan of
module paths → `ColwiseParallel()` / `RowwiseParallel()`; `plan_placements`
reads the same kind of plan (fnmatch patterns over the module path in
``nn_module_stack``) and returns the placements it implies, which the
strategy problem (problem.py, `fixed=`) pins and its solution completes at
least cost:

- 'colwise' (Megatron's ColumnParallelLinear): weight split on its output
  features, bias alike, output Shard(-1); when the output is split into k
  equal parts (a fused [q; k; v]) the split is per part (Shard(dim, k));
- 'rowwise' (RowParallelLinear): weight split on its input features, output Partial;
- 'vocab' (VocabParallelEmbedding): table split by rows, output Partial.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping

import torch
import torch.fx

from autopart.core.errors import InputError
from autopart.passes.tensor_parallel.placements import P, Placement, R, Shard

aten = torch.ops.aten
# op → (index of the weight argument, weight dim of output features, weight dim of input features, bias index)
_WEIGHTED = {
    aten.linear.default: (1, 0, 1, 2),
    aten.addmm.default: (2, 1, 0, 0),
    aten.mm.default: (1, 1, 0, None),
    aten.embedding.default: (0, 1, 0, None),
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
STYLES = ("colwise", "rowwise", "vocab")


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def fused_sections(node: torch.fx.Node) -> int:
    """k if `node`'s output reaches (through views) a split into k equal parts, else 1."""
    cur = node
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.target in _VIEWS:
            cur = user
            continue
        if user.target in _SPLITS and isinstance(user.meta.get("val"), (list, tuple)):
            shapes = {tuple(v.shape) for v in user.meta["val"]}
            return len(user.meta["val"]) if len(shapes) == 1 else 1
        break
    return 1


def plan_placements(gm: torch.fx.GraphModule, plan: Mapping[str, str]) -> dict[str, Placement]:
    """Fixed placements (node name or parameter name → Placement) implied by `plan`."""
    bad = {style for style in plan.values() if style not in STYLES}
    if bad:
        raise InputError(f"plan styles {sorted(bad)} unknown; use one of {STYLES}")
    fixed: dict[str, Placement] = {}

    def pin(key: str, placement: Placement, why: str) -> None:
        if fixed.get(key, placement) != placement:
            raise InputError(f"plan pins {key} to both {fixed[key]} and {placement} ({why}); a tied parameter "
                             "must get the same split from every module that reads it")
        fixed[key] = placement

    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _WEIGHTED:
            continue
        path = _module_path(node)
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(path, pattern)), None)
        if style is None:
            continue
        w_index, out_dim, in_dim, b_index = _WEIGHTED[node.target]
        weight = node.args[w_index]
        bias = node.args[b_index] if b_index is not None and len(node.args) > b_index else None
        if weight.op != "get_attr":
            continue
        out_nd = node.meta["val"].dim()
        where = f"{path} ({node.target})"
        if style == "colwise":
            groups = fused_sections(node)
            pin(weight.target, Shard(out_dim, groups), where)
            if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
                pin(bias.target, Shard(0, groups), where)
            pin(node.name, Shard(out_nd - 1, groups), where)
        elif style == "rowwise":
            if node.target == aten.embedding.default:
                raise InputError(f"{where}: an embedding is 'vocab' or 'colwise', not 'rowwise'")
            pin(weight.target, Shard(in_dim), where)
            if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
                pin(bias.target, R, where)
            pin(node.name, P, where)
        else:
            if node.target != aten.embedding.default:
                raise InputError(f"{where}: 'vocab' applies to embeddings only")
            pin(weight.target, Shard(0), where)
            pin(node.name, P, where)
    return fixed


MEGATRON_PLANS: dict[str, dict[str, str]] = {
    "gpt": {"wte": "vocab", "blocks.*.attn_qkv": "colwise", "blocks.*.attn_proj": "rowwise",
            "blocks.*.mlp_fc": "colwise", "blocks.*.mlp_proj": "rowwise", "lm_head": "colwise"},
    "gpt2": {"transformer.wte": "vocab", "transformer.h.*.attn.c_attn": "colwise",
             "transformer.h.*.attn.c_proj": "rowwise", "transformer.h.*.mlp.c_fc": "colwise",
             "transformer.h.*.mlp.c_proj": "rowwise", "lm_head": "colwise"},
    "llama": {"model.embed_tokens": "vocab", "model.layers.*.self_attn.[qkv]_proj": "colwise",
              "model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.mlp.gate_proj": "colwise",
              "model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise",
              "lm_head": "colwise"},
    "bert": {"bert.embeddings.word_embeddings": "vocab",
             "bert.encoder.layer.*.attention.self.*": "colwise",
             "bert.encoder.layer.*.attention.output.dense": "rowwise",
             "bert.encoder.layer.*.intermediate.dense": "colwise",
             "bert.encoder.layer.*.output.dense": "rowwise", "cls.predictions.decoder": "colwise"},
}
"""Megatron-LM layouts of the zoo's families (autopart.zoo), keyed by ZooModel.name."""
