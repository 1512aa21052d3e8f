"""KL on non-negative (post-ReLU) tensors: exact zeros do not move the threshold, and the fraction of values a
KL range clips is measured and reported."""

import logging

import torch

import lowbit.calibration.histogram as histogram
from lowbit import QuantSpec
from lowbit.calibration import make_observer

UINT8_KL = QuantSpec("uint8", symmetric=False, calibrator="kl")


def kl_hi(x: torch.Tensor) -> float:
    obs = make_observer(UINT8_KL, "t")
    obs.update(x)
    return float(obs.compute_range()[1])


def relu_normal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, generator=g))  # half of the values are exact zeros


def test_kl_threshold_ignores_the_zeros_of_a_relu():
    # zero is exact at any threshold: padding with zeros (as a sparser ReLU would) must not change the range
    torch.manual_seed(0)
    x = relu_normal(100_000, 0)
    base = kl_hi(x)
    for extra in (50_000, 400_000):
        assert kl_hi(torch.cat([x, torch.zeros(extra)])) == base


def test_kl_keeps_the_body_of_a_relu_output():
    # before zeros were left out, the 50 % spike in bin 0 pulled the threshold of this tensor to ~1/3 of its max
    # (Fashion-MNIST CNN: conv1 0.998 of 3.14, fc1 7.98 of 31.7; W8A8 top-1 0.9120 vs 0.9200 minmax)
    x = relu_normal(200_000, 1)
    hi = kl_hi(x)
    assert hi >= float(torch.quantile(x[:100_000], 0.999))
    assert hi <= float(x.max())


def test_kl_on_relu6_keeps_the_saturation_point():
    g = torch.Generator().manual_seed(0)
    x = torch.clamp(torch.randn(200_000, generator=g) * 4 + 1, 0, 6)  # ~40 % at 0, ~11 % at 6.0
    obs = make_observer(UINT8_KL, "blocks.1.output")
    obs.update(x)
    lo, hi = obs.compute_range()
    assert float(lo) == 0.0 and float(hi) == 6.0
    assert float(obs.clipped_fraction(lo, hi)) == 0.0


def test_clipped_fraction_matches_direct_count():
    g = torch.Generator().manual_seed(0)
    x = torch.clamp(torch.randn(200_000, generator=g) * 4 + 1, 0, 6)
    obs = make_observer(QuantSpec("uint8", symmetric=False, calibrator="percentile:50"), "act")
    obs.update(x)
    lo, hi = obs.compute_range()
    frac = float(obs.clipped_fraction(lo, hi))
    w = float(obs.stats.width)
    # whole bins beyond hi count as clipped: between the exact count above hi + one bin and above hi
    assert float((x >= float(hi) + w).double().mean()) - 1e-9 <= frac <= float((x > hi).double().mean()) + 1e-9
    assert 0.3 < frac < 0.7


def test_kl_range_that_clips_warns_naming_the_tensor(caplog, monkeypatch):
    x = torch.linspace(0, 10, 100_001)
    monkeypatch.setattr(histogram, "kl_range", lambda h, spec, start_bin=128: (h.min_val, h.max_val * 0.5))
    obs = make_observer(UINT8_KL, "blocks.1.output")
    obs.update(x)
    with caplog.at_level(logging.WARNING, logger="lowbit.calibration.histogram"):
        obs.compute_range()
    # whole bins above 5.0 (width 2^-7) hold the values >= 5 + 2^-7: 49.92 %
    assert "blocks.1.output: KL clips 49.9% of the observed values (range [0, 5], observed [0, 10])" in caplog.text


def test_no_warning_when_kl_keeps_the_range(caplog):
    g = torch.Generator().manual_seed(1)
    obs = make_observer(UINT8_KL, "uniform")
    obs.update(torch.rand(100_000, generator=g) * 4)  # uniform: nothing worth clipping
    with caplog.at_level(logging.WARNING, logger="lowbit.calibration.histogram"):
        obs.compute_range()
    assert "KL clips" not in caplog.text
