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
    # and it quantizes as well as the best of 400 clips on the same grid with torch's fake-quant (-3..3)
    amax = float(x.abs().max())
    best = min(_fq_error(x, amax * k / 400 / 3, 0, -3, 3) for k in range(1, 401))
    assert _fq_error(x, float(hi) / 3, 0, -3, 3) <= 1.005 * best


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


# --- against independent references: numpy's percentile, a brute-force search with torch's fake-quant -----

def _skewed(n: int, seed: int) -> torch.Tensor:
    """Asymmetric data (shifted Gaussian + wide Laplace): percentiles of x and of |x| differ by many bins."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n // 4, generator=g, dtype=torch.float64) - 0.5
    lap = (-3.0 * torch.sign(u) * torch.log1p(-2 * u.abs())).float()  # Laplace(0, 3) by inversion
    return torch.cat([torch.randn(n - n // 4, generator=g) * 2 + 0.7, lap])


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99])
@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_equals_numpy_within_one_bin(p, symmetric):
    """The histogram quantile lies in the bin of the ceil(qN)-th order statistic, i.e. within one bin width of
    ``numpy.percentile(method="inverted_cdf")``: of |x| when symmetric, of each tail of x when affine."""
    import numpy as np

    x = _skewed(40001, 7)  # odd N: q N is never an integer, so the order statistic is unambiguous
    obs = make_observer(QuantSpec("int8", symmetric=symmetric, calibrator=f"percentile:{p}"))
    for part in torch.chunk(x, 3):  # the range grows between batches
        obs.update(part)
    lo, hi = (float(v) for v in obs.compute_range())
    w = float(obs.stats.width[0])
    xs = x.double().numpy()
    if symmetric:
        t = np.percentile(np.abs(xs), p, method="inverted_cdf")
        ref_lo, ref_hi = max(-t, xs.min()), min(t, xs.max())
    else:
        ref_lo = np.percentile(xs, 100 - p, method="inverted_cdf")
        ref_hi = np.percentile(xs, p, method="inverted_cdf")
    assert abs(hi - ref_hi) <= w and abs(lo - ref_lo) <= w


def _fq_error(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> float:
    y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return float(((y - x).double() ** 2).sum())


@pytest.mark.parametrize("fmt,symmetric,qmin,qmax", [("int8", True, -128, 127), ("int4", True, -8, 7),
                                                      ("uint8", False, 0, 255), ("int4", False, -8, 7)])
@pytest.mark.parametrize("dist", ["gauss", "skewed"])
def test_mse_range_is_as_good_as_brute_force_fake_quantize(fmt, symmetric, qmin, qmax, dist):
    """The histogram MSE range quantizes the data (torch.fake_quantize_per_tensor_affine) within 0.5 % of the
    best range of a brute-force search over 1000 symmetric clips / a 48 x 48 affine grid."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20000, generator=g) if dist == "gauss" else _skewed(20000, 8)
    spec = QuantSpec(fmt, symmetric=symmetric, calibrator="mse")
    obs = make_observer(spec)
    obs.update(x)
    s, z = compute_qparams(spec, *obs.compute_range())
    ours = _fq_error(x, float(s), int(z), qmin, qmax)
    mn, mx = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if symmetric:
        amax = max(-mn, mx)
        errs = [_fq_error(x, amax * k / 1000 / qmax, 0, qmin, qmax) for k in range(1, 1001)]
    else:
        errs = []
        for i in range(49):
            for j in range(1, 49):
                lo, hi = mn * i / 48, mx * j / 48
                sc = (hi - lo) / (qmax - qmin)
                errs.append(_fq_error(x, sc, int(min(max(qmin - round(lo / sc), qmin), qmax)), qmin, qmax))
    best, minmax = min(errs), errs[-1]
    assert minmax > 1.03 * best  # clipping matters here, so the check can tell a good range from MinMax's
    assert ours <= 1.005 * best


ALL_CALIBRATORS = ["minmax", "moving_average", "kl", "percentile", "percentile:50", "mse", "admm"]


@pytest.mark.parametrize("cal", ALL_CALIBRATORS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.0, -3.0, 3.1, -3.1, 1e-30])
def test_constant_tensor_gives_an_ordered_range_that_represents_it(cal, symmetric, value):
    """A constant tensor (all zeros included): ``min <= max``, a finite positive scale, and the constant
    survives fake-quantization (to float32 rounding, or is flushed to 0 when it is below the smallest scale)."""
    if cal == "admm" and not symmetric:
        pytest.skip("ADMM is symmetric only")
    spec = QuantSpec("int8", symmetric=symmetric, calibrator=cal)
    x = torch.full((64,), value)
    obs = make_observer(spec, "const")
    obs.update(x)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert float(lo) <= float(hi), (float(lo), float(hi))
    s, z = compute_qparams(spec, lo, hi)
    assert bool(torch.isfinite(s)) and float(s) > 0
    y = fake_quantize(x, s, z, spec)
    if abs(value) > 1e-3:
        assert torch.allclose(y, x, rtol=1e-6, atol=0.0)
    else:
        assert float((y - x).abs().max()) <= float(x.abs().max())
