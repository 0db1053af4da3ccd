"""A plan's step does not depend on the microbatch size the model was traced at.

The planner traces at the smallest microbatch any candidate uses and scales each block's time to
the plan's microbatch: launches and the work done once per call (autocast's weight conversions,
reading the weights) stay, the rest grows with the batch (passes/node_costs.py, `BlockTimes`).
Scaling everything multiplied the weights' conversions by the samples per microbatch: Llama
16 × 2048 inference at batch 16 × 1024 on an H100 was priced 0.129 s traced at one sample, 0.083 s
traced at sixteen (a measured forward: 0.088 s). Models on the meta device; nothing runs.
"""

from __future__ import annotations

import pytest
import torch

import autopart
from autopart import zoo
from autopart.cost_models import get_preset, weight_read_seconds

H100 = get_preset("H100")


@pytest.mark.parametrize("family,training", [("llama", False), ("llama", True), ("gpt2", False)])
def test_a_plan_traced_at_one_sample_prices_sixteen_as_one_traced_at_sixteen(family, training):
    with torch.device("meta"):
        entry = getattr(zoo, family)(layers=2, d_model=512, seq=256, batch=16, vocab=4096)
    steps = {}
    for microbatches in (None, 1):  # None: traced at the smallest microbatch (1), the plan takes m = 1
        plan = autopart.compile(entry.model, "1xH100", example_inputs=entry.args, mixed_precision="bf16",
                                training=training, num_microbatches=microbatches, compile_kernels=False).plan
        assert plan.num_microbatches == 1
        steps[microbatches] = plan.predicted_step_seconds
    # within a few percent (a matmul between memory- and compute-bound at one sample is priced a
    # little high at sixteen: cost_models/roofline.py), where scaling every cost gave 2.9-3.8 times
    assert steps[None] == pytest.approx(steps[1], rel=0.03)


def test_an_inference_plan_charges_only_the_forward():
    with torch.device("meta"):
        entry = zoo.llama(layers=2, d_model=256, seq=128, batch=8, vocab=1024)
    plan = autopart.compile(entry.model, "2xH100", example_inputs=entry.args, mixed_precision="bf16",
                            training=False, data_parallel=2).plan
    assert plan.optimizer_seconds == 0 and plan.data_parallel_sync_seconds == 0
    for stage in plan.stages:
        assert stage.bwd_seconds == 0 and stage.memory.grads == 0 and stage.memory.optimizer == 0
        assert stage.memory.activations == 0


def test_reading_the_weights_is_a_per_call_cost_only_where_it_bounds_the_op():
    bw = H100.achieved_bandwidth
    # memory-bound on its weights (a matmul of few rows): the whole weight read is per call
    assert weight_read_seconds(1e6, 100e6, 90e6, H100, torch.bfloat16) == pytest.approx(90e6 / bw)
    # compute-bound even with them: reading them adds nothing
    assert weight_read_seconds(1e13, 100e6, 90e6, H100, torch.bfloat16) == 0.0
    # in between: what the weights add above the compute time
    compute = 5e11 / H100.achieved_flops(torch.bfloat16)
    assert weight_read_seconds(5e11, 100e6, 90e6, H100, torch.bfloat16) == pytest.approx(
        max(compute, 100e6 / bw) - max(compute, 10e6 / bw))
    assert weight_read_seconds(1e9, 100e6, 0, H100, torch.bfloat16) == 0.0
