"""Errors autopart raises are short, name the thing and the fix, and keep what caused them reachable
(`__cause__`, the CLI's --verbose) without printing it by default; mistakes are caught at compile."""

from __future__ import annotations

import logging
import textwrap
import traceback

import pytest
import torch
from torch import nn

import autopart
from autopart import zoo
from autopart.cli.commands import main
from autopart.core.errors import InputError, TraceError


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


class _Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def forward(self, x):
        raise ValueError("boom in forward")


def test_mesh_sizes_that_need_more_devices_say_how_many():
    with pytest.raises(InputError, match=r"2 × 2 × 2 = 8 devices, you gave 4"):
        autopart.compile(_mlp(), 4, example_inputs=(torch.randn(4, 8),), data_parallel=2, tensor_parallel=2,
                         pipeline_parallel=2)
    with pytest.raises(InputError, match=r"data_parallel=4 × pipeline_parallel=2: 4 × 2 = 8 devices, you gave 4"):
        autopart.compile(_mlp(), 4, example_inputs=(torch.randn(4, 8),), data_parallel=4, pipeline_parallel=2)


def test_a_tp_plan_pattern_that_matches_nothing_is_rejected():
    with pytest.raises(InputError, match=r"tp_plan pattern 'nothere\.\*' matches no layer of Sequential.*0, 2"):
        autopart.compile(_mlp(), 2, example_inputs=(torch.randn(4, 8),), tensor_parallel=2,
                         tp_plan={"nothere.*": "colwise"})


def test_a_long_tensor_into_a_float_model_is_caught_at_compile():
    """Fake tensors let linear(int64, float32) through tracing; eager PyTorch refuses it."""
    with pytest.raises(TraceError, match=r"module 0 \(linear.default\) gets operands of different dtypes "
                                         r"\(input int64, 0.weight float32"):
        autopart.compile(_mlp(), 2, example_inputs=(torch.randint(0, 5, (4, 8)),))


@pytest.mark.parametrize("model,x,cause", [(_Raises(), torch.randn(4, 8), ValueError),
                                           (_mlp(), torch.randn(4, 16), RuntimeError)],
                         ids=["forward raises", "wrong feature size"])
def test_trace_errors_are_short_and_keep_their_cause(model, x, cause):
    with pytest.raises(TraceError) as caught:
        autopart.compile(model, 2, example_inputs=(x,))
    error = caught.value
    assert isinstance(error.__cause__, cause)  # the model's own error, reachable
    assert error.__cause__.__context__ is None  # not chained to every tracer's attempt before it
    printed = "".join(traceback.format_exception(error))
    assert len(printed.splitlines()) < 60, printed  # was 179 and 384 lines
    assert printed.rstrip().splitlines()[-1].startswith("  fix:")  # its own message ends the output


def test_cli_prints_the_message_and_the_cause_only_with_verbose(tmp_path, capsys):
    models = tmp_path / "wrong.py"
    models.write_text(textwrap.dedent("""
        from torch import nn

        def model():
            return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    """))
    args = ["plan", f"{models}:model", "--devices", "2", "--input-shape", "4,16", "-q", "--real-weights"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mat1 and mat2 shapes cannot be multiplied" in err and "--verbose" in err
    assert len(err.splitlines()) <= 6
    assert main(args + ["--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("  fix:")


def test_cli_plans_on_the_meta_device_unless_weights_are_needed(capsys):
    """Only a plan asked for: the model is built on the meta device (no weights), and the CLI says so."""
    assert main(["plan", "autopart.zoo:gpt", "--devices", "8xH100", "--factory-arg", "layers=4"]) == 0
    captured = capsys.readouterr()
    assert "on the meta device" in captured.err and "built GPT" in captured.err
    assert captured.out.startswith("autopart plan: GPT on 8 × H100")


def test_zoo_defaults_give_transformers_nothing_to_warn_about(caplog, capfd):
    with caplog.at_level(logging.WARNING):
        for family in zoo.TRANSFORMERS_FAMILIES.values():
            family()
    assert not [r for r in caplog.records if "vocabulary" in r.getMessage()]
    assert "within the vocabulary" not in capfd.readouterr().err
