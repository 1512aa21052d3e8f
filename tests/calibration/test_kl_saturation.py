"""KL on a saturating activation (ReLU6): the clipped mass is measured and reported, not hidden."""

import logging

import torch

from lowbit import QuantSpec
from lowbit.calibration import make_observer


def relu6_like(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.clamp(torch.randn(n, generator=g) * 4 + 1, 0, 6)  # ~27 % of the values sit at 6.0


def test_clipped_fraction_matches_direct_count():
    x = relu6_like()
    obs = make_observer(QuantSpec("uint8", symmetric=False, calibrator="percentile:50"), "act")
    obs.update(x)
    lo, hi = obs.compute_range()
    frac = float(obs.clipped_fraction(lo, hi))
    w = float(obs.stats.width)
    # whole bins beyond hi count as clipped: between the exact count above hi and above hi + one bin
    upper = float((x > hi).double().mean())
    lower = float((x >= float(hi) + w).double().mean())
    assert lower - 1e-9 <= frac <= upper + 1e-9
    assert 0.3 < frac < 0.7


def test_kl_on_relu6_point_mass_warns_naming_the_tensor(caplog):
    x = relu6_like()
    obs = make_observer(QuantSpec("uint8", symmetric=False, calibrator="kl"), "blocks.1.output")
    obs.update(x)
    with caplog.at_level(logging.WARNING, logger="lowbit.calibration.histogram"):
        lo, hi = obs.compute_range()
    if float(hi) < 6.0 - 1e-3:  # KL clipped the saturation spike: it must say so
        assert "blocks.1.output" in caplog.text and "KL clips" in caplog.text
    minmax = make_observer(QuantSpec("uint8", symmetric=False, calibrator="minmax"), "m")
    minmax.update(x)
    assert float(minmax.compute_range()[1]) == 6.0


def test_no_warning_when_kl_keeps_the_range(caplog):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(100_000, generator=g) * 4  # uniform: nothing worth clipping
    obs = make_observer(QuantSpec("uint8", symmetric=False, calibrator="kl"), "uniform")
    obs.update(x)
    with caplog.at_level(logging.WARNING, logger="lowbit.calibration.histogram"):
        obs.compute_range()
    assert "KL clips" not in caplog.text
