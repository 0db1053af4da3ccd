"""A published mixture-of-experts layout, priced the same way as autopart's own plan, is never faster.

DeepSeek-V3 trained with pipeline × expert parallelism over ZeRO-1 data parallelism (pp 16 × ep 64 of
dp 128 on 2048 GPUs; benchmarks/moe_plan_scale.py prices it at full size). Here a DeepSeek-V3-shaped
model of 16B parameters (DeepSeek-V2-Lite's widths: 27 layers, the first dense, 64 routed experts top-6
and a shared one, MLA), on the meta device, for 128 H100s: the published shape scaled down (pp 4 × ep 8
of dp 32, zero2: the closest mode to ZeRO-1) with microbatches, schedule and recomputation left to the
planner, as DeepSeek chose them freely, against everything left to the planner. The search covers the
published layout, so its own plan must be at least as fast under the same cost model.
"""

from __future__ import annotations

import pytest
import torch

import autopart

transformers = pytest.importorskip("transformers")

SEQ = 4096
VOCAB = 32000


def _deepseek_16b():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=VOCAB, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                              num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
                              num_key_value_heads=16, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6,
                              n_group=8, topk_group=2, routed_scaling_factor=2.5, kv_lora_rank=128, q_lora_rank=256,
                              qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=SEQ)
    with torch.device("meta"):
        return DeepseekV3ForCausalLM(config), torch.randint(0, VOCAB, (1024, SEQ))


def test_autopart_plan_is_never_slower_than_the_published_layout():
    model, ids = _deepseek_16b()
    common = dict(example_inputs=(ids,), mixed_precision="bf16", optimizer="adamw")
    published = autopart.compile(model, "16x8xH100", pipeline_parallel=4, data_parallel=32, expert_parallel=8,
                                 tensor_parallel=1, data_parallel_mode="zero2", **common).plan
    own = autopart.compile(model, "16x8xH100", **common).plan
    assert (published.mesh.pp, published.mesh.dp, published.mesh.ep, published.mesh.tp) == (4, 32, 8, 1)
    assert published.data_parallel_mode == "zero2"
    assert own.predicted_step_seconds <= published.predicted_step_seconds * (1 + 1e-9), (
        own.predicted_step_seconds, published.predicted_step_seconds)
