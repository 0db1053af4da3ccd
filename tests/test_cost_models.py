"""Unit tests of autopart.cost_models: each formula against hand arithmetic,
op_flops against torch.utils.flop_counter.FlopCounterMode, and the device,
cluster and link specs (parsing, validation, JSON round trips)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autopart.cost_models import (
    LINK_PRESETS,
    PRESETS,
    Cluster,
    DeviceSpec,
    Link,
    all_gather_seconds,
    all_reduce_seconds,
    all_to_all_seconds,
    conv_flops,
    einsum_flops,
    get_preset,
    gradient_bytes,
    matmul_flops,
    op_flops,
    op_seconds,
    optimizer_state_bytes,
    p2p_seconds,
    reduce_scatter_seconds,
    register_missing_flop_formulas,
    sdpa_backward_flops,
    sdpa_flops,
    tensor_bytes,
)
from autopart.cost_models import links, roofline

aten = torch.ops.aten


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


def _counted(op, args, kwargs=None) -> tuple[int, int, object, dict]:
    """Run op(*args, **kwargs) and its backward under FlopCounterMode.

    Returns (forward FLOPs, backward FLOPs, output, forward counts by op).
    """
    register_missing_flop_formulas()
    kwargs = kwargs or {}
    with FlopCounterMode(display=False) as fwd_mode:
        out = op(*args, **kwargs)
    first = out[0] if isinstance(out, tuple) else out
    with FlopCounterMode(display=False) as bwd_mode:
        first.sum().backward()
    counts = dict(fwd_mode.get_flop_counts().get("Global", {}))
    return fwd_mode.get_total_flops(), bwd_mode.get_total_flops(), out, counts


# --- flops: hand arithmetic -------------------------------------------------


def test_matmul_flops_by_hand():
    assert matmul_flops(8, 16, 32) == 2 * 8 * 16 * 32
    assert matmul_flops(8, 16, 32, batch=3) == 2 * 3 * 8 * 16 * 32


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((5,), (5,), 2 * 5),  # dot
        ((4, 5), (5,), 2 * 4 * 5),  # mv
        ((5,), (5, 6), 2 * 5 * 6),  # row vector @ matrix
        ((5,), (2, 5, 6), 2 * 2 * 5 * 6),
        ((3, 4, 5), (5,), 2 * 3 * 4 * 5),
        ((3, 4, 5), (5, 6), 2 * 3 * 4 * 5 * 6),
        ((2, 1, 4, 5), (3, 5, 6), 2 * (2 * 3) * 4 * 5 * 6),  # broadcast batch [2, 3]
    ],
)
def test_matmul_broadcast_by_hand(a, b, expected):
    args = (torch.empty(a), torch.empty(b))
    assert op_flops(aten.matmul.default, args) == (expected, 2 * expected)


def test_matmul_inner_dim_mismatch_raises():
    with pytest.raises(ValueError, match="inner dims differ"):
        op_flops(aten.mm.default, (torch.empty(3, 4), torch.empty(5, 6)))


def test_conv_flops_by_hand():
    # 3x3 conv, 3 -> 4 channels, 8x8 input, no padding: 6x6 output positions.
    assert conv_flops((2, 3, 8, 8), (4, 3, 3, 3), (2, 4, 6, 6)) == 2 * 2 * (6 * 6) * (3 * 3) * 4 * 3
    # Transposed: weight [c_in, c_out / groups, k], counted per input position.
    assert conv_flops((2, 4, 6, 6), (4, 3, 3, 3), None, transposed=True) == 2 * 2 * (6 * 6) * (3 * 3) * 4 * 3
    # Groups: weight [c_out, c_in / groups, k]; 8 -> 8 channels in 4 groups.
    assert conv_flops((1, 8, 10), (8, 2, 3), (1, 8, 8)) == 2 * 1 * 8 * 3 * 8 * 2


def test_sdpa_flops_by_hand():
    b, h, s_q, s_k, d = 2, 4, 16, 32, 8
    q, k = (b, h, s_q, d), (b, h, s_k, d)
    assert sdpa_flops(q, k, k) == 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d
    # Backward: five matmuls of the same size, 2.5 x forward when d_qk = d_v.
    assert sdpa_backward_flops(q, k, k) == 5 * 2 * b * h * s_q * s_k * d
    assert sdpa_backward_flops(q, k, k) * 2 == 5 * sdpa_flops(q, k, k)
    # d_v != d_qk.
    v = (b, h, s_k, 24)
    assert sdpa_flops(q, k, v) == 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * 24
    assert sdpa_backward_flops(q, k, v) == 2 * b * h * s_q * s_k * (3 * d + 2 * 24)
    # GQA: 2 k/v heads serve 8 query heads; the work is over the 8 query heads.
    q8, k2 = (b, 8, s_q, d), (b, 2, s_k, d)
    assert sdpa_flops(q8, k2, k2) == 4 * b * 8 * s_q * s_k * d
    with pytest.raises(ValueError, match="incompatible"):
        sdpa_flops(q, (b, h, s_k, d + 1), k)


def test_einsum_flops_by_hand():
    assert einsum_flops("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]) == 2 * 2 * 3 * 4 * 5
    # Left to right: (ij,jk -> ik) then (ik,kl -> il).
    assert einsum_flops("ij,jk,kl->il", [(3, 4), (4, 5), (5, 6)]) == 2 * 3 * 4 * 5 + 2 * 3 * 5 * 6
    assert einsum_flops("...ij,...jk->...ik", [(7, 2, 3, 4), (2, 4, 5)]) == 2 * 7 * 2 * 3 * 4 * 5
    assert einsum_flops("ij,jk", [(3, 4), (4, 5)]) == 2 * 3 * 4 * 5  # implicit output "ik"
    assert einsum_flops("i,j->ij", [(3,), (4,)]) == 0  # outer product: elementwise, priced as bytes
    assert einsum_flops("ij->ji", [(3, 4)]) == 0


def test_non_matmul_ops_cost_nothing():
    x = torch.empty(4, 8)
    assert op_flops(aten.add.Tensor, (x, x)) == (0, 0)
    assert op_flops(aten.relu.default, (x,)) == (0, 0)
    assert op_flops(aten.layer_norm.default, (x, [8])) == (0, 0)


def test_op_flops_reads_only_shapes_of_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(2, 3, 8), torch.empty(4, 8)
        out = torch.ops.aten.linear.default(x, w)
    assert op_flops(aten.linear.default, (x, w), {}, out) == (2 * 6 * 8 * 4, 2 * 2 * 6 * 8 * 4)
    meta = torch.empty(6, 8, device="meta")
    assert op_flops(aten.mm.default, (meta, torch.empty(8, 4, device="meta"))) == (2 * 6 * 8 * 4, 4 * 6 * 8 * 4)
    assert op_flops(aten.mm, (meta, meta.T)) == (2 * 6 * 8 * 6, 4 * 6 * 8 * 6)  # an OpOverloadPacket works too


# --- flops: against FlopCounterMode -----------------------------------------

_MATMUL_CASES = [
    (aten.mm.default, lambda: (_randn(6, 8), _randn(8, 4)), {}),
    (aten.addmm.default, lambda: (_randn(4), _randn(6, 8), _randn(8, 4)), {}),
    (aten.bmm.default, lambda: (_randn(3, 6, 8), _randn(3, 8, 4)), {}),
    (aten.baddbmm.default, lambda: (_randn(3, 6, 4), _randn(3, 6, 8), _randn(3, 8, 4)), {}),
    (aten.matmul.default, lambda: (_randn(3, 4, 5), _randn(5, 6)), {}),
    (aten.matmul.default, lambda: (_randn(2, 3, 4, 5), _randn(2, 3, 5, 6)), {}),
    (aten.matmul.default, lambda: (_randn(2, 1, 4, 5), _randn(3, 5, 6)), {}),
    (aten.matmul.default, lambda: (_randn(4, 5), _randn(2, 5, 6)), {}),
    (aten.linear.default, lambda: (_randn(2, 3, 8), _randn(4, 8), _randn(4)), {}),
    (aten.linear.default, lambda: (_randn(5, 8), _randn(4, 8)), {}),
    (aten.einsum.default, lambda: ("bij,bjk->bik", [_randn(2, 3, 4), _randn(2, 4, 5)]), {}),
    (aten.einsum.default, lambda: ("...ij,...jk->...ik", [_randn(7, 2, 3, 4), _randn(2, 4, 5)]), {}),
]


@pytest.mark.parametrize(("op", "make", "kwargs"), _MATMUL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(_MATMUL_CASES)])
def test_matmul_family_matches_flop_counter(op, make, kwargs):
    args = make()
    fwd, bwd, out, _ = _counted(op, args, kwargs)
    assert op_flops(op, args, kwargs, out) == (fwd, bwd)


def test_three_operand_einsum_forward_matches_flop_counter():
    args = ("ij,jk,kl->il", [_randn(3, 4), _randn(4, 5), _randn(5, 6)])
    fwd, _, out, _ = _counted(aten.einsum.default, args)
    assert op_flops(aten.einsum.default, args, {}, out)[0] == fwd


_CONV_CASES = [
    (aten.convolution.default, lambda: (_randn(2, 3, 10), _randn(4, 3, 3), _randn(4), [1], [0], [1], False, [0], 1)),
    (aten.convolution.default,
     lambda: (_randn(2, 3, 8, 8), _randn(4, 3, 3, 3), None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1)),
    (aten.convolution.default,
     lambda: (_randn(2, 4, 5, 5), _randn(4, 3, 3, 3), None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1)),
    (aten._convolution.default,
     lambda: (_randn(2, 3, 8, 8), _randn(4, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
              False, False, True, True)),
    (aten.conv1d.default, lambda: (_randn(3, 10), _randn(4, 3, 3))),  # unbatched input
    (aten.conv2d.default, lambda: (_randn(2, 3, 8, 8), _randn(4, 3, 3, 3), _randn(4), [1, 1], [1, 1])),
    (aten.conv3d.default, lambda: (_randn(1, 2, 4, 5, 6), _randn(3, 2, 2, 2, 2))),
    (aten.conv_transpose1d.default, lambda: (_randn(2, 4, 7), _randn(4, 3, 3))),
    (aten.conv_transpose2d.input, lambda: (_randn(2, 4, 5, 5), _randn(4, 3, 3, 3), None, [2, 2])),
    (aten.conv_transpose3d.input, lambda: (_randn(1, 2, 3, 4, 5), _randn(2, 3, 2, 2, 2))),
]


@pytest.mark.parametrize(("op", "make"), _CONV_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(_CONV_CASES)])
def test_conv_matches_flop_counter(op, make):
    args = make()
    fwd, bwd, out, _ = _counted(op, args)
    assert op_flops(op, args, {}, out) == (fwd, bwd)


def test_grouped_conv():
    # 8 -> 8 channels in 4 groups: weight [8, 2, 3]. FlopCounterMode agrees on
    # the forward; its convolution_backward formula prices grad_weight as if
    # groups were 1, so the backward is checked by hand: grad_input and
    # grad_weight each cost one forward.
    args = (_randn(2, 8, 10), _randn(8, 2, 3), None, [1], [0], [1], False, [0], 4)
    fwd, _, out, _ = _counted(aten.convolution.default, args)
    expected = 2 * 2 * 8 * 3 * 8 * 2  # batch · out positions · kernel · c_out · c_in/groups
    assert fwd == expected
    assert op_flops(aten.convolution.default, args, {}, out) == (expected, 2 * expected)


def test_conv_without_out_raises():
    with pytest.raises(ValueError, match="pass `out`"):
        op_flops(aten.conv2d.default, (torch.empty(1, 3, 8, 8), torch.empty(4, 3, 3, 3)))


def _attention_case(h_q: int, h_kv: int, d_v: int):
    return _randn(2, h_q, 16, 8), _randn(2, h_kv, 12, 8), _randn(2, h_kv, 12, d_v)


@pytest.mark.parametrize(
    ("op", "h_q", "h_kv", "d_v", "kwargs"),
    [
        (aten.scaled_dot_product_attention.default, 4, 4, 8, {}),
        (aten.scaled_dot_product_attention.default, 4, 4, 8, {"is_causal": True}),
        (aten.scaled_dot_product_attention.default, 4, 4, 24, {}),
        (aten._scaled_dot_product_flash_attention_for_cpu.default, 4, 4, 8, {}),
        pytest.param(
            aten.scaled_dot_product_attention.default, 8, 2, 8, {"enable_gqa": True},
            marks=pytest.mark.skipif(
                "enable_gqa" not in str(aten.scaled_dot_product_attention.default._schema),
                reason="this torch has no enable_gqa",
            ),
        ),
    ],
)
def test_attention_matches_flop_counter(op, h_q, h_kv, d_v, kwargs):
    args = _attention_case(h_q, h_kv, d_v)
    fwd, bwd, out, counts = _counted(op, args, kwargs)
    ours_fwd, ours_bwd = op_flops(op, args, kwargs, out)
    assert ours_fwd == fwd == 2 * 2 * h_q * 16 * 12 * 8 + 2 * 2 * h_q * 16 * 12 * d_v  # b=2, s_q=16, s_k=12, d_qk=8
    if aten.bmm in counts:
        # The math fallback (taken for GQA or unequal head dims on the CPU)
        # keeps the softmax from the forward, so its backward skips the
        # recomputation of Q·Kᵀ that the fused kernels (and we) count.
        assert ours_bwd == bwd + 2 * 2 * h_q * 16 * 12 * 8
    else:
        assert ours_bwd == bwd


def test_fused_attention_variants_match_flop_counter_formulas():
    # The CUDA kernels cannot run here; compare against the formulas
    # FlopCounterMode registers for them, on meta tensors.
    from torch.utils.flop_counter import flop_registry

    q, k, v = (torch.empty(2, 8, 16, 8, device="meta"), torch.empty(2, 8, 12, 8, device="meta"),
               torch.empty(2, 8, 12, 8, device="meta"))
    checked = 0
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention"):
        packet = getattr(aten, name, None)
        backward = getattr(aten, name + "_backward", None)
        if packet is None or packet not in flop_registry or backward not in flop_registry:
            continue
        fwd = flop_registry[packet](q, k, v, out_val=None)
        bwd = flop_registry[backward](q, q, k, v, out_val=None)
        assert op_flops(packet.default, (q, k, v)) == (fwd, bwd)
        checked += 1
    assert checked >= 2


def test_register_missing_flop_formulas_is_idempotent():
    register_missing_flop_formulas()
    register_missing_flop_formulas()
    q = torch.randn(1, 2, 4, 8)
    with FlopCounterMode(display=False) as mode:
        aten._scaled_dot_product_flash_attention_for_cpu.default(q, q, q)
    assert mode.get_total_flops() == sdpa_flops(q.shape, q.shape, q.shape) == 4 * 2 * 4 * 4 * 8


# --- memory -----------------------------------------------------------------


def test_tensor_bytes():
    assert tensor_bytes((2, 3), torch.float32) == 2 * 3 * 4
    assert tensor_bytes(torch.Size([5, 7]), torch.bfloat16) == 5 * 7 * 2
    assert tensor_bytes((), torch.float64) == 8
    assert tensor_bytes((0, 4), torch.float32) == 0
    with pytest.raises(ValueError, match="shape"):
        tensor_bytes((-1, 4), torch.float32)


def test_optimizer_state_bytes_by_hand():
    assert optimizer_state_bytes(1000, "sgd") == 0
    assert optimizer_state_bytes(1000, "momentum") == optimizer_state_bytes(1000, "sgd_momentum") == 1000
    assert optimizer_state_bytes(1000, "adam") == optimizer_state_bytes(1000, "AdamW") == 2 * 1000
    assert gradient_bytes(1000) == 1000
    with pytest.raises(ValueError, match="known: sgd, momentum"):
        optimizer_state_bytes(1000, "lion")


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
        ("momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        ("adam", lambda p: torch.optim.Adam(p)),
        ("adamw", lambda p: torch.optim.AdamW(p)),
        ("adam_amsgrad", lambda p: torch.optim.Adam(p, amsgrad=True)),
        ("adagrad", lambda p: torch.optim.Adagrad(p)),
        ("rmsprop", lambda p: torch.optim.RMSprop(p)),
    ],
)
def test_optimizer_state_bytes_match_torch_optim(name, make):
    param = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = make([param])
    param.grad = torch.ones_like(param)
    opt.step()
    held = sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if isinstance(t, torch.Tensor) and key != "step"
    )
    assert optimizer_state_bytes(tensor_bytes(param.shape, param.dtype), name) == held


# --- devices, links, clusters -------------------------------------------------


def test_peak_flops_by_dtype():
    h100 = get_preset("H100")
    assert h100.peak_flops(torch.bfloat16) == 989.4e12
    assert h100.peak_flops(torch.float16) == 989.4e12
    assert h100.peak_flops(torch.float32) == 66.9e12
    assert h100.peak_flops(torch.float32, allow_tf32=True) == 494.7e12
    assert h100.peak_flops(torch.float64) == 66.9e12  # not listed: falls back to float32
    assert h100.peak_flops("bfloat16") == 989.4e12
    a100 = get_preset("A100-80GB")
    assert (a100.peak_flops(torch.bfloat16), a100.peak_flops(torch.float32)) == (312e12, 19.5e12)
    assert a100.memory_bandwidth == 2.039e12 and a100.memory_bytes == 80 * 10**9
    h200 = get_preset("H200")
    assert (h200.memory_bytes, h200.memory_bandwidth) == (141 * 10**9, 4.8e12)
    assert h200.peak_flops(torch.bfloat16) == h100.peak_flops(torch.bfloat16)
    cpu = get_preset("CPU")
    assert cpu.device_type == "cpu" and cpu.memory_bytes > 0
    assert cpu.peak_flops(torch.bfloat16) == cpu.peak_flops(torch.float32) == 100e9


def test_get_preset_is_case_insensitive_and_lists_known_names():
    assert get_preset("h100") is PRESETS["H100"]
    assert get_preset(" a100-80gb ") is PRESETS["A100-80GB"]
    with pytest.raises(ValueError, match="known: H100, H200, A100-80GB, CPU"):
        get_preset("V100")


def test_device_spec_validates():
    with pytest.raises(ValueError, match="no 'float32' entry"):
        DeviceSpec(name="X", memory_bytes=1, memory_bandwidth=1.0, peak_flops_by_dtype=(("bfloat16", 1.0),))
    with pytest.raises(ValueError, match="memory_bytes=0"):
        DeviceSpec(name="X", memory_bytes=0, memory_bandwidth=1.0, peak_flops_by_dtype=(("float32", 1.0),))
    with pytest.raises(ValueError, match="device_type='tpu'"):
        DeviceSpec(name="X", memory_bytes=1, memory_bandwidth=1.0, peak_flops_by_dtype=(("float32", 1.0),),
                   device_type="tpu")
    with pytest.raises(ValueError, match="bandwidth=0"):
        Link(latency_s=1e-6, bandwidth=0)


def _json_round_trip(obj):
    return type(obj).from_dict(json.loads(json.dumps(obj.to_dict())))


@pytest.mark.parametrize("text", ["8xH100", "2x8xH100", "2xH100+2xA100-80GB", "3xCPU"])
def test_round_trips_through_json(text):
    cluster = Cluster.parse(text)
    assert _json_round_trip(cluster) == cluster
    for device in cluster.devices:
        assert _json_round_trip(device) == device
    assert _json_round_trip(cluster.intra_node_link) == cluster.intra_node_link


def test_from_dict_rejects_unknown_keys():
    d = get_preset("H100").to_dict()
    d["tflops"] = 1
    with pytest.raises(ValueError, match=r"unknown keys \['tflops'\]"):
        DeviceSpec.from_dict(d)


@pytest.mark.parametrize(
    ("text", "num_devices", "node_of_device"),
    [
        ("H100", 1, (0,)),
        ("8xH100", 8, (0,) * 8),
        ("h100", 1, (0,)),
        ("2x8xH100", 16, (0,) * 8 + (1,) * 8),
        ("12xH100", 12, (0,) * 8 + (1,) * 4),
        ("2xH100+2xA100-80GB", 4, (0,) * 4),
        ("6xH100 + 6xH200", 12, (0,) * 8 + (1,) * 4),
        ("1x8xH100+1x8xH200", 16, (0,) * 8 + (1,) * 8),
        ("16xCPU", 16, (0,) * 16),
    ],
)
def test_cluster_parse(text, num_devices, node_of_device):
    cluster = Cluster.parse(text)
    assert cluster.num_devices == num_devices
    assert cluster.node_of_device == node_of_device
    assert cluster.num_nodes == len(set(node_of_device))


def test_cluster_parse_links_and_homogeneity():
    two_nodes = Cluster.parse("2x8xH100")
    assert two_nodes.is_homogeneous
    assert two_nodes.link(0, 7) == links.NVLINK4
    assert two_nodes.link(0, 8) == links.INFINIBAND_NDR
    assert two_nodes.link_for_group([0, 1, 2]) == links.NVLINK4
    assert two_nodes.link_for_group(range(16)) == links.INFINIBAND_NDR
    mixed = Cluster.parse("2xH100+2xA100-80GB")
    assert not mixed.is_homogeneous
    assert mixed.intra_node_link.bandwidth == links.NVLINK3.bandwidth  # the slower member's link
    cpus = Cluster.parse("4xCPU")
    assert cpus.intra_node_link == links.LOOPBACK == Cluster.cpu(4).intra_node_link
    assert Cluster.parse("8xH100", gpus_per_node=4).num_nodes == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8xH1000", "Cluster.parse('8xH1000'): unknown device 'H1000'; known: H100, H200, A100-80GB, CPU"),
        ("", "cannot read term ''"),
        ("8x", "cannot read term '8x'"),
        ("0xH100", "asks for zero devices"),
        ("2xCPU+2xH100", "mixes CPU and GPU devices"),
    ],
)
def test_cluster_parse_errors(text, message):
    with pytest.raises(ValueError) as info:
        Cluster.parse(text)
    assert message in str(info.value)


def test_cluster_validates():
    h100 = get_preset("H100")
    link = links.NVLINK4
    with pytest.raises(ValueError, match="at least one device"):
        Cluster(devices=(), node_of_device=(), intra_node_link=link, inter_node_link=link)
    with pytest.raises(ValueError, match="has 1 entries for 2 devices"):
        Cluster(devices=(h100, h100), node_of_device=(0,), intra_node_link=link, inter_node_link=link)
    with pytest.raises(ValueError, match="none skipped"):
        Cluster(devices=(h100, h100), node_of_device=(0, 2), intra_node_link=link, inter_node_link=link)
    with pytest.raises(ValueError, match=r"Cluster.link\(j=2\)"):
        Cluster.parse("2xH100").link(0, 2)
    with pytest.raises(ValueError, match="n=0"):
        Cluster.homogeneous(0)


def test_cluster_constructors():
    cluster = Cluster.homogeneous(16, "H200")
    assert (cluster.num_devices, cluster.num_nodes) == (16, 2)
    assert cluster.devices[0] is PRESETS["H200"]
    assert Cluster.homogeneous(4, "A100-80GB").intra_node_link == links.NVLINK3
    custom = Link(latency_s=1e-6, bandwidth=1e9)
    assert Cluster.homogeneous(2, get_preset("H100"), intra_node_link=custom).link(0, 1) is custom
    cpus = Cluster.cpu(3)
    assert (cpus.num_devices, cpus.num_nodes, cpus.devices[0].device_type) == (3, 1, "cpu")
    cluster = Cluster.from_devices([get_preset("H100")] * 4, node_of_device=(0, 0, 1, 1))
    assert cluster.link(1, 2) == links.INFINIBAND_NDR
    assert set(LINK_PRESETS.values()) >= {links.NVLINK4, links.INFINIBAND_NDR, links.LOOPBACK}


# --- communication ------------------------------------------------------------

_LINK = Link(latency_s=1e-5, bandwidth=1e9)
_N = 8e6  # bytes


def test_group_of_one_or_no_bytes_costs_nothing():
    for fn in (all_reduce_seconds, all_gather_seconds, reduce_scatter_seconds, all_to_all_seconds):
        assert fn(_N, 1, _LINK) == 0.0
        assert fn(0, 8, _LINK) == 0.0
    assert p2p_seconds(0, _LINK) == 0.0


@pytest.mark.parametrize("p", [2, 8])
def test_collectives_by_hand(p):
    alpha, beta = 1e-5, 1e9
    assert all_reduce_seconds(_N, p, _LINK) == pytest.approx(2 * (p - 1) * alpha + 2 * (p - 1) / p * _N / beta)
    assert all_gather_seconds(_N, p, _LINK) == pytest.approx((p - 1) * alpha + (p - 1) / p * _N / beta)
    assert reduce_scatter_seconds(_N, p, _LINK) == pytest.approx((p - 1) * alpha + (p - 1) / p * _N / beta)
    assert all_to_all_seconds(_N, p, _LINK) == pytest.approx((p - 1) * alpha + (p - 1) / p * _N / beta)
    # An all-reduce is a reduce-scatter followed by an all-gather.
    assert all_reduce_seconds(_N, p, _LINK) == pytest.approx(
        reduce_scatter_seconds(_N, p, _LINK) + all_gather_seconds(_N, p, _LINK)
    )


def test_p2p_by_hand():
    assert p2p_seconds(_N, _LINK) == pytest.approx(1e-5 + 8e6 / 1e9)


def test_comm_validates():
    with pytest.raises(ValueError, match="group_size=0"):
        all_reduce_seconds(_N, 0, _LINK)
    with pytest.raises(ValueError, match="group_size=2.5"):
        all_gather_seconds(_N, 2.5, _LINK)
    with pytest.raises(ValueError, match="num_bytes=-1"):
        p2p_seconds(-1, _LINK)


# --- roofline -------------------------------------------------------------------


def test_roofline_compute_and_memory_bound():
    h100 = get_preset("H100")
    eff_c, eff_m, floor = roofline.MATMUL_EFFICIENCY, roofline.MEMORY_EFFICIENCY, h100.launch_overhead_s
    # A 4096^3 bf16 matmul: 2·4096³ FLOPs over 3·4096²·2 bytes: compute-bound.
    flops, nbytes = 2 * 4096**3, 3 * 4096**2 * 2
    assert op_seconds(flops, nbytes, h100, torch.bfloat16) == pytest.approx(flops / (989.4e12 * eff_c) + floor)
    # An elementwise add of 2^26 bf16 elements: 3 tensors moved, no FLOPs counted: memory-bound.
    nbytes = 3 * 2**26 * 2
    assert op_seconds(0, nbytes, h100, torch.bfloat16) == pytest.approx(nbytes / (3.35e12 * eff_m) + floor)
    # The same matmul in float32 (no tf32) is 989.4 / 66.9 times slower in compute.
    assert op_seconds(flops, 0, h100, torch.float32) == pytest.approx(flops / (66.9e12 * eff_c) + floor)


def test_roofline_floor_and_validation():
    cpu = get_preset("CPU")
    assert op_seconds(0, 0, cpu, torch.float32) == 0.0
    assert op_seconds(1, 0, cpu, torch.float32) == pytest.approx(1 / (100e9 * roofline.MATMUL_EFFICIENCY) + 2e-6)
    with pytest.raises(ValueError, match="flops=-1"):
        op_seconds(-1, 0, cpu, torch.float32)
