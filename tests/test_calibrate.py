"""`autopart.calibrate()`: measurements on this CPU, the α–β fit, efficiencies in DeviceSpec and the roofline."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import autopart
from autopart import zoo
from autopart.cli.commands import main as cli_main
from autopart.cost_models import Cluster, DeviceSpec, Link, all_reduce_seconds, get_preset, op_seconds, p2p_seconds
from autopart.calibrate import model_matmul_shapes
from autopart.cost_models import measure, shaped
from autopart.frontend.device_arg import resolve_devices
from autopart.core.errors import InputError


@pytest.fixture(scope="module")
def calibrated() -> Cluster:
    return autopart.calibrate(quick=True, num_devices=2, verbose=False)


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


# --- calibrate() on this CPU ------------------------------------------------------


def test_calibrate_measures_this_cpu(calibrated: Cluster) -> None:
    assert calibrated.num_devices == 2 and calibrated.is_homogeneous and calibrated.num_nodes == 1
    spec = calibrated.devices[0]
    assert spec.name == "CPU (calibrated)" and spec.device_type == "cpu"
    for dtype in ("float32", "bfloat16"):
        assert _finite_positive(spec.achieved_flops(dtype))
        assert spec.achieved_flops(dtype) == spec.peak_flops(dtype)  # no datasheet: the measured rate is the peak
    assert _finite_positive(spec.achieved_bandwidth) and spec.memory_efficiency == 1.0
    assert 0 < spec.launch_overhead_s < 1e-3
    assert spec.memory_bytes == get_preset("CPU").memory_bytes  # the host's RAM
    assert calibrated.intra_node_link == Cluster.cpu(2).intra_node_link  # one process: the loopback preset


def test_calibrate_reports_each_measurement_on_stderr(capsys) -> None:
    cluster = autopart.calibrate(dtypes=("float32",), quick=True, name="this host")
    err = capsys.readouterr().err
    for what in ("measuring cpu", "float32 matmul", "memory bandwidth", "launch floor"):
        assert "[autopart.calibrate] " in err and what in err, err
    assert "bfloat16" not in err and cluster.devices[0].name == "this host" and cluster.num_devices == 1


def test_calibrated_cluster_round_trips_through_json(calibrated: Cluster, tmp_path) -> None:
    assert Cluster.from_json(calibrated.to_json()) == calibrated
    path = tmp_path / "cluster.json"
    calibrated.save(path)
    assert Cluster.load(path) == calibrated
    assert resolve_devices(str(path)) == calibrated == resolve_devices(path)
    with pytest.raises(ValueError, match="not JSON"):
        Cluster.from_json("{")
    with pytest.raises(InputError, match="cannot read it"):
        resolve_devices(str(tmp_path / "missing.json"))


def test_compile_plans_on_a_calibrated_cluster(calibrated: Cluster, tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    x = torch.randn(8, 16)
    compiled = autopart.compile(model, calibrated, example_inputs=(x,), pipeline_parallel=2, num_microbatches=2)
    assert compiled.plan.cluster == calibrated.to_dict()
    torch.testing.assert_close(compiled.simulate(x), model(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "cluster.json"
    calibrated.save(path)
    again = autopart.compile(model, str(path), example_inputs=(x,), pipeline_parallel=2, num_microbatches=2)
    assert again.plan.cluster == calibrated.to_dict()


def test_cli_plan_reads_a_calibrated_cluster(calibrated: Cluster, tmp_path, capsys) -> None:
    path = tmp_path / "cluster.json"
    calibrated.save(path)
    (tmp_path / "models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))\n")
    assert cli_main(["plan", f"{tmp_path / 'models.py'}:make", "--devices", str(path), "--input-shape", "8,16",
                     "--pipeline-parallel", "2", "--quiet"]) == 0
    assert "CPU (calibrated)" in capsys.readouterr().out


def test_calibrate_refuses_a_device_it_cannot_measure() -> None:
    with pytest.raises(InputError, match="only 'cuda' and 'cpu'"):
        autopart.calibrate("meta", quick=True, verbose=False)
    with pytest.raises(InputError, match="num_devices=0"):
        autopart.calibrate("cpu", num_devices=0)
    with pytest.raises(InputError, match="gpus_per_node=0"):
        autopart.calibrate("cpu", gpus_per_node=0)
    with pytest.raises(InputError, match=r"\['float33'\] are not torch dtype names"):
        autopart.calibrate("cpu", dtypes=("float33",), quick=True, verbose=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            autopart.calibrate("cuda", quick=True, verbose=False)


def test_measurements_are_positive_and_shapes_scale_down_on_cpu() -> None:
    assert measure.default_matmul_shapes("cpu") == measure.transformer_matmul_shapes(256, 512)
    assert measure.GPU_MATMUL_SHAPES[2] == (8192, 4096, 16384)  # MLP up: tokens × d × 4d
    assert _finite_positive(measure.measure_matmul_flops("cpu", "float32", [(64, 64, 64)], repeats=3))
    assert _finite_positive(measure.measure_memory_bandwidth("cpu", 2**20, repeats=3))
    assert _finite_positive(measure.measure_launch_floor("cpu", num_ops=50, repeats=3))
    assert measure.supports_matmul("cpu", "float32")
    with pytest.raises(ValueError, match="not a torch dtype"):
        measure.measure_matmul_flops("cpu", "float33", [(8, 8, 8)])
    with pytest.raises(RuntimeError, match="not initialised"):
        measure.measure_links()


# --- rates measured at the shapes plans run ---------------------------------------


def test_a_training_step_runs_three_gemms_per_weight_matmul() -> None:
    assert shaped.training_matmul_shapes([(8192, 2048, 5632)]) == (
        (8192, 2048, 5632), (8192, 5632, 2048), (2048, 8192, 5632))  # forward, input grad, weight grad
    with pytest.raises(ValueError, match="non-positive"):
        shaped.training_matmul_shapes([(0, 8, 8)])


def test_calibrating_for_a_model_measures_its_own_matmuls_and_activations(capsys) -> None:
    with torch.device("meta"):
        entry = zoo.llama(layers=2, d_model=64, seq=16, batch=4, vocab=256)
    shapes, (rows, width) = model_matmul_shapes(entry.model, entry.args)
    assert (rows, width) == (4 * 16, 64)  # batch × sequence rows of the hidden width
    assert (64, 64, 256) in shapes and len(shapes) == 2 * 7 + 1  # q k v o gate up down per layer, the head
    # only traced for its shapes: a model on the meta device will do
    cluster = autopart.calibrate("cpu", dtypes=("float32",), quick=True, model=entry.model, example_inputs=entry.args)
    assert "15 weight matmuls, 64 rows × d 64" in capsys.readouterr().err
    assert _finite_positive(cluster.devices[0].achieved_bandwidth)
    with pytest.raises(InputError, match="example_inputs"):
        autopart.calibrate("cpu", quick=True, verbose=False, model=entry.model)


def test_elementwise_bandwidth_counts_each_kernel_as_the_roofline_does() -> None:
    total, each = shaped.measure_elementwise_bandwidth("cpu", 64, 256, repeats=3)
    assert list(each) == list(shaped.ELEMENTWISE_OPS) and all(_finite_positive(v) for v in each.values())
    # the mix's rate is Σ bytes / Σ seconds: between its slowest and fastest kernel
    assert min(each.values()) <= total <= max(each.values())


def test_repeated_matmul_shapes_weigh_by_their_count() -> None:
    # timed once each, counted as often as they occur: a step spends that many times in them
    rate = measure.measure_matmul_flops("cpu", "float32", [(32, 32, 32)] * 3 + [(64, 64, 64)], repeats=3)
    assert _finite_positive(rate)


# --- the α–β fit ------------------------------------------------------------------


SIZES = [2.0**k for k in range(12, 29, 2)]


def test_fit_recovers_a_known_link_from_send_recv_times() -> None:
    true = Link(latency_s=12e-6, bandwidth=40e9)
    times = [p2p_seconds(n, true) for n in SIZES]
    fitted = measure.fit_alpha_beta(SIZES, times)
    assert fitted.latency_s == pytest.approx(12e-6, rel=1e-9) and fitted.bandwidth == pytest.approx(40e9, rel=1e-9)


def test_fit_recovers_a_known_link_through_the_all_reduce_formula() -> None:
    true, p = Link(latency_s=5e-6, bandwidth=270e9), 4
    ring = lambda n, link: all_reduce_seconds(n, p, link)  # noqa: E731
    assert measure.model_terms(ring, 1024.0) == pytest.approx((2 * (p - 1), 2 * (p - 1) / p))
    terms = [measure.model_terms(ring, n) for n in SIZES]
    times = [ring(n, true) for n in SIZES]
    fitted = measure.fit_alpha_beta(SIZES, times, latency_terms=[a for a, _ in terms],
                                    byte_terms=[b for _, b in terms])
    assert fitted.latency_s == pytest.approx(5e-6, rel=1e-9) and fitted.bandwidth == pytest.approx(270e9, rel=1e-9)
    # joint with send/recv timings of the same link
    both = measure.fit_alpha_beta(SIZES + SIZES, times + [p2p_seconds(n, true) for n in SIZES],
                                  latency_terms=[a for a, _ in terms] + [1.0] * len(SIZES),
                                  byte_terms=[b for _, b in terms] + [1.0] * len(SIZES))
    assert both.latency_s == pytest.approx(5e-6, rel=1e-9) and both.bandwidth == pytest.approx(270e9, rel=1e-9)


def test_fit_tolerates_noise_and_keeps_alpha_non_negative() -> None:
    rng = np.random.default_rng(0)
    true = Link(latency_s=20e-6, bandwidth=5e9)
    times = [p2p_seconds(n, true) * (1 + 0.03 * rng.standard_normal()) for n in SIZES]
    fitted = measure.fit_alpha_beta(SIZES, times)
    assert fitted.latency_s == pytest.approx(20e-6, rel=0.1) and fitted.bandwidth == pytest.approx(5e9, rel=0.1)
    # pure bandwidth plus noise that would drive the intercept negative: α clamps to 0
    times = [n / 5e9 * (0.9 if n == SIZES[0] else 1.0) for n in SIZES]
    fitted = measure.fit_alpha_beta(SIZES, times)
    assert fitted.latency_s == 0.0 and fitted.bandwidth == pytest.approx(5e9, rel=0.05)
    with pytest.raises(ValueError, match="do not grow with the message size"):
        measure.fit_alpha_beta([1e3, 1e6], [2e-3, 1e-3])
    with pytest.raises(ValueError, match="at least two samples"):
        measure.fit_alpha_beta([1e3], [1e-3])


# --- efficiencies in DeviceSpec and the roofline ------------------------------------------


def _spec(**kw) -> DeviceSpec:
    return DeviceSpec(name="x", memory_bytes=10**9, memory_bandwidth=1e12,
                      peak_flops_by_dtype=(("float32", 1e13), ("bfloat16", 1e14)), **kw)


def test_efficiencies_default_to_the_cited_constants() -> None:
    for spec in (get_preset("H100"), get_preset("CPU"), _spec()):
        assert (spec.matmul_efficiency, spec.memory_efficiency) == (0.7, 0.8)
        assert spec.matmul_efficiency_by_dtype == ()
    h100 = get_preset("H100")
    assert h100.achieved_flops("bfloat16") == pytest.approx(0.7 * 989.4e12)
    assert h100.achieved_bandwidth == pytest.approx(0.8 * 3.35e12)


@pytest.mark.parametrize("field, value", [("matmul_efficiency", 0.0), ("matmul_efficiency", 1.5),
                                          ("memory_efficiency", -0.1), ("memory_efficiency", float("nan")),
                                          ("matmul_efficiency_by_dtype", {"bfloat16": 2.0})])
def test_efficiencies_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        _spec(**{field: value})


def test_old_json_without_efficiencies_still_loads() -> None:
    old = get_preset("H100").to_dict()
    for key in ("matmul_efficiency", "matmul_efficiency_by_dtype", "memory_efficiency"):
        del old[key]
    assert DeviceSpec.from_dict(old) == get_preset("H100")
    spec = _spec(matmul_efficiency_by_dtype={"bfloat16": 0.9}, memory_efficiency=0.5)
    assert DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_op_seconds_uses_the_device_efficiencies() -> None:
    spec = _spec(matmul_efficiency=0.5, matmul_efficiency_by_dtype={"bfloat16": 0.9}, memory_efficiency=0.25,
                 launch_overhead_s=1e-6)
    flops, nbytes = 1e12, 1e9
    assert op_seconds(flops, 0, spec, torch.bfloat16) == pytest.approx(flops / (1e14 * 0.9) + 1e-6)
    assert op_seconds(flops, 0, spec, torch.float32) == pytest.approx(flops / (1e13 * 0.5) + 1e-6)
    assert op_seconds(flops, 0, spec, torch.float64) == pytest.approx(flops / (1e13 * 0.5) + 1e-6)  # float32 row
    assert op_seconds(0, nbytes, spec, torch.float32) == pytest.approx(nbytes / (1e12 * 0.25) + 1e-6)
    assert spec.peak_flops(torch.bfloat16) == 1e14  # the MFU denominator is untouched


def test_calibrated_spec_keeps_datasheet_peaks_and_stores_fractions() -> None:
    h100 = get_preset("H100")
    spec = measure.calibrated_spec(name="H100 (calibrated)", device_type="cuda", memory_bytes=85 * 10**9,
                                   matmul_flops={"float32": 50e12, "bfloat16": 750e12}, memory_bandwidth=3.0e12,
                                   launch_overhead_s=6e-6, datasheet=h100)
    assert spec.peak_flops("bfloat16") == 989.4e12 and spec.memory_bandwidth == 3.35e12
    assert spec.achieved_flops("bfloat16") == pytest.approx(750e12)
    assert spec.achieved_flops("float32") == pytest.approx(50e12)
    assert spec.achieved_bandwidth == pytest.approx(3.0e12)
    assert dict(spec.matmul_efficiency_by_dtype)["bfloat16"] == pytest.approx(750 / 989.4)
    assert spec.achieved_flops("float16") == pytest.approx(0.7 * 989.4e12)  # not measured: the default fraction
    faster = measure.calibrated_spec(name="x", device_type="cuda", memory_bytes=1, launch_overhead_s=0.0,
                                     matmul_flops={"float32": 80e12}, memory_bandwidth=4e12, datasheet=h100)
    assert faster.peak_flops("float32") == 80e12 and faster.memory_bandwidth == 4e12  # above the datasheet
    assert faster.memory_efficiency == 1.0 and faster.achieved_flops("float32") == 80e12
    with pytest.raises(ValueError, match="needs a 'float32' figure"):
        measure.calibrated_spec(name="x", device_type="cpu", memory_bytes=1, matmul_flops={"bfloat16": 1e9},
                                memory_bandwidth=1e9, launch_overhead_s=0.0)


# --- links between real processes ---------------------------------------------------


@pytest.mark.multiprocess
def test_two_gloo_ranks_calibrate_the_link_between_them(tmp_path) -> None:
    from test_distributed import _finish, _torchrun

    script = os.path.join(os.path.dirname(__file__), "distributed", "calibrate_links.py")
    cluster_path = tmp_path / "cluster.json"
    code, out = _finish(_torchrun(2, str(cluster_path), script=script), timeout=120)
    assert code == 0, out[-4000:]
    assert out.count("OK rank") == 2, out[-4000:]
    cluster = Cluster.from_dict(json.loads(cluster_path.read_text()))
    link = cluster.intra_node_link
    assert link.latency_s >= 0 and link.bandwidth > 0
    assert "send/recv over 2 ranks" in out and "all-reduce over 2 ranks" in out
