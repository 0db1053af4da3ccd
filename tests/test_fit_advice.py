"""The advice of a plan that does not fit comes from the search that plans, so it cannot contradict a
plan: "the smallest count that fits is N" means N devices plan and N − 1 do not, and "a batch of at
most B samples fits" means B plans on the devices given."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import autopart
from autopart.cost_models import Cluster, DeviceSpec

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))


def _smallest_count(message: str) -> int:
    return int(re.search(r"the smallest count of \S+ devices that fits is (\d+)", message).group(1))


def _largest_batch(message: str) -> int | None:
    found = re.search(r"a batch of at most (\d+) samples fits", message)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("devices,count", [("1xH100", 4), ("2xH100", 4)])
def test_a_linear_too_large_for_one_h100_names_the_count_that_plans(devices, count):
    """Linear(100000, 100000) (40 GB of float32 weights, 160 GB with Adam) plans with tp = 4 on
    "4xH100"; on 1 and 2 H100s the error said "even 8 (16) H100 devices do not hold it"."""
    with torch.device("meta"):
        model = nn.Linear(100000, 100000)
    x = torch.randn(8, 100000, device="meta")
    with pytest.raises(autopart.PlanError) as info:
        autopart.compile(model, devices, example_inputs=(x,))
    assert _smallest_count(str(info.value)) == count
    assert "tp=4" in str(info.value)
    assert autopart.compile(model, f"{count}xH100", example_inputs=(x,)).plan.mesh.tp == 4
    with pytest.raises(autopart.PlanError):
        autopart.compile(model, f"{count - 1}xH100", example_inputs=(x,))


def test_a_gpt_that_misses_one_h100_is_told_two_and_its_largest_batch():
    """The bf16 24×2048 GPT at batch 128 × 1024 in one microbatch (benchmarks/recompute_gpu.py's) on
    one H100: the error said "the smallest count that fits is 1" and "microbatches of at most 177
    samples fit", both contradicting the failure."""
    from peers import PRESETS, build_gpt

    model = build_gpt(PRESETS["large"])
    ids = torch.zeros(128, 1024, dtype=torch.long, device="meta")
    with pytest.raises(autopart.PlanError) as info:
        autopart.compile(model, "1xH100", example_inputs=(ids,), num_microbatches=1)
    message = str(info.value)
    assert _smallest_count(message) == 2
    largest = _largest_batch(message)
    assert largest is not None and largest < 128
    autopart.compile(model, "2xH100", example_inputs=(ids,), num_microbatches=1)
    autopart.compile(model, "1xH100", example_inputs=(ids[:largest],), num_microbatches=1)
    with pytest.raises(autopart.PlanError):
        autopart.compile(model, "1xH100", example_inputs=(ids[:largest + 1],), num_microbatches=1)


def _small(memory_mib: int) -> DeviceSpec:
    return DeviceSpec(name="small", memory_bytes=memory_mib * 2**20, memory_bandwidth=1e12,
                      peak_flops_by_dtype=(("float32", 1e14),))


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(2, 6), width=st.sampled_from([256, 512, 1024]), devices=st.integers(1, 3),
       memory_mib=st.integers(4, 24), batch=st.sampled_from([2, 4, 8]))
def test_the_smallest_count_that_fits_plans_and_one_fewer_does_not(depth, width, devices, memory_mib, batch):
    with torch.device("meta"):
        model = nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(width, width), nn.GELU())])
    x = torch.randn(batch, 16, width, device="meta")
    small = _small(memory_mib)
    try:
        autopart.compile(model, Cluster.from_devices([small] * devices), example_inputs=(x,))
        event("fits")
        return  # it fits: nothing to advise
    except autopart.PlanError as error:
        message = str(error)
    if "the smallest count" not in message:
        assert "do not hold it" in message  # beyond the counts probed, said so
        event("beyond the counts probed")
        return
    count = _smallest_count(message)
    event("advised a count")
    assert count > devices
    autopart.compile(model, Cluster.from_devices([small] * count), example_inputs=(x,))
    with pytest.raises(autopart.PlanError):
        autopart.compile(model, Cluster.from_devices([small] * (count - 1)), example_inputs=(x,))
    largest = _largest_batch(message)
    if largest is not None:
        autopart.compile(model, Cluster.from_devices([small] * devices), example_inputs=(x[:largest],))
