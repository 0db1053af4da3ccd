"""Stacks of a few kinds of layer (dense and MoE, sliding-window and global attention) are analysed
through a copy with one inner layer of each kind: the restated blocks, values and plan equal the
whole model's analysis, and the plan computes what the model computes."""

from __future__ import annotations

import pytest
import torch

import autopart
from autopart import verify
from autopart.frontend.analysis import analyse
from autopart.frontend.device_arg import resolve_devices
from autopart.passes.layer_stack import find_layer_stack

transformers = pytest.importorskip("transformers")


def _deepseek():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        num_hidden_layers=7, first_k_dense_replace=2, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, vocab_size=64, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        num_hidden_layers=20, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=64, sliding_window=4, max_position_embeddings=64))


@pytest.mark.parametrize("build,kept,kinds", [(_deepseek, 5, 2), (_gemma3, 13, 2)], ids=["deepseek_v3", "gemma3"])
def test_a_copy_with_one_inner_layer_per_kind_restates_the_whole_model(build, kept, kinds):
    torch.manual_seed(0)
    model = build()
    stack = find_layer_stack(model)
    assert stack is not None and stack.keep == kept and stack.num_kinds == kinds
    ids = torch.randint(0, 64, (1, 16))
    cluster = resolve_devices(4)
    copy = analyse(model, (ids,), {}, cluster, None)
    whole = analyse(model, (ids,), {}, cluster, None, reuse_layers=False)
    assert copy.expansion is not None and copy.stack.kept == tuple(range(kept))
    restated = copy.restate(copy.blocks)
    assert [(b.name, b.fwd_flops, b.bwd_flops, b.param_bytes, b.saved_bytes, b.times, b.expert_param_bytes)
            for b in restated.blocks] == [
        (b.name, b.fwd_flops, b.bwd_flops, b.param_bytes, b.saved_bytes, b.times, b.expert_param_bytes)
        for b in whole.blocks.blocks]
    values = lambda graph: sorted((v.producer, v.consumers, v.num_bytes) for v in graph.values)  # noqa: E731
    assert values(restated) == values(whole.blocks)


def test_plans_of_mixed_stacks_equal_the_model():
    torch.manual_seed(0)
    model = _gemma3()
    ids = torch.randint(0, 64, (4, 16))
    options = dict(example_inputs=(ids,), pipeline_parallel=4, data_parallel=1, num_microbatches=4)
    reused = autopart.compile(model, 4, **options)
    assert reused.plan.predicted_step_seconds == autopart.compile(model, 4, reuse_layers=False,
                                                                  **options).plan.predicted_step_seconds
    verify.verify(reused, model, (ids,))
