"""Moving-average min/max equals torch.ao's observers bit for bit (test only: lowbit never imports torch.ao)."""

from __future__ import annotations

import pytest
import torch
from torch.ao.quantization import MovingAverageMinMaxObserver as AoObserver
from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver as AoPerChannel

from lowbit.calibration import MovingAverageMinMax, MovingAverageMinMaxObserver
from lowbit.errors import ConfigError, EmptyCalibrationError
from lowbit.spec import QuantSpec


def test_per_tensor_equals_torch_ao():
    torch.manual_seed(0)
    ours = MovingAverageMinMaxObserver(QuantSpec("int8", calibrator="moving_average"))
    ref = AoObserver(averaging_constant=0.01)
    for k in range(30):
        x = torch.randn(64) * (1 + k) + k
        ours.update(x)
        ref(x)
    lo, hi = ours.compute_range()
    assert torch.equal(lo, ref.min_val) and torch.equal(hi, ref.max_val)


def test_per_channel_equals_torch_ao():
    torch.manual_seed(1)
    ours = MovingAverageMinMaxObserver(QuantSpec("int8", granularity="channel:1", calibrator=MovingAverageMinMax(0.1)))
    ref = AoPerChannel(averaging_constant=0.1, ch_axis=1)
    for _ in range(10):
        x = torch.randn(4, 3, 5) * torch.tensor([1.0, 5.0, 0.1])[None, :, None]
        ours.update(x)
        ref(x)
    lo, hi = ours.compute_range()
    assert torch.equal(lo, ref.min_val) and torch.equal(hi, ref.max_val)


def test_closed_form_and_merge():
    obs = MovingAverageMinMaxObserver(QuantSpec(calibrator=MovingAverageMinMax(c=0.25)))
    obs.update(torch.tensor([0.0, 4.0]))
    obs.update(torch.tensor([-4.0, 8.0]))
    assert [float(v) for v in obs.compute_range()] == [-1.0, 5.0]  # 0 + .25 (-4 - 0), 4 + .25 (8 - 4)
    other = MovingAverageMinMaxObserver(QuantSpec(calibrator=MovingAverageMinMax(c=0.25)))
    other.update(torch.tensor([2.0, 2.0]))
    obs.merge(other)  # weighted by batch counts: (2 * -1 + 1 * 2) / 3, (2 * 5 + 2) / 3
    assert [float(v) for v in obs.compute_range()] == pytest.approx([0.0, 4.0])


def test_errors():
    with pytest.raises(ConfigError):
        MovingAverageMinMaxObserver(QuantSpec(calibrator=MovingAverageMinMax(c=0.0)))
    with pytest.raises(EmptyCalibrationError):
        MovingAverageMinMaxObserver(QuantSpec(calibrator="ema")).compute_range()
