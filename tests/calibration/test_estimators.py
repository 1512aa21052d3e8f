"""Percentile / MSE / KL / MinMax ranges on data whose best clip is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.calibration import MSE, make_observer
from lowbit.ops import fake_quantize
from lowbit.spec import QuantSpec, compute_qparams


def _range(x, cal, fmt="int8", symmetric=True):
    obs = make_observer(QuantSpec(fmt, symmetric=symmetric, calibrator=cal))
    for part in torch.chunk(x, 4):
        obs.update(part)
    return [float(v) for v in obs.compute_range()]


def _phi(a):
    return math.exp(-a * a / 2) / math.sqrt(2 * math.pi)


def _Phi(a):
    return 0.5 * (1 + math.erf(a / math.sqrt(2)))


def _argmin(f, lo, hi, n=20000):
    xs = [lo + (hi - lo) * k / n for k in range(n + 1)]
    return min(xs, key=f)


def test_percentile_uniform_symmetric_and_affine():
    torch.manual_seed(0)
    x = torch.rand(400000) * 2 - 1
    lo, hi = _range(x, "percentile:99")
    assert hi == pytest.approx(0.99, abs=3e-3) and lo == pytest.approx(-0.99, abs=3e-3)
    y = torch.rand(400000) * 10
    lo, hi = _range(y, "percentile:99", fmt="uint8", symmetric=False)
    assert hi == pytest.approx(9.9, abs=0.03) and lo == pytest.approx(0.1, abs=0.03)


def test_mse_gaussian_matches_closed_form_optimum():
    # int4 narrow: 15 levels, step s = a / 7; E(a) = 2[(1 + a^2)(1 - Phi(a)) - a phi(a)] + s^2/12 (2 Phi(a) - 1)
    def err(a):
        return 2 * ((1 + a * a) * (1 - _Phi(a)) - a * _phi(a)) + (a / 7) ** 2 / 12 * (2 * _Phi(a) - 1)

    best = _argmin(err, 0.5, 6.0)
    assert 2.3 < best < 2.8  # ~2.5 sigma (Banner et al., ACIQ) at 4 bits
    torch.manual_seed(1)
    lo, hi = _range(torch.randn(400000), "mse", fmt="int4_narrow")
    assert hi == pytest.approx(best, rel=0.04) and lo == pytest.approx(-best, rel=0.04)


def test_mse_laplace_matches_closed_form_optimum():
    # Laplace(0, 1): clipping error 2 e^{-a}, noise (a/7)^2 / 12 (1 - e^{-a})
    def err(a):
        return 2 * math.exp(-a) + (a / 7) ** 2 / 12 * (1 - math.exp(-a))

    best = _argmin(err, 0.5, 15.0)
    torch.manual_seed(2)
    x = torch.distributions.Laplace(0.0, 1.0).sample((400000,))
    lo, hi = _range(x, "mse", fmt="int4_narrow")
    assert hi == pytest.approx(best, rel=0.05)


def test_mse_uniform_does_not_clip_at_8_bits():
    torch.manual_seed(3)
    x = torch.rand(200000) * 2 - 1
    lo, hi = _range(x, "mse", fmt="int8_narrow")
    assert 0.98 < hi <= float(x.max())


@pytest.mark.parametrize("fmt,symmetric", [("int8", True), ("uint8", False), ("int4", False)])
def test_mse_range_beats_minmax_measured_with_fake_quantize(fmt, symmetric):
    torch.manual_seed(4)
    x = torch.cat([torch.randn(50000) + 2.0, torch.tensor([12.0])])
    errs = {}
    for cal in ("minmax", "mse"):
        spec = QuantSpec(fmt, symmetric=symmetric, calibrator=cal)
        obs = make_observer(spec)
        obs.update(x)
        s, z = compute_qparams(spec, *obs.compute_range())
        errs[cal] = float(((fake_quantize(x, s, z, spec) - x) ** 2).mean())
    assert errs["mse"] < errs["minmax"]


def test_outlier_minmax_takes_it_others_clip_it():
    torch.manual_seed(5)
    n = 20000
    x = torch.cat([torch.rand(n) * 200 - 100, torch.tensor([10000.0])])
    spec = QuantSpec("int8", calibrator="kl")
    obs = make_observer(spec)
    obs.update(x)
    r = {k: float(hi) for k, (lo, hi) in obs.candidate_ranges().items()}
    assert r["minmax"] == 10000.0
    assert r["percentile"] <= 110.0
    # MSE trades the outlier's clipping error against the bulk's rounding noise: for t > 100,
    # E(t) = (10000 - t)^2 + n (t / 127)^2 / 12, minimal at t* = 10000 / (1 + n / (12 * 127^2));
    # the histogram's candidates are multiples of its bin width 8.
    t_star = 10000 / (1 + n / (12 * 127**2))
    assert abs(r["mse"] - t_star) <= 8.0 and r["mse"] < 10000.0
    # KL: with max 10000 the 2048 bins are 8 wide and the bulk fills 13 of them, which 12-bin groups
    # represent losslessly, so KL (like TensorRT's) keeps the outlier; with the outlier at 1000 the bulk
    # spans 200 bins and KL clips at the bulk's edge.
    assert r["kl"] == 10000.0
    obs = make_observer(spec)
    obs.update(torch.cat([x[:-1], torch.tensor([1000.0])]))
    assert float(obs.compute_range()[1]) <= 101.0
    assert make_observer(QuantSpec("int8", calibrator="minmax")).__class__.__name__ == "MinMaxObserver"


def test_generic_format_mse_uses_format_rounding():
    from lowbit.formats.base import round_half_even

    class Int3Like:  # a non-integer format object with the integer grid {-3..3}: results must agree with int
        name, bits, is_integer = "grid3", 3, False
        min_value, max_value = -3.0, 3.0

        def round(self, x, rounding="nearest", generator=None):
            return torch.clamp(round_half_even(x), -3, 3)

    torch.manual_seed(6)
    x = torch.randn(100000)
    obs = make_observer(QuantSpec(Int3Like(), calibrator=MSE()))
    obs.update(x)
    lo, hi = obs.compute_range()
    # best clip for a 7-level grid on N(0,1) (exact error at the bin centers) lies near 2 sigma
    assert 1.6 < float(hi) < 2.4 and float(lo) == -float(hi)


def test_mse_binary_is_the_mean_magnitude_and_beats_the_grid():
    """Binary ``{-a, +a}``: ``E(a) = sum (a sign(x) - x)^2`` is minimal at ``a = mean|x|`` (XNOR-Net); the
    histogram's closed form lands within half a bin of the raw mean, and its error is no larger than that of
    any of the 128 grid candidates ``max|x| k / 128`` that other formats search."""
    torch.manual_seed(6)
    x = torch.cat([torch.randn(30000) * 0.3, torch.rand(5000) * 2.0 + 0.5])
    spec = QuantSpec("binary", symmetric=True, calibrator="mse")
    obs = make_observer(spec)
    obs.update(x)
    lo, hi = obs.compute_range()
    a = float(torch.maximum(lo.abs(), hi.abs()))
    amax = float(x.abs().max())
    assert a == pytest.approx(float(x.abs().mean()), abs=amax / 2048)

    def err(t):
        return float(((torch.where(x >= 0, t, -t) - x) ** 2).sum())

    assert err(a) <= min(err(amax * k / 128) for k in range(1, 129)) * (1 + 1e-6)
