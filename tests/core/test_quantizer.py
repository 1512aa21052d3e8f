"""TensorQuantizer life cycle: calibrating scope, buffers in state_dict, dynamic mode, LSQ, errors."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import EmptyCalibrationError, NonFiniteError, QuantSpec
from lowbit.nn import TensorQuantizer, calibrating, quantizers


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_in = TensorQuantizer(QuantSpec("uint8", symmetric=False), "q_in")
        self.fc = nn.Linear(4, 3)
        self.q_out = TensorQuantizer(QuantSpec("int8", symmetric=True), "q_out")

    def forward(self, x):
        return self.q_out(self.fc(self.q_in(x)))


def test_calibrating_scope_sets_minmax_qparams_and_switches_on():
    torch.manual_seed(0)
    m = Tiny()
    batches = [torch.randn(8, 4) * (i + 1) for i in range(3)]
    with calibrating(m):
        outs = [m(b) for b in batches]
    # inside calibration the data passes unchanged (float activations)
    assert torch.equal(outs[0], m.fc(batches[0]))
    # independent reference: uint8 affine over the range of all batches (zero included), int8 symmetric
    # max|y| / 127 over the float outputs seen while calibrating, torch's own fake quantization
    allx = torch.cat(batches)
    lo, hi = min(float(allx.min()), 0.0), max(float(allx.max()), 0.0)
    s = (hi - lo) / 255
    z = min(max(round(-lo / s), 0), 255)
    torch.testing.assert_close(m.q_in.scale, torch.tensor(s), rtol=1e-6, atol=0)
    assert int(m.q_in.zero_point) == z
    s_out = float(torch.cat(outs).detach().abs().max()) / 127
    torch.testing.assert_close(m.q_out.scale, torch.tensor(s_out), rtol=1e-6, atol=0)
    assert int(m.q_out.zero_point) == 0
    y = m(batches[0])
    ref_in = torch.fake_quantize_per_tensor_affine(batches[0], float(m.q_in.scale), z, 0, 255)
    ref = torch.fake_quantize_per_tensor_affine(m.fc(ref_in), float(m.q_out.scale), 0, -128, 127)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert [n for n, _ in quantizers(m)] == ["q_in", "q_out"]


def test_state_dict_round_trip_into_fresh_model():
    torch.manual_seed(1)
    m = Tiny()
    with calibrating(m):
        m(torch.randn(16, 4))
    fresh = Tiny()
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), m(x))
    assert bool(fresh.q_in.initialized)


def test_per_channel_weight_quantizer_calibrate_now_matches_torch():
    torch.manual_seed(2)
    w = torch.randn(6, 5)
    q = TensorQuantizer(QuantSpec("int8", granularity="channel"), "w")
    q.calibrate_now(w)
    assert q.scale.shape == (6,)
    ref_scale = w.abs().amax(dim=1) / 127  # symmetric per row: max|w| / 127
    torch.testing.assert_close(q.scale, ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(q.zero_point, torch.zeros(6, dtype=torch.int32))
    zp = torch.zeros(6, dtype=torch.int32)
    torch.testing.assert_close(q(w), torch.fake_quantize_per_channel_affine(w, ref_scale, zp, 0, -128, 127), rtol=0, atol=1e-6)
    s = torch.exp2(torch.round(torch.log2(q.scale)))
    q.set_qparams(s)
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(6, dtype=torch.int32), 0, -128, 127)
    assert torch.equal(q(w), ref)


def test_dynamic_per_token_uses_each_batch_range():
    q = TensorQuantizer(QuantSpec("int8", symmetric=True, granularity="token", dynamic=True), "act")
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0]])
    y = q(x)
    # row 0: scale 2/127; row 1: scale 100/127
    assert torch.allclose(y[0], torch.round(x[0] / (2 / 127)) * (2 / 127))
    assert torch.allclose(y[1], torch.round(x[1] / (100 / 127)) * (100 / 127))


def test_switched_off_dynamic_quantizer_passes_data_through():
    q = TensorQuantizer(QuantSpec("int8", symmetric=True, granularity="token", dynamic=True), "act")
    x = torch.tensor([[0.3, -1.7, 0.01]])
    q.set_mode(False, False)
    assert torch.equal(q(x), x)  # off, as the export (which skips disabled quantizers) sees it
    q.set_mode(False, True)
    s = 1.7 / 127
    torch.testing.assert_close(q(x), torch.fake_quantize_per_tensor_affine(x, s, 0, -128, 127), rtol=0, atol=1e-7)


def test_errors_empty_calibration_and_nan():
    m = Tiny()
    with pytest.raises(EmptyCalibrationError, match="q_in"):
        m(torch.randn(2, 4))  # never calibrated
    with pytest.raises(EmptyCalibrationError, match="saw no calibration data"):
        with calibrating(m):
            pass
    with pytest.raises(NonFiniteError, match=r"q_in \(batch 0\)"):
        with calibrating(m):
            m(torch.tensor([[float("nan"), 0, 0, 0]]))


def test_lsq_scale_learns_and_is_a_parameter():
    torch.manual_seed(3)
    q = TensorQuantizer(QuantSpec("int4", symmetric=True), "w")
    x = torch.randn(256) * 3
    q.calibrate_now(x)
    q.enable_lsq()
    assert isinstance(q.scale, nn.Parameter)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    err0 = float(((q(x) - x) ** 2).mean().detach())
    for _ in range(150):
        opt.zero_grad()
        loss = ((q(x) - x) ** 2).mean()
        loss.backward()
        opt.step()
    err1 = float(((q(x) - x) ** 2).mean().detach())
    assert err1 < err0 * 0.9  # minmax over-covers Gaussian tails at 4 bits; LSQ shrinks the scale
    sd = q.state_dict()
    assert "scale" in sd


def test_fp16_cast_spec_needs_no_calibration():
    pytest.importorskip("lowbit.formats.minifloat")
    q = TensorQuantizer(QuantSpec("fp16", scaled=False), "h")
    x = torch.randn(100)
    assert torch.equal(q(x), x.half().float())
    assert lowbit.QuantSpec("fp16", scaled=False).scaled is False
