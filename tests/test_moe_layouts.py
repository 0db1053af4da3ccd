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


def test_zero_shards_the_expert_blocks_over_edp_in_memory_and_sync():
    """Under ZeRO with expert parallelism each rank holds E / ep experts, and FSDP shards that block over
    the edp = dp / ep replicas holding it as the mode shards the dense part over dp (runtime/data_parallel.py):
    ZeRO-2's state is (weights + optimizer state) / edp plus the gathered bf16 copy, its gradients the
    unreduced bf16-sized copy plus a shard; the gathers and reduce-scatters run over edp. With one replica
    per block (ep = dp) or under DDP the block is held whole."""
    from autopart.axes.data import experts_sharded_over_edp
    from autopart.core.blocks import Block
    from autopart.core.request import PlanRequest
    from autopart.core.setting import Setting
    from autopart.cost_models import optimizer_state_bytes
    from autopart.planner.step_costs import block_gradient_bytes, block_state_bytes, expert_weights_in_compute_dtype

    experts, dense = 64 * 2**20, 8 * 2**20
    block = Block(name="moe", node_names=(), param_names=(), signature="", fwd_flops=0, bwd_flops=0,
                  param_bytes=experts + dense, num_params=0, trainable_param_bytes=experts + dense, buffer_bytes=0,
                  saved_bytes=0, times=(), expert_param_bytes=experts, expert_trainable_param_bytes=experts,
                  num_experts=8)
    request = PlanRequest(batch_size=8, mixed_precision="bf16", optimizer="adamw")
    adam = optimizer_state_bytes(1, "adamw")
    zero2 = Setting(dp=8, mode="zero2", dp_shard=8, ep=2)   # edp = 4
    assert experts_sharded_over_edp(zero2) and expert_weights_in_compute_dtype(request, zero2)
    share = experts / 2
    dense_state = (dense + adam * dense) / 8 + dense * 0.5
    assert block_state_bytes(block, request, zero2) == pytest.approx(dense_state + (share + adam * share) / 4 + share * 0.5)
    assert block_gradient_bytes(block, request, zero2) == pytest.approx(dense * 0.5 + dense / 8 + share * 0.5 + share / 4)
    whole = Setting(dp=2, mode="zero2", dp_shard=2, ep=2)   # edp = 1: the block stays whole, float32
    assert not experts_sharded_over_edp(whole) and not expert_weights_in_compute_dtype(request, whole)
    assert block_state_bytes(block, request, whole) == pytest.approx(
        (dense + adam * dense) / 2 + dense * 0.5 + share + adam * share)
    assert not experts_sharded_over_edp(Setting(dp=8, mode="ddp", ep=2))
