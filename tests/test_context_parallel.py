"""Context parallelism: the sequence layout, the rewrite, and every plan against the single-device run.

float32 tolerances as in test_pipeline_equivalence.py and verify.py: outputs and loss rtol 1e-5 /
atol 1e-5, gradients rtol 1e-5 / atol 4e-5. The gloo run (4 ranks: cp2 × dp2 under ZeRO-3, cp2 × tp2
with sp, pp2 × cp2, dropout masks) is tests/distributed/context_parallel.py.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autopart
from autopart.core.context_chunks import (
    causal_chunk_masks, context_parallel_info, local_index, local_positions, natural_order,
)
from autopart.passes.context_parallel import analyse_context, context_ops
from autopart.passes.context_parallel.rules import Conversion, Rewrite, SeqShard
from autopart.runtime.spmd import run_mesh_ranks
from autopart.verify import verify
from context_models import Dropped
from random_models import build_sequence_model, sequence_programs
from test_distributed import _finish, _torchrun
from test_pipeline_equivalence import assert_plan_matches_model

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "context_parallel.py")


def compile_cp(model, devices: int, args: tuple, kwargs: dict | None = None, **plan):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no op is split.*")
        compiled = autopart.compile(model, devices, example_inputs=args, example_kwargs=kwargs, **plan)
    assert compiled.plan.mesh.cp == plan["context_parallel"], compiled.plan.mesh
    return compiled


def hf(family: str, layers: int = 2):
    from transformers import (
        LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))
    return MistralForCausalLM(MistralConfig(**common, sliding_window=None))


MEGATRON = {"model.embed_tokens": "vocab", "model.layers.*.self_attn.[qkv]_proj": "colwise",
            "model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.mlp.gate_proj": "colwise",
            "model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise",
            "lm_head": "colwise"}


def padded_batch(batch: int, seq: int, seed: int = 0):
    """Token ids, a padding mask that depends on them (left padding up to the first id divisible by 7)
    and labels with the padding ignored (-100)."""
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    starts = [next((j for j in range(seq - 1) if int(row[j]) % 7 == 0), 0) for row in ids]
    mask = torch.stack([(torch.arange(seq) >= start).long() for start in starts])
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# ----------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("cp", [2, 4])
def test_chunks_balance_causal_work_and_gather_back_in_order(cp):
    S = 16
    held = [local_positions(S, cp, r) for r in range(cp)]
    assert held[0][:S // (2 * cp)] == list(range(S // (2 * cp)))          # chunk 0 ...
    assert held[0][-1] == S - 1                                            # ... and chunk 2·cp − 1
    assert sorted(p for positions in held for p in positions) == list(range(S))
    pairs = [sum(int(mask.sum()) for _, mask in causal_chunk_masks(S, cp, r)) for r in range(cp)]
    assert len(set(pairs)) == 1 and sum(pairs) == S * (S + 1) // 2       # every rank: the same causal work
    for outer, inner in ((1, 1), (3, 1), (2, 5)):
        whole = torch.arange(outer * S * inner)
        pieces = [whole[local_index(S, cp, r, outer, inner)] for r in range(cp)]
        assert torch.equal(torch.cat(pieces)[natural_order(S, cp, outer, inner)], whole)


def test_llama_layout_splits_the_tokens_and_selects_what_meets_them():
    model = hf("llama", layers=1)
    ids, mask, labels = padded_batch(2, 8)
    gm = autopart.trace(model, (ids,), {"attention_mask": mask, "labels": labels})
    layout = analyse_context(gm, 2)
    assert layout.sequence_length == 8 and layout.tokens == {"input_ids": SeqShard(1)}
    assert layout.layout("labels") is None and layout.layout("attention_mask") is None
    sdpa = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    by_kind = {c.kind: c for (consumer, _), c in layout.conversions.items() if consumer == sdpa.name}
    assert by_kind["gather"] == Conversion("gather", 2)          # keys and values gathered
    assert by_kind["slice"] == Conversion("slice", 2)            # the mask's rows of the local queries
    slices = [(consumer, arg) for (consumer, arg), c in layout.conversions.items() if c.kind == "slice"]
    assert len(slices) >= 5, slices       # and the rotary cos/sin tables (q and k), and the shifted labels
    loss = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.cross_entropy_loss.default)
    assert layout.rewrites[loss.name] == Rewrite("class_mean")
    assert not layout.mixing


def test_models_without_self_attention_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    gm = autopart.trace(model, (torch.randn(2, 4, 8),))
    with pytest.raises(autopart.PlanError, match="self-attention.*context_parallel=1"):
        analyse_context(gm, 2)


# ----------------------------------------------------------------------------- equivalence


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=sequence_programs(max_layers=4), cp=st.sampled_from([2, 4]), tp=st.sampled_from([1, 2]),
       sp=st.booleans(), pp=st.sampled_from([1, 2]), m=st.sampled_from([1, 2]), shards=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_random_sequence_models_match_single_device(program, cp, tp, sp, pp, m, shards, seed):
    """Attention (SDPA causal, SDPA with a padding mask, eager with an additive mask), rotary tables
    from whole positions, a mean over the tokens and a token shift, under cp × pp × tp (Megatron's
    attention splits, sp) × microbatches: outputs, loss and every gradient equal one device's."""
    model = build_sequence_model(program, seed=seed)
    dp = cp * shards
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(dp * m, 8, 12, generator=gen)
    keep = torch.rand(dp * m, 8, generator=gen) > 0.3
    attention = [i for i, (kind, _) in enumerate(program) if kind.endswith("attention")]
    tp_plan = {**{f"layers.{i}.qkv": "colwise" for i in attention}, **{f"layers.{i}.out": "rowwise" for i in attention}}
    compiled = compile_cp(model, dp * pp * tp, (x, keep), context_parallel=cp, data_parallel=dp,
                          pipeline_parallel=pp, tensor_parallel=tp, num_microbatches=m,
                          tp_plan=tp_plan if tp > 1 else None, sequence_parallel=sp if tp > 1 else None)
    assert compiled.plan.mesh.batch_shards == shards
    assert_plan_matches_model(model, (x, keep), {}, compiled, lambda out: out, loss_target_seed=seed)


@pytest.mark.parametrize("family,plan", [
    ("llama", dict(context_parallel=2, data_parallel=2, num_microbatches=1)),
    ("qwen3", dict(context_parallel=4, data_parallel=4, tensor_parallel=2, sequence_parallel=True, tp_plan=MEGATRON,
                   num_microbatches=1)),
    ("mistral", dict(context_parallel=2, data_parallel=2, pipeline_parallel=2, num_microbatches=1,
                     tensor_parallel=2, sequence_parallel=True, tp_plan=MEGATRON)),
], ids=["llama-cp2", "qwen3-cp4-tp2-sp", "mistral-cp2-pp2-tp2-sp"])
def test_hf_models_with_their_loss_and_an_input_dependent_padding_mask_match_single_device(family, plan):
    """The model's own loss (labels, -100 on the padding: mean over the tokens of every rank) and a
    padding mask computed from the tokens: outputs, loss and every gradient equal one device's."""
    model = hf(family, layers=1)
    ids, mask, labels = padded_batch(4, 16)
    kwargs = {"attention_mask": mask, "labels": labels}
    devices = plan["data_parallel"] * plan.get("pipeline_parallel", 1) * plan.get("tensor_parallel", 1)
    compiled = compile_cp(model, devices, (ids,), kwargs, **plan)
    assert ("tp=2 sp" in compiled.report()) == plan.get("sequence_parallel", False)
    result = verify(compiled, model, (ids,), kwargs)
    assert result.num_grads == sum(1 for p in model.parameters())


def test_rank_modules_hold_their_positions_and_return_the_whole_output():
    model = hf("llama", layers=1)
    ids, mask, _ = padded_batch(4, 16)
    compiled = compile_cp(model, 4, (ids,), {"attention_mask": mask}, context_parallel=2, data_parallel=4,
                          num_microbatches=1)
    assert "cp=2" in compiled.report()
    shapes = []
    for rank in range(4):
        module = compiled.rank_module(rank)
        info = context_parallel_info(module)
        assert info.cp == 2 and info.cp_rank == rank % 2 and info.sequence_length == 16
        ops = context_ops(module)
        assert {op.cp_rank for op in ops} == {rank % 2}
        # the layer's keys and values and the logits gathered; the tokens, the layer's rotary cos and
        # sin and the padding mask's rows sliced; nothing else communicates
        assert Counter(type(op).__name__ for op in ops) == {"ContextGather": 3, "ContextSlice": 4}
        q = next(n for n in module.graph.nodes if n.name == "linear")   # the first projection: local tokens
        shapes.append(tuple(q.meta["val"].shape))
    assert shapes == [(2, 8, 32)] * 4                  # 2 samples per group, 8 of the 16 positions
    logits = next(iter(compiled.rank_module(0).graph.find_nodes(op="output"))).args[0][-1]
    assert tuple(logits.meta["val"].shape) == (2, 16, 64)   # the output leaves whole


def test_dropout_draws_per_rank_on_split_values_and_alike_on_whole_ones():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    compiled = compile_cp(Dropped(), 2, (ids,), context_parallel=2, data_parallel=2, num_microbatches=1)
    with torch.no_grad():
        ranks = run_mesh_ranks([compiled.stage_module(0)], [[ids], [ids]], cp=2)
    (_, tokens0, table0), (_, tokens1, table1) = ranks
    assert torch.equal(table0, table1)               # the whole table: one mask
    assert torch.equal(tokens0, tokens1)             # the tokens' output, gathered
    kept = tokens0 != 0
    assert not torch.equal(*(kept[:, local_positions(8, 2, r)] for r in range(2)))   # each rank its own mask
    assert 0.3 < kept.float().mean() < 0.7


def test_ops_that_mix_positions_run_whole_and_say_so():
    model = build_sequence_model([("attention", 0), ("shift", 0)])
    x, keep = torch.randn(2, 8, 12), torch.ones(2, 8, dtype=torch.bool)
    with pytest.warns(UserWarning, match=r"context_parallel=2: 1 op\(s\) mix positions.*slice"):
        compiled = autopart.compile(model, 2, example_inputs=(x, keep), context_parallel=2, data_parallel=2,
                                    num_microbatches=1)
    assert_plan_matches_model(model, (x, keep), {}, compiled, lambda out: out)


@pytest.mark.multiprocess
def test_context_parallel_trains_like_one_device_on_gloo():
    """4 ranks: cp2 × dp2 under ZeRO-3 (a Llama with its own loss and an input-dependent padding mask,
    3 Adam steps), cp2 × tp2 with sp and pp2 × cp2 (3 SGD steps, 2 microbatches, the forward-only
    output), dropout masks."""
    code, out = _finish(_torchrun(4, script=SCRIPT))
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == 4, out[-4000:]
