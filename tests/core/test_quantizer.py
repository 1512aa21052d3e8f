"""TensorQuantizer life cycle: calibrating scope, buffers in state_dict, dynamic mode, LSQ, errors."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import EmptyCalibrationError, NonFiniteError, QuantSpec
from lowbit.nn import TensorQuantizer, calibrating, quantizers
from lowbit.ops import fake_quantize
from lowbit.spec import compute_qparams


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
    allx = torch.cat(batches)
    s, z = compute_qparams(m.q_in.spec, allx.min(), allx.max())
    assert torch.equal(m.q_in.scale, s) and torch.equal(m.q_in.zero_point, z)
    y = m(batches[0])
    ref_in = fake_quantize(batches[0], s, z, m.q_in.spec)
    ref = fake_quantize(m.fc(ref_in), m.q_out.scale, m.q_out.zero_point, m.q_out.spec)
    assert torch.equal(y, ref)
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
