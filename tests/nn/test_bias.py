"""The int32 bias (lowbit.nn.bias) and the layers that add it: values against an independent numpy
reference, the fallbacks where the export keeps the bias float, the straight-through gradient, the graph link."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.nn import QuantConv2d, QuantLinear, calibrating
from lowbit.nn.bias import accumulator_limit, int32_bias, rerounded_weight_codes

W8 = QuantSpec("int8", symmetric=True, granularity="channel")
W8T = QuantSpec("int8", symmetric=True)
A8 = QuantSpec("uint8", symmetric=False)


def np_int32_bias(b, s_x, s_w):
    """Independent reference: s_b = f32(s_x * s_w); round half to even of the float64 quotient; int32."""
    s_b = (np.float32(s_x) * np.asarray(s_w, np.float32)).astype(np.float32)
    q = np.clip(np.rint(np.asarray(b, np.float32).astype(np.float64) / s_b.astype(np.float64)), -(2**31), 2**31 - 1)
    return q.astype(np.int32), s_b


def test_int32_bias_matches_numpy_reference_per_channel_and_per_tensor():
    rng = np.random.default_rng(0)
    b = rng.normal(0, 0.5, 64).astype(np.float32)
    s_x = np.float32(0.0123)
    s_w = rng.uniform(1e-3, 1e-2, 64).astype(np.float32)
    for sw in (s_w, s_w[:1].reshape(())):
        got = int32_bias(torch.from_numpy(b), torch.tensor(s_x), torch.from_numpy(np.array(sw)), 27)
        q, s_b = np_int32_bias(b, s_x, sw)
        np.testing.assert_array_equal(got.codes.numpy(), q)
        np.testing.assert_array_equal(got.scale.numpy(), s_b)
        np.testing.assert_array_equal(got.dequantize().numpy(), (q.astype(np.float32) * s_b).astype(np.float32))
        assert got.raised is None
        assert np.abs(got.dequantize().numpy() - b).max() <= s_b.max() / 2 * (1 + 1e-6)


def test_ties_round_half_to_even():
    s_w = torch.tensor([0.5, 0.5, 0.5, 0.5])
    got = int32_bias(torch.tensor([0.25, 0.75, -0.25, 1.25]), torch.tensor(1.0), s_w, 1)  # b / s_b = .5, 1.5, -.5, 2.5
    assert got.codes.tolist() == [0, 2, 0, 2]


def test_dead_channel_gets_raised_weight_scale_and_rerounded_codes():
    # channel 1: weights ~1e-7, so s_w is tiny and b / (s_x s_w) is far beyond int32
    b = torch.tensor([0.3, -40.0])
    s_x, s_w, fan_in = torch.tensor(0.02), torch.tensor([0.01, 1e-9]), 27
    got = int32_bias(b, s_x, s_w, fan_in)
    limit = 2**31 - 1 - fan_in * 255 * 128
    assert accumulator_limit(fan_in) == limit
    need = 40.0 / (np.float64(np.float32(0.02)) * limit)
    assert got.raised.tolist() == [False, True]
    assert got.weight_scale[0] == s_w[0] and got.weight_scale[1] == np.float32(need * (1 + 1e-6))
    assert abs(int(got.codes[1])) <= limit and abs(float(got.dequantize()[1]) + 40.0) < 1e-6 * 40
    codes = torch.tensor([[100, -3], [127, -128]], dtype=torch.int8)
    new = rerounded_weight_codes(codes, s_w, got.weight_scale, got.raised, signed=True)
    assert new[0].tolist() == [100, -3]  # untouched channel
    expect = np.clip(np.rint(np.array([127, -128]) * np.float64(np.float32(1e-9)) / np.float64(got.weight_scale[1])), -128, 127)
    assert new[1].tolist() == expect.astype(int).tolist()


@pytest.mark.parametrize("why", ["per_tensor", "asymmetric", "axis1"])
def test_dead_channel_keeps_float_bias_where_scale_cannot_be_raised(why):
    b, s_x = torch.tensor([0.3, -40.0]), torch.tensor(0.02)
    if why == "per_tensor":
        assert int32_bias(b, s_x, torch.tensor(1e-9), 27) is None
    elif why == "asymmetric":
        assert int32_bias(b, s_x, torch.tensor([0.01, 1e-9]), 27, weight_zero_point=torch.tensor([0, 3])) is None
    else:
        assert int32_bias(b, s_x, torch.tensor([0.01, 1e-9]), 27, channel_axis=1) is None


def _swap_conv(bias_scale=0.3, in_spec=A8, w_spec=W8):
    torch.manual_seed(0)
    fl = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        fl.bias.copy_(torch.randn(8) * bias_scale)
    q = QuantConv2d.from_float(fl, w_spec, input_spec=in_spec, name="conv")
    x = torch.randn(4, 3, 10, 10)
    with calibrating(q):
        q(x)
    return fl, q, x


@pytest.mark.parametrize("w_spec", [W8, QuantSpec("int4", symmetric=True, granularity="channel"),
                                    QuantSpec("uint4", symmetric=False, granularity="channel")], ids=["int8", "int4", "uint4"])
def test_conv_adds_the_int32_bias_the_export_stores(w_spec):
    """Also with 4-bit weights: ONNX Runtime rounds such a Conv's float bias to int32 at s_x * s_w itself when its
    input comes from a DequantizeLinear and its output goes to a QuantizeLinear, so the export stores it so."""
    fl, q, x = _swap_conv(w_spec=w_spec)
    s_x, s_w = q.input_quantizer.scale, q.weight_quantizer.scale
    qb, s_b = np_int32_bias(fl.bias.detach().numpy(), s_x.numpy(), s_w.numpy())
    b_dep = torch.from_numpy(qb.astype(np.float32) * s_b)
    xq = q.input_quantizer(x)
    ref = F.conv2d(xq, q.quantized_weight(), b_dep, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref, rtol=0, atol=0)
        # and it is not the float bias: the difference is up to half a bias step per channel
        d = (q(x) - F.conv2d(xq, q.quantized_weight(), fl.bias, padding=1)).abs().amax(dim=(0, 2, 3))
    assert (d > 0).any() and (d <= torch.from_numpy(s_b) / 2 * 1.01 + 1e-7).all()


def test_gradient_reaches_float_bias_straight_through():
    fl, q, x = _swap_conv()
    y = q(x)
    (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).sin()).sum().backward()
    g_int = fl.bias.grad.clone()
    fl.bias.grad = None
    link_free = QuantConv2d.from_float(fl, W8, input_spec=None, name="c")  # no input quantizer: float bias
    xq = q.input_quantizer(x).detach()
    y2 = link_free(xq)
    (y2 * torch.arange(y2.numel(), dtype=y2.dtype).reshape(y2.shape).sin()).sum().backward()
    torch.testing.assert_close(g_int, fl.bias.grad, rtol=1e-6, atol=1e-6)
    assert g_int.abs().sum() > 0


@pytest.mark.parametrize("case", ["dynamic_input", "int2_weight", "group_weight", "no_input_q", "disabled"])
def test_float_bias_where_the_export_keeps_it_float(case):
    in_spec, w_spec = A8, W8
    if case == "dynamic_input":
        in_spec = QuantSpec("uint8", symmetric=False, dynamic=True)
    elif case == "int2_weight":
        w_spec = QuantSpec("int2", symmetric=True, granularity="channel")
    elif case == "group_weight":
        w_spec = QuantSpec("int8", symmetric=True, granularity=lowbit.granularity.PerGroup(3, -1))
    elif case == "no_input_q":
        in_spec = None
    fl, q, x = _swap_conv(in_spec=in_spec, w_spec=w_spec)
    if case == "disabled":
        q.input_quantizer.set_mode(False, False)
    assert q.int32_bias(q.bias, 4) is None
    xq = x if q.input_quantizer is None else q.input_quantizer(x)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.conv2d(xq, q.quantized_weight(), fl.bias, padding=1), rtol=0, atol=0)


def test_linear_int32_bias_only_on_2d_input():
    torch.manual_seed(0)
    fl = nn.Linear(16, 4)
    q = QuantLinear.from_float(fl, W8, input_spec=A8, name="fc")
    with calibrating(q):
        q(torch.randn(8, 16))
    assert q.int32_bias(q.bias, 2) is not None  # exported as Gemm: int32 bias
    assert q.int32_bias(q.bias, 3) is None  # exported as MatMul + Add: float bias
    x3 = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(x3), F.linear(q.input_quantizer(x3), q.quantized_weight(), fl.bias), rtol=0, atol=0)


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.pad = nn.ZeroPad2d(1)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c2(self.pad(F.relu6(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_graph_mode_links_each_layer_to_its_input_quantizer():
    torch.manual_seed(0)
    q = lowbit.quantize(TwoConv().eval(), lowbit.recipes.W8A8(), [torch.randn(2, 3, 12, 12)], progress=False)
    assert q.c1.input_quantizer is None  # graph mode: the input is quantized upstream
    first = q.c1.bias_input_quantizer()
    assert first is not None and first.name.endswith(".output") and first is not q.c1.output_quantizer
    assert q.c2.bias_input_quantizer() is q.c1.output_quantizer  # through the ZeroPad2d
    assert q.fc.bias_input_quantizer() is not None  # the pooled tensor's own quantizer
    # the link is not a submodule (no state_dict entries) and survives deepcopy inside the copied model
    assert not any(k.startswith("c2._lowbit") for k in q.state_dict())
    import copy

    q2 = copy.deepcopy(q)
    assert q2.c2.bias_input_quantizer() is q2.c1.output_quantizer
