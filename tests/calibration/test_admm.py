"""ADMM weight scales: never worse than MinMax, least-squares fixed point, XNOR-Net scale for binary."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.calibration import ADMMObserver, make_observer
from lowbit.errors import ConfigError
from lowbit.ops import fake_quantize
from lowbit.spec import QuantSpec, compute_qparams


def _mse(w, spec, lo, hi):
    s, z = compute_qparams(spec, lo, hi)
    return ((fake_quantize(w, s, z, spec) - w) ** 2).sum(dim=tuple(range(1, w.dim())) if w.dim() > 1 else None)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["int8", "int4", "int4_narrow", "int2"]),
       st.sampled_from(["tensor", "channel"]), st.floats(0.01, 100.0))
def test_never_worse_than_minmax(seed, fmt, gran, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 33, generator=g) * scale
    w[0, 0] *= 8  # an outlier
    errs = {}
    for cal in ("minmax", "admm"):
        spec = QuantSpec(fmt, granularity=gran, calibrator=cal)
        obs = make_observer(spec)
        obs.update(w)
        errs[cal] = _mse(w, spec, *obs.compute_range()) if gran == "channel" else _mse(w.reshape(1, -1), spec.replace(granularity="tensor"), *obs.compute_range())
    assert bool((errs["admm"] <= errs["minmax"] * (1 + 1e-6) + 1e-12).all())


def test_fixed_point_and_improvement_on_gaussian():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    spec = QuantSpec("int4", granularity="channel", calibrator="admm")
    obs = make_observer(spec)
    obs.update(w)
    lo, hi = obs.compute_range()
    a, _ = compute_qparams(spec, lo, hi)
    q = torch.clamp(torch.round(w / a[:, None]), -8, 7)
    # converged: a is the least-squares scale of its own codes
    assert torch.allclose(a, (w * q).sum(1) / (q * q).sum(1), rtol=1e-5)
    mm = make_observer(spec.replace(calibrator="minmax"))
    mm.update(w)
    e_admm, e_mm = _mse(w, spec, lo, hi), _mse(w, spec, *mm.compute_range())
    assert bool((e_admm < e_mm).all()) and float(e_admm.sum()) < 0.85 * float(e_mm.sum())


def test_binary_gives_xnor_scale_mean_abs():
    formats = pytest.importorskip("lowbit.formats.binary")
    torch.manual_seed(1)
    w = torch.randn(6, 50) * torch.arange(1, 7)[:, None]
    spec = QuantSpec(formats.BinaryFormat(), granularity="channel", calibrator="admm")
    obs = make_observer(spec)
    obs.update(w)
    a, _ = compute_qparams(spec, *obs.compute_range())
    assert torch.allclose(a, w.abs().mean(1), rtol=1e-6)


def test_weight_only_and_symmetric_only():
    spec = QuantSpec("int8", calibrator="admm")
    obs = ADMMObserver(spec)
    w = torch.randn(3, 4)
    obs.update(w)
    obs.update(w.clone())  # the same weights every forward: fine
    with pytest.raises(ConfigError, match="weights"):
        obs.update(w + 1)
    with pytest.raises(ConfigError, match="symmetric"):
        ADMMObserver(QuantSpec("uint8", symmetric=False, calibrator="admm"))
    zero = ADMMObserver(spec)
    zero.update(torch.zeros(5))
    s, _ = compute_qparams(spec, *zero.compute_range())
    assert float(s) > 0 and torch.isfinite(s)


def _als_errors(w: torch.Tensor, a0: torch.Tensor, qmin: int, qmax: int, steps: int) -> list[torch.Tensor]:
    """Independent float64 alternation per row: q = clamp(round(w / a)), a = <w, q> / <q, q>; the squared
    error ``||w - a Q(w / a)||^2`` after each step (index 0: the start)."""
    a, out = a0.clone(), []
    for k in range(steps + 1):
        q = torch.clamp(torch.round(w / a[:, None]), qmin, qmax)
        out.append(((w - a[:, None] * q) ** 2).sum(1))
        if k < steps:
            a = (w * q).sum(1) / (q * q).sum(1)
    return out


@pytest.mark.parametrize("fmt,qmin,qmax", [("int4", -8, 7), ("int3", -4, 3), ("int8", -128, 127)])
def test_each_step_lowers_the_error_and_matches_the_alternation(fmt, qmin, qmax):
    """Every least-squares step leaves ``||w - a q||^2`` no larger (for both starts, max|w| / (1.25 qmax) and
    max|w| / qmax), and ``admm_scale`` after k steps has the error of the better start after k steps."""
    from lowbit.calibration.admm import admm_scale

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 200, generator=g, dtype=torch.float64)
    w[1] = w[1] ** 3  # heavy tails
    w[2, 5] = 20.0  # one outlier
    amax = w.abs().amax(1)
    errs = [_als_errors(w, amax / (qmax * 1.25), qmin, qmax, 8), _als_errors(w, amax / qmax, qmin, qmax, 8)]
    for seq in errs:
        for before, after in zip(seq, seq[1:]):
            assert bool((after <= before * (1 + 1e-12)).all())
    assert bool((errs[0][8] < 0.99 * errs[0][0]).any())  # the steps do move
    spec = QuantSpec(fmt, granularity="channel", calibrator="admm")
    for k in (1, 2, 8):
        a = admm_scale(w.float(), spec, max_iters=k, tol=0.0).double()
        q = torch.clamp(torch.round(w / a[:, None]), qmin, qmax)
        ours = ((w - a[:, None] * q) ** 2).sum(1)
        ref = torch.minimum(errs[0][k], errs[1][k])
        assert torch.allclose(ours, ref, rtol=1e-5), k
