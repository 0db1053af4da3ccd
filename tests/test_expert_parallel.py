"""Expert parallelism: plans that split the experts compute what the model computes.

Small random HF mixture-of-experts models (Mixtral: routed experts; Qwen3-MoE; DeepSeek-V3: a dense
first layer, a shared expert, grouped routing, MLA) × pp × tp × ep × microbatches, simulated on one
process: outputs, the loss and every parameter's gradient equal the single-device run at float32
tolerances (autopart.verify); the routers' load-balancing loss equals the model's on each microbatch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import autopart
from autopart import verify, zoo
from autopart.passes.expert_parallel import expert_modules

transformers = pytest.importorskip("transformers")

VOCAB = 64


def moe_model(family: str, num_experts: int, top_k: int, shared: bool, router_logits: bool = False):
    """A two- or three-layer HF model with `num_experts` routed experts, `top_k` per token
    (`router_logits`: Mixtral and Qwen3-MoE also return their load-balancing loss)."""
    if family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=num_experts, num_experts_per_tok=top_k,
                               vocab_size=VOCAB, output_router_logits=router_logits)
        return MixtralForCausalLM(config)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=num_experts,
                                num_experts_per_tok=top_k, vocab_size=VOCAB, output_router_logits=router_logits)
        return Qwen3MoeForCausalLM(config)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(num_hidden_layers=3, first_k_dense_replace=1, hidden_size=32, intermediate_size=48,
                              moe_intermediate_size=16, num_attention_heads=4, num_key_value_heads=4,
                              n_routed_experts=num_experts, n_shared_experts=1 if shared else 0,
                              num_experts_per_tok=top_k, n_group=num_experts // 2, topk_group=1, vocab_size=VOCAB, q_lora_rank=16,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    return DeepseekV3ForCausalLM(config)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # each example compiles: no slow shrinking
@given(family=st.sampled_from(["mixtral", "qwen3_moe", "deepseek_v3"]), num_experts=st.sampled_from([2, 4]),
       top_k=st.sampled_from([1, 2]), shared=st.booleans(), pp=st.sampled_from([1, 2]), tp=st.sampled_from([1, 2]),
       ep=st.sampled_from([1, 2]), microbatches=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_expert_parallel_plans_equal_the_model(family, num_experts, top_k, shared, pp, tp, ep, microbatches, seed):
    torch.manual_seed(seed)
    model = moe_model(family, num_experts, top_k, shared)
    dp = 2
    ids = torch.randint(0, VOCAB, (dp * microbatches, 8))
    compiled = autopart.compile(model, dp * pp * tp, example_inputs=(ids,), data_parallel=dp, pipeline_parallel=pp,
                                tensor_parallel=tp, expert_parallel=ep, num_microbatches=microbatches)
    assert compiled.plan.mesh.ep == ep and compiled.plan.experts is not None
    split = sum(len(expert_modules(compiled.stage_module(s, t))) for s in range(compiled.plan.num_stages)
                for t in range(tp))
    moe_layers = len(compiled.plan.experts.layers)
    assert split == (2 * moe_layers * tp if ep > 1 else 0)  # gate_up and down of every MoE layer, per tp rank
    verify.verify(compiled, model, (ids,))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_load_balancing_loss_equals_the_models_on_each_microbatch(family):
    """The auxiliary loss is a function of the batch it routes (fractions of tokens per expert), so a
    microbatched or data-parallel run has one per microbatch, as Megatron's does: each equals the
    model's on that microbatch's rows."""
    torch.manual_seed(0)
    model = moe_model(family, 4, 2, False, router_logits=True)
    ids = torch.randint(0, VOCAB, (4, 8))
    compiled = autopart.compile(model, 4, example_inputs=(ids,), data_parallel=2, pipeline_parallel=2,
                                tensor_parallel=1, expert_parallel=2, num_microbatches=2)
    model.eval()
    outputs = compiled._modules().local.forward(compiled.io.flatten((ids,), {}))
    assert len(outputs) == 4  # dp × m microbatches of one row
    for row, flat in enumerate(outputs):
        expected = model(ids[row:row + 1])
        got = compiled.io.unflatten(flat)
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_each_rank_holds_its_block_of_the_experts():
    torch.manual_seed(0)
    model = moe_model("mixtral", 4, 2, False)
    ids = torch.randint(0, VOCAB, (4, 8))
    compiled = autopart.compile(model, 4, example_inputs=(ids,), data_parallel=4, pipeline_parallel=1,
                                tensor_parallel=1, expert_parallel=2)
    whole = model.model.layers[1].mlp.experts.gate_up_proj
    path = next(p for p, name in compiled.interfaces[0].parameters if name == "model.layers.1.mlp.experts.gate_up_proj")
    for rank in range(4):  # ranks are replicas here: ep index = replica % 2
        block = compiled.rank_modules(rank)[0].get_parameter(path)
        torch.testing.assert_close(block, whole[(rank % 2) * 2:(rank % 2) * 2 + 2])
    assert compiled.stage_module(0).get_parameter(path).shape == whole.shape  # the simulation keeps them whole


def test_plan_json_and_report_say_how_experts_are_held():
    torch.manual_seed(0)
    model = moe_model("qwen3_moe", 4, 2, False)
    ids = torch.randint(0, VOCAB, (4, 8))
    split = autopart.compile(model, 4, example_inputs=(ids,), data_parallel=4, pipeline_parallel=1,
                             tensor_parallel=1, expert_parallel=4)
    assert autopart.Plan.from_json(split.plan.to_json()) == split.plan
    assert split.plan.experts.ep == 4 and split.plan.experts.per_rank == 1
    assert "split over ep=4 replicas: 1 experts per rank" in split.report()
    assert "ep=4" in split.report().splitlines()[2]  # the mesh line
    replicated = autopart.compile(model, 2, example_inputs=(ids,), data_parallel=1, pipeline_parallel=1,
                                  tensor_parallel=2, expert_parallel=1)
    assert "replicated: every rank holds all experts (tensor parallelism leaves them whole)" in replicated.report()


def test_expert_parallel_must_divide_the_replicas_and_the_experts():
    model = moe_model("mixtral", 4, 2, False)
    ids = torch.randint(0, VOCAB, (4, 8))
    with pytest.raises(autopart.InputError, match=r"expert_parallel=3: it must divide the 4 experts"):
        autopart.compile(model, 3, example_inputs=(torch.randint(0, VOCAB, (3, 8)),), data_parallel=3,
                         expert_parallel=3)
    with pytest.raises(autopart.InputError, match="expert_parallel=2: the model has no mixture-of-experts layer"):
        autopart.compile(zoo.gpt(layers=2, d_model=16, heads=2, vocab=32, seq=8, batch=2).model, 2,
                         example_inputs=(torch.randint(0, 32, (2, 8)),), data_parallel=2, expert_parallel=2)
    assert ids.shape == (4, 8)


def test_the_infeasible_error_names_expert_parallelism():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(num_hidden_layers=4, hidden_size=4096, intermediate_size=16384, num_attention_heads=16,
                           num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                           max_position_embeddings=512)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)  # 6.9B parameters: Adam's state is more than one H100
    with pytest.raises(autopart.PlanError, match=r"experts: 24.0 GiB of the 25.7 GiB of weights are 8 experts per "
                                                 r"layer; expert_parallel \(tried 1\)"):
        autopart.compile(model, "1xH100", example_inputs=(torch.randint(0, 32000, (2, 512)),), optimizer="adamw")
