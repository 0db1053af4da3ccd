"""Expert tensor parallelism (passes/tensor_parallel/expert_rules.py): each expert's gate/up matmul split
by columns and its down matmul by rows over the tp group, chosen by the strategy ILP against keeping
the experts whole, priced, and equal to the model (outputs, loss, every gradient: autopart.verify at
float32 tolerances) with pipeline, expert and data parallelism around it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import autopart
from autopart import verify
from autopart.cost_models import Cluster
from autopart.frontend.source import annotate_graph
from autopart.passes.coarsen import coarsen
from autopart.passes.expert_parallel import expert_weight_of, is_expert_matmul
from autopart.passes.tensor_parallel import build_tp_problem
from autopart.passes.tensor_parallel.block_costs import restate_blocks
from autopart.passes.tensor_parallel.problem import assignment_from_solution
from autopart.solver import solve_tp

transformers = pytest.importorskip("transformers")

VOCAB = 64


def wide_moe(family: str, experts: int = 4):
    """A two- or three-layer HF MoE model wide enough (d 512, experts of width 1024) that on H100s
    splitting every expert pays for its all-reduce (narrower, the kernels' fixed costs per call,
    which a split does not shrink, outweigh the halved work)."""
    if family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(num_hidden_layers=2, hidden_size=512, intermediate_size=1024,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=experts, num_experts_per_tok=2, vocab_size=VOCAB))
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(Qwen3MoeConfig(num_hidden_layers=2, hidden_size=512, intermediate_size=1024,
                                                  moe_intermediate_size=1024, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=32, num_experts=experts,
                                                  num_experts_per_tok=2, vocab_size=VOCAB))
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        num_hidden_layers=3, first_k_dense_replace=1, hidden_size=512, intermediate_size=1024,
        moe_intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=experts,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, vocab_size=VOCAB, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16))


def _expert_splits(compiled) -> set[str]:
    return {d.strategy for n, d in compiled.plan.tensor_parallel.nodes.items() if "grouped_mm" in n}


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # each example compiles: no slow shrinking
@given(family=st.sampled_from(["mixtral", "qwen3_moe", "deepseek_v3"]), pp=st.sampled_from([1, 2]),
       ep=st.sampled_from([1, 2]), microbatches=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_expert_tensor_parallel_plans_equal_the_model(family, pp, ep, microbatches, seed):
    torch.manual_seed(seed)
    model = wide_moe(family)
    dp = 2
    ids = torch.randint(0, VOCAB, (dp * microbatches, 256))
    compiled = autopart.compile(model, f"{dp * pp * 2}xH100", example_inputs=(ids,), tensor_parallel=2,
                                pipeline_parallel=pp, data_parallel=dp, expert_parallel=ep,
                                num_microbatches=microbatches, compile_kernels=False)
    assert compiled.plan.experts.tp == 2 and _expert_splits(compiled) == {"colwise", "rowwise"}
    verify.verify(compiled, model, (ids,))


def test_the_ilp_splits_experts_where_it_pays_and_keeps_them_whole_where_not():
    """The same layer kept whole costs more on H100s at d 512 (so the split is chosen, and its blocks
    hold half the expert bytes); on CPU devices at d 32 the all-reduce outweighs the split work."""
    torch.manual_seed(0)
    model = wide_moe("mixtral")
    ids = torch.randint(0, VOCAB, (2, 64))
    cluster = Cluster.parse("2xH100")
    gm = annotate_graph(autopart.trace(model, (ids,)), cluster, None)
    weights = {n.name for n in gm.graph.nodes if n.op == "get_attr"
               and n.target in {expert_weight_of(m) for m in gm.graph.nodes if is_expert_matmul(m)}}
    free = build_tp_problem(gm, cluster, 2, float("inf"))
    whole = build_tp_problem(gm, cluster, 2, float("inf"), fixed={name: "R" for name in weights})
    split, kept = solve_tp(free.problem), solve_tp(whole.problem)
    assert split.objective_seconds < kept.objective_seconds
    assignment = assignment_from_solution(gm, free, split)
    assert {assignment.nodes[n].strategy for n in assignment.nodes if "grouped_mm" in n} == {"colwise", "rowwise"}
    blocks = coarsen(gm, cluster, depth=0)
    restated = restate_blocks(gm, blocks, cluster, free, split.choice, assignment)
    for before, after in zip(blocks.blocks, restated.blocks):
        assert after.expert_param_bytes * 2 == before.expert_param_bytes
    from test_expert_parallel import moe_model  # d 32: not worth splitting

    narrow = moe_model("mixtral", 4, 2, False)
    with warnings.catch_warnings():   # the tp group may split nothing, and is told so
        warnings.simplefilter("ignore", UserWarning)
        kept_whole = autopart.compile(narrow, 2, example_inputs=(torch.randint(0, VOCAB, (2, 8)),),
                                      tensor_parallel=2, pipeline_parallel=1, data_parallel=1)
    assert kept_whole.plan.experts.tp == 1 and _expert_splits(kept_whole) == {"replicate"}
    assert "tensor parallelism leaves them whole" in kept_whole.report()
