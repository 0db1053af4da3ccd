"""Mixture-of-experts pricing: grouped expert matmuls counted as they run, histc on fake CPU tensors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autopart.cost_models import op_flops
from autopart.cost_models.experts import expert_loop_launches, grouped_mm_flops

transformers = pytest.importorskip("transformers")


def test_grouped_mm_flops_equal_the_loop_of_matmuls_it_stands_for():
    tokens, hidden, out, offs = 12, 16, 8, torch.tensor([4, 4, 12], dtype=torch.int32)  # expert 1 gets no row
    x, w = torch.randn(tokens, hidden), torch.randn(3, hidden, out)
    with FlopCounterMode(display=False) as counter:
        start = 0
        for group, end in enumerate(offs.tolist()):
            torch.mm(x[start:end], w[group])
            start = end
    assert grouped_mm_flops(x.shape, w.shape) == counter.get_total_flops() == 2 * tokens * hidden * out
    assert op_flops(torch.ops.aten._grouped_mm.default, (x, w, offs)) == (2 * 2 * 12 * 16 * 8 // 2,
                                                                          2 * 2 * 12 * 16 * 8)
    assert grouped_mm_flops((3, 5, 16), (3, 16, 8)) == 2 * 3 * 5 * 16 * 8


def _tiny_mixtral(device: str = "cpu"):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                           max_position_embeddings=64)
    with torch.device(device):
        return MixtralForCausalLM(config), config


def test_hf_experts_are_priced_at_top_k_times_tokens_rows():
    from autopart.cost_models import Cluster
    from autopart.passes.node_costs import annotate, node_cost

    import autopart

    model, config = _tiny_mixtral()
    ids = torch.randint(0, 128, (2, 16))
    gm = annotate(autopart.trace(model, (ids,)), Cluster.parse("1xH100"))
    grouped = [n for n in gm.graph.nodes if "grouped_mm" in str(n.target)]
    assert len(grouped) == 2 * config.num_hidden_layers  # gate_up and down per layer
    routed = 2 * 16 * config.num_experts_per_tok
    up, down = grouped[:2]
    assert node_cost(up).fwd_flops == 2 * routed * config.hidden_size * 2 * config.intermediate_size
    assert node_cost(down).fwd_flops == 2 * routed * config.intermediate_size * config.hidden_size
    assert node_cost(up).bwd_flops == 2 * node_cost(up).fwd_flops
    # the looped fallback launches one mm per expert (two backward, plus the zero fills)
    assert expert_loop_launches(up.target, [None, torch.empty(4, 64, 192)]) == (4, 9)


def test_a_meta_device_moe_model_plans_through_histc_of_int32():
    """Off the CPU, HF's grouped experts count tokens per expert with histc of an int32 tensor,
    which the CPU's meta check refuses; the planner's fake CPU tensors take it."""
    import autopart

    model, _ = _tiny_mixtral("meta")
    ids = torch.randint(0, 128, (4, 16))
    compiled = autopart.compile(model, "1xH100", example_inputs=(ids,), mixed_precision="bf16")
    assert compiled.plan.predicted_step_seconds > 0
