"""Quantized layers: weights, outputs and joins equal independent torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import QuantSpec
from lowbit.errors import ConfigError, UnsupportedLayerError
from lowbit.nn import (
    QuantAdd,
    QuantCat,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantLinear,
    QuantMatMul,
    QuantMul,
    calibrating,
)

W8 = QuantSpec("int8", symmetric=True, granularity="channel")
A8 = QuantSpec("uint8", symmetric=False)


def ref_per_channel_int8(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 reference: scale = max|w| / 127 over every other axis."""
    dims = [d for d in range(w.dim()) if d != axis]
    scale = w.abs().amax(dim=dims) / 127.0
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, axis, -128, 127), scale


def ref_affine_uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / 255.0
    z = int(min(max(round(0 - lo / s), 0), 255))
    return torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)


def test_linear_per_channel_weight_equals_torch_fake_quant():
    torch.manual_seed(0)
    fl = nn.Linear(16, 8)
    q = QuantLinear.from_float(fl, W8, name="fc")
    expected, scale = ref_per_channel_int8(fl.weight.detach(), 0)
    torch.testing.assert_close(q.weight_quantizer.scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(q.quantized_weight(), expected, rtol=0, atol=0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(q(x), F.linear(x, expected, fl.bias), rtol=1e-6, atol=1e-6)
    assert q.weight is fl.weight and q.bias is fl.bias  # parameters shared, float layer untouched
    assert type(fl) is nn.Linear and isinstance(q, nn.Linear)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv2d_grouped_and_depthwise(groups):
    torch.manual_seed(1)
    fl = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    q = QuantConv2d.from_float(fl, W8, name="conv")
    expected, _ = ref_per_channel_int8(fl.weight.detach(), 0)
    x = torch.randn(2, 8, 6, 6)
    ref = F.conv2d(x, expected, fl.bias, padding=1, groups=groups)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_conv_dilation_stride_and_padding_modes(padding_mode):
    torch.manual_seed(1)
    fl = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode=padding_mode)
    q = QuantConv2d.from_float(fl, W8, name="conv")
    expected, _ = ref_per_channel_int8(fl.weight.detach(), 0)
    x = torch.randn(2, 4, 9, 9)
    if padding_mode == "zeros":
        ref = F.conv2d(x, expected, fl.bias, stride=2, padding=2, dilation=2, groups=2)
    else:
        ref = F.conv2d(F.pad(x, (2, 2, 2, 2), mode=padding_mode), expected, fl.bias, stride=2, dilation=2, groups=2)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    fl1 = nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode=padding_mode)
    q1 = QuantConv1d.from_float(fl1, W8, name="c1")
    x1 = torch.randn(2, 4, 12)
    w1, _ = ref_per_channel_int8(fl1.weight.detach(), 0)
    ref1 = (F.conv1d(x1, w1, fl1.bias, padding=2, dilation=2, groups=2) if padding_mode == "zeros"
            else F.conv1d(F.pad(x1, (2, 2), mode=padding_mode), w1, fl1.bias, dilation=2, groups=2))
    torch.testing.assert_close(q1(x1), ref1, rtol=1e-5, atol=1e-5)


def test_conv1d_and_fused_relu_output_quantizer():
    torch.manual_seed(2)
    fl = nn.Conv1d(3, 4, 3)
    q = QuantConv1d.from_float(fl, W8, output_spec=A8, activation=nn.ReLU(), name="c1")
    x = torch.randn(4, 3, 10)
    wq, _ = ref_per_channel_int8(fl.weight.detach(), 0)
    pre = F.relu(F.conv1d(x, wq, fl.bias))
    with calibrating(q):
        q(x)
    # after ReLU the range is [0, max]; zero point 0
    assert int(q.output_quantizer.zero_point) == 0
    torch.testing.assert_close(q.output_quantizer.scale, (pre.max() / 255).reshape(()), rtol=1e-6, atol=0)
    torch.testing.assert_close(q(x), ref_affine_uint8(pre, 0.0, float(pre.detach().max())), rtol=0, atol=1e-6)


def test_conv_transpose_per_output_channel_is_axis_1():
    torch.manual_seed(3)
    fl = nn.ConvTranspose2d(4, 6, 3, stride=2)
    q = QuantConvTranspose2d.from_float(fl, W8, name="up")
    assert q.weight_quantizer.spec.granularity.axis == 1
    expected, scale = ref_per_channel_int8(fl.weight.detach(), 1)
    assert scale.shape == (6,)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(q(x), F.conv_transpose2d(x, expected, fl.bias, stride=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(x, output_size=[12, 12]), F.conv_transpose2d(x, expected, fl.bias, stride=2, output_padding=1),
                               rtol=1e-5, atol=1e-5)


def test_grouped_conv_transpose_per_channel_is_refused():
    with pytest.raises(UnsupportedLayerError, match="grouped"):
        QuantConvTranspose2d.from_float(nn.ConvTranspose2d(4, 4, 3, groups=2), W8, name="up")


def test_embedding_per_row():
    torch.manual_seed(4)
    fl = nn.Embedding(10, 6)
    q = QuantEmbedding.from_float(fl, W8, name="emb")
    expected, _ = ref_per_channel_int8(fl.weight.detach(), 0)
    idx = torch.tensor([[1, 2, 9], [0, 0, 3]])
    torch.testing.assert_close(q(idx), expected[idx], rtol=0, atol=0)


def test_linear_int4_per_group_affine_matches_reference():
    torch.manual_seed(5)
    fl = nn.Linear(64, 3, bias=False)
    spec = QuantSpec("uint4", symmetric=False, granularity="group:16")
    q = QuantLinear.from_float(fl, spec, name="fc")
    w = fl.weight.detach().reshape(-1, 16)  # one row per group
    lo = w.amin(1).clamp(max=0)
    hi = w.amax(1).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.clamp(torch.round(-lo / s), 0, 15).to(torch.int32)
    expected = torch.fake_quantize_per_channel_affine(w, s, z, 0, 0, 15).reshape(3, 64)
    torch.testing.assert_close(q.quantized_weight(), expected, rtol=0, atol=1e-6)
    assert q.weight_quantizer.scale.shape == (3, 4)


def test_group_size_must_divide_input_channels():
    with pytest.raises(UnsupportedLayerError, match="group size 32 does not divide the 3 input channels"):
        QuantConv2d.from_float(nn.Conv2d(3, 8, 3), QuantSpec("int4", granularity="group:32"), name="stem")


def test_dynamic_weight_spec_is_refused():
    with pytest.raises(UnsupportedLayerError, match="cannot be dynamic"):
        QuantLinear.from_float(nn.Linear(4, 4), QuantSpec("int8", dynamic=True), name="fc")


def test_from_float_wrong_type():
    with pytest.raises(UnsupportedLayerError, match="takes a Linear"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1), W8)


def test_from_float_refuses_a_subclass_with_its_own_forward():
    class SamePad(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias)

    with pytest.raises(UnsupportedLayerError, match="stem: SamePad subclasses Conv2d with its own forward"):
        QuantConv2d.from_float(SamePad(3, 4, 2), W8, name="stem")


def test_dynamic_input_quantizer_uses_each_batch_range():
    torch.manual_seed(6)
    fl = nn.Linear(8, 4)
    q = QuantLinear.from_float(fl, W8, input_spec=QuantSpec("uint8", symmetric=False, dynamic=True), name="fc")
    wq, _ = ref_per_channel_int8(fl.weight.detach(), 0)
    for scale in (1.0, 50.0):
        x = torch.randn(3, 8) * scale
        xq = ref_affine_uint8(x, float(x.min()), float(x.max()))
        torch.testing.assert_close(q(x), F.linear(xq, wq, fl.bias), rtol=1e-5, atol=1e-5 * scale)


def test_weight_cache_follows_in_place_weight_updates():
    torch.manual_seed(7)
    fl = nn.Linear(4, 2)
    q = QuantLinear.from_float(fl, W8, name="fc")
    with torch.no_grad():
        a = q.quantized_weight().clone()
        q.weight.mul_(0.5)  # scale stays (calibrated on the old weight): codes halve
        b = q.quantized_weight()
    exp = torch.fake_quantize_per_channel_affine(fl.weight.detach(), q.weight_quantizer.scale,
                                                 torch.zeros(2, dtype=torch.int32), 0, -128, 127)
    torch.testing.assert_close(b, exp, rtol=0, atol=0)
    assert not torch.equal(a, b)


def test_gradients_flow_through_weights_in_training():
    fl = nn.Linear(4, 2)
    q = QuantLinear.from_float(fl, W8, name="fc")
    q(torch.randn(3, 4)).sum().backward()
    assert fl.weight.grad is not None and float(fl.weight.grad.abs().sum()) > 0


def test_state_dict_round_trip():
    torch.manual_seed(8)
    q = QuantLinear.from_float(nn.Linear(6, 3), W8, output_spec=A8, name="fc")
    x = torch.randn(4, 6)
    with calibrating(q):
        q(x)
    q2 = QuantLinear.from_float(nn.Linear(6, 3), W8, output_spec=A8, name="fc")
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)


def test_joins_quantize_inputs_and_output():
    torch.manual_seed(9)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    mm = QuantMatMul([A8, A8], output_spec=A8, name="mm")
    with calibrating(mm):
        mm(a, b)
    qa = ref_affine_uint8(a, float(a.min()), float(a.max()))
    qb = ref_affine_uint8(b, float(b.min()), float(b.max()))
    y = qa @ qb
    yf = a @ b  # calibrating observes the float path (quantizers pass data through while observing)
    torch.testing.assert_close(mm(a, b), ref_affine_uint8(y, float(yf.min()), float(yf.max())), rtol=0, atol=1e-6)

    add = QuantAdd([None, A8], output_spec=A8, activation=nn.ReLU(), name="add")
    c = torch.randn(2, 3, 4)
    with calibrating(add):
        add(a, c)
    s = F.relu(a + ref_affine_uint8(c, float(c.min()), float(c.max())))
    sf = F.relu(a + c)
    torch.testing.assert_close(add(a, c), ref_affine_uint8(s, 0.0, float(sf.max())), rtol=0, atol=1e-6)
    assert isinstance(add.input_quantizers[0], nn.Identity)

    mul = QuantMul([None, None], output_spec=None, name="mul")
    torch.testing.assert_close(mul(a, 2.0), a * 2.0)
    cat = QuantCat([None, None], output_spec=A8, name="cat", dim=1)
    with calibrating(cat):
        cat([a, c])
    j = torch.cat([a, c], 1)
    torch.testing.assert_close(cat([a, c]), ref_affine_uint8(j, float(j.min()), float(j.max())), rtol=0, atol=1e-6)


def test_fp16_cast_weights_need_no_calibration():
    fl = nn.Linear(4, 2)
    try:
        spec = QuantSpec("fp16", symmetric=True, scaled=False)
    except ConfigError:
        pytest.skip("fp16 format not available")
    q = QuantLinear.from_float(fl, spec, name="fc")
    torch.testing.assert_close(q.quantized_weight(), fl.weight.detach().half().float(), rtol=0, atol=0)
