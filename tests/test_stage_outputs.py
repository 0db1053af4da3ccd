"""A stage returns its outputs laid out as it declared them to PipelineStage.

`example_outputs` declares contiguous tensors; torch 2.11's PipelineStage checks every forward
output's shape, dtype and strides against the declaration (later versions under
TORCH_DISTRIBUTED_DEBUG=DETAIL), so a model whose output is a slice or a transpose, or a compiled
region that returns another layout, must still hand back the declared strides. Runs the stage
adapter in this process, without a process group.
"""

from __future__ import annotations

import torch

import autopart
from autopart.runtime.pipelining import StageAdapter, example_inputs, example_outputs, received_vals, stage_output_vals


class SliceOut(torch.nn.Module):
    """Ends as ViT's classifier input does (the first token of a sequence) and as a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        return y[:, 0, :], y.transpose(1, 2)


def test_the_last_stage_returns_its_outputs_as_declared():
    model, x = SliceOut(), torch.randn(2, 5, 8)
    cm = autopart.compile(model, 1, example_inputs=(x,))
    stage = cm.plan.num_stages - 1
    interface = cm.interfaces[stage]
    positions = [0]
    adapter = StageAdapter(cm.rank_modules(0)[0], interface, positions, received_vals(cm, interface, positions),
                           stage_output_vals(cm, stage))
    adapter.constants = [x]  # the flat model inputs, as the runner sets them each step
    outputs = adapter(x)
    declared = example_outputs(adapter, torch.device("cpu"))
    assert [o.is_contiguous() for o in model(x)] == [False, False]  # the model's own outputs are views
    for out, want, eager in zip(outputs, declared, model(x), strict=True):
        assert (out.shape, out.dtype, out.stride()) == (want.shape, want.dtype, want.stride())
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert len(example_inputs(adapter, torch.device("cpu"))) == 1
