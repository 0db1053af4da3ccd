"""Mixed precision for the grouped expert matmuls (passes/expert_precision.py): both operands in bf16.

The reference is eager `torch.autocast("cpu", bfloat16)` with HF's grouped matmul fed bf16 operands
(autocast's rule for every other matmul; HF casts the rows to the float32 master weight instead),
through the same looped kernel the traced graph holds. Tolerances as tests/test_mixed_precision.py:
the loss within bf16's rtol 1.6e-2, every gradient norm-wise within it. A float32 run of the experts
also lies within them, so each test checks that the experts compute in bf16 too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import autopart
from autopart.cost_models import Cluster
from autopart.frontend.source import annotate_graph
from autopart.passes.expert_parallel import expert_weight_of, is_expert_matmul
from autopart.passes.expert_precision import experts_in_compute_dtype
from autopart.passes.node_costs import node_cost

transformers = pytest.importorskip("transformers")
from transformers.integrations import moe as hf_moe  # noqa: E402

from test_expert_parallel import VOCAB, moe_model  # noqa: E402

BF16_RTOL = 1.6e-2


def _loss(output, target):
    return F.cross_entropy(output.logits.flatten(0, 1).float(), target.flatten())


def _eager_bf16_experts(model, ids, target, monkeypatch):
    """Eager autocast, the grouped matmuls on bf16 operands (HF's own kernel choice otherwise)."""
    reference = copy.deepcopy(model)
    with monkeypatch.context() as patch:
        patch.setattr(hf_moe, "_grouped_mm", lambda x, w, offs: torch.ops.transformers.grouped_mm_fallback(
            x.to(torch.bfloat16), w.to(torch.bfloat16), offs=offs))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = reference(ids)
            loss = _loss(output, target)
        loss.backward()
    return loss.detach(), {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}


def _expert_matmuls(gm):
    return [n for n in gm.graph.nodes if is_expert_matmul(n)]


def test_grouped_matmuls_take_bf16_operands_and_keep_reading_their_parameter():
    torch.manual_seed(0)
    model = moe_model("mixtral", 4, 2, False)
    gm = autopart.trace(model, (torch.randint(0, VOCAB, (2, 8)),))
    before = {n.name: expert_weight_of(n) for n in _expert_matmuls(gm)}
    assert len(before) == 4 and all(before.values())
    assert experts_in_compute_dtype(gm, torch.bfloat16) == list(before)
    for node in _expert_matmuls(gm):
        assert expert_weight_of(node) == before[node.name]   # the parameter, through cast and transpose
        assert node.args[0].meta["val"].dtype == node.args[1].meta["val"].dtype == torch.bfloat16
        assert node.args[0].args[0].target is not torch.ops.aten.to.dtype   # HF's widening to float32 skipped
    assert experts_in_compute_dtype(gm, torch.bfloat16) == []   # already in bf16: nothing to do


def test_bf16_experts_are_priced_at_the_bf16_rate():
    """The grouped matmuls' FLOPs at the H100's bf16 peak, not its float32 one (67 TFLOP/s)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(num_hidden_layers=1, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                           num_key_value_heads=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB)
    with torch.device("meta"):   # shapes only: large enough that the kernels' FLOPs, not launches, count
        model = MixtralForCausalLM(config)
        ids = torch.randint(0, VOCAB, (8, 512))
    h100 = Cluster.parse("1xH100")
    mixed = annotate_graph(autopart.trace(model, (ids,)), h100, torch.bfloat16)
    full = annotate_graph(autopart.trace(model, (ids,)), h100, None)
    for m, f in zip(_expert_matmuls(mixed), _expert_matmuls(full)):
        assert m.meta["val"].dtype == torch.bfloat16 and f.meta["val"].dtype == torch.float32
        assert node_cost(m).fwd_flops == node_cost(f).fwd_flops
        assert node_cost(m).fwd_seconds("H100") < node_cost(f).fwd_seconds("H100") / 3


@pytest.mark.parametrize("family,layout", [
    ("mixtral", dict(pipeline_parallel=2, data_parallel=1, expert_parallel=1, num_microbatches=2)),
    ("deepseek_v3", dict(pipeline_parallel=1, data_parallel=2, expert_parallel=2, num_microbatches=1)),
], ids=["mixtral-pp2", "deepseek-ep2"])
def test_bf16_expert_plans_equal_eager_autocast_with_bf16_experts(family, layout, monkeypatch):
    torch.manual_seed(0)
    model = moe_model(family, 4, 2, True)
    ids = torch.randint(0, VOCAB, (4, 8))
    target = torch.randint(0, VOCAB, (4, 8))
    devices = layout["pipeline_parallel"] * layout["data_parallel"]
    cm = autopart.compile(model, devices, example_inputs=(ids,), mixed_precision="bf16", tensor_parallel=1,
                          **layout)
    matmuls = [n for s in range(cm.plan.num_stages) for n in cm.stage_module(s).graph.nodes
               if n.op == "call_module" and "expert_parallel" in str(n.target) or is_expert_matmul(n)]
    assert matmuls and all(n.args[0].meta["val"].dtype == torch.bfloat16 for n in matmuls)
    ref_loss, ref_grads = _eager_bf16_experts(model, ids, target, monkeypatch)
    loss, grads = cm.simulate_train_step(ids, target=target, loss_fn=_loss)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=BF16_RTOL, atol=0.0)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, f"{name}: gradient in {grad.dtype}"
        error = float((grad - ref_grads[name]).norm() / ref_grads[name].norm())
        assert error <= BF16_RTOL, f"{name}: gradient off by {error:.2e} norm-wise"


def test_the_graph_runs_on_bf16_weights_as_fsdp_hands_them():
    """FSDP's mixed precision gathers the parameters in bf16. HF's traced experts cast the rows to the
    float32 weights of trace time, so on bf16 weights its looped kernel met float32 rows and failed
    ("expected m1 and m2 to have the same dtype"); with both operands cast, the cast of a bf16 weight is
    the weight itself and the step runs, equal to the float32-weights run within bf16's bounds."""
    torch.manual_seed(0)
    model = moe_model("mixtral", 4, 2, False)
    ids = torch.randint(0, VOCAB, (2, 8))
    gm = annotate_graph(autopart.trace(model, (ids,)), Cluster.parse("1xH100"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = gm(ids).logits.float()
    for name, p in list(gm.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, torch.nn.Parameter(p.detach().to(torch.bfloat16)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gm(ids).logits.float()
    assert float((got - expected).norm() / expected.norm()) <= BF16_RTOL


def test_expert_weight_copies_are_priced_per_rank_whatever_the_microbatch():
    """Each microbatch's forward copies the rank's E / ep experts to bf16 and the grouped matmuls keep the
    copy for backward: E / ep experts' bf16 bytes per microbatch in flight, none when FSDP hands bf16
    weights (zero2 at ep = 1) or the block is recomputed; the activations proper leave them out."""
    from autopart.core.request import PlanRequest
    from autopart.core.setting import Setting
    from autopart.passes.coarsen import coarsen
    from autopart.planner.step_costs import activation_bytes, expert_copy_bytes

    torch.manual_seed(0)
    model = moe_model("mixtral", 4, 2, False)
    cluster = Cluster.parse("4xH100")
    gm = annotate_graph(autopart.trace(model, (torch.randint(0, VOCAB, (2, 8)),)), cluster, torch.bfloat16)
    blocks = [b for b in coarsen(gm, cluster, depth=0).blocks if b.expert_cast_bytes]
    experts = model.model.layers[0].mlp.experts
    assert len(blocks) == 2   # one per MoE layer
    assert all(b.expert_cast_bytes == 2 * (experts.gate_up_proj.numel() + experts.down_proj.numel()) for b in blocks)
    request = PlanRequest(batch_size=2, mixed_precision="bf16", optimizer="adamw")
    block = blocks[0]
    assert expert_copy_bytes(block, request, Setting(dp=4, ep=2)) == block.expert_cast_bytes / 2
    assert expert_copy_bytes(block, request, Setting(dp=4, ep=1)) == block.expert_cast_bytes
    assert expert_copy_bytes(block, request, Setting(dp=4, mode="zero2", dp_shard=4)) == 0
    assert expert_copy_bytes(block, request, Setting(dp=4, ep=2), recompute="full") == 0
    assert activation_bytes(block, request, Setting(dp=4)) == block.saved_bytes - block.expert_cast_bytes
