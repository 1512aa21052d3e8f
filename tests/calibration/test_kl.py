"""KL (TensorRT entropy) calibration: the vectorized search against a plain loop over the candidates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.calibration import KL, HistogramObserver, make_observer
from lowbit.calibration.kl import _dense_kl as _DENSE_KL
from lowbit.calibration.kl import kl_divergences, kl_levels, kl_threshold
from lowbit.spec import QuantSpec


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """MXNet / ONNX Runtime smooth_distribution: zeros -> eps, non-zeros give up the same mass."""
    nz = d != 0
    eps1 = eps * (d.size - nz.sum()) / nz.sum()
    return np.maximum(np.where(nz, d - eps1, eps), 1e-300)


def reference_kl(hist: np.ndarray, levels: int, start_bin: int) -> tuple[int, np.ndarray]:
    """TensorRT pseudocode (GTC 2017 slides) with MXNet's smoothing, one candidate at a time, float64."""
    nb = hist.size
    divs = []
    cands = list(range(max(start_bin, levels), nb + 1))
    for i in cands:
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
        nonzero = p != 0
        merged = i // levels
        q = np.zeros(i)
        for g in range(levels):
            start, stop = g * merged, ((g + 1) * merged if g < levels - 1 else i)
            level_count = hist[start:stop].sum()  # "quantize bin[0] .. bin[i-1] into L levels"
            norm = nonzero[start:stop].sum()
            if norm:
                q[start:stop] = level_count / norm  # "expand" over the non-zero bins of P
        q[~nonzero] = 0.0
        if not (q > 0).any():
            divs.append(math.inf)
            continue
        ps, qs = _smooth(p), _smooth(q)
        pn, qn = ps / ps.sum(), qs / qs.sum()
        divs.append(float((pn * np.log(pn / qn)).sum()))
    divs = np.array(divs)
    return cands[int(np.argmin(divs))], divs


def _hist_of(x: torch.Tensor, nb: int) -> np.ndarray:
    obs = HistogramObserver(QuantSpec("int8", calibrator=KL(num_bins=nb)))
    obs.update(x)
    return (obs.stats.hist[0, 0] + obs.stats.hist[0, 1]).numpy()


@pytest.mark.parametrize("dist", ["gauss", "laplace", "relu", "sparse"])
def test_vectorized_equals_reference_loop(dist):
    torch.manual_seed(0)
    nb, levels = 512, 64  # smaller than 2048/128 so the Python reference stays fast; same code path
    n = 20000
    x = {"gauss": torch.randn(n), "laplace": torch.distributions.Laplace(0.0, 1.0).sample((n,)),
         "relu": torch.relu(torch.randn(n)), "sparse": torch.randn(300) * 5}[dist]
    h = _hist_of(x, nb)
    ref_i, ref_div = reference_kl(h, levels, 64)
    cand, kl = kl_divergences(torch.from_numpy(h)[None], levels, 64)
    assert int(cand[int(kl[0].argmin())]) == ref_i
    finite = np.isfinite(ref_div)
    assert np.array_equal(finite, torch.isfinite(kl[0]).numpy())
    np.testing.assert_allclose(kl[0].numpy()[finite], ref_div[finite], rtol=1e-9, atol=1e-12)


def test_default_2048_bins_128_levels_matches_reference():
    torch.manual_seed(1)
    h = _hist_of(torch.randn(50000) * 3, 2048)
    ref_i, _ = reference_kl(h, 128, 128)
    t = kl_threshold(torch.from_numpy(h)[None], torch.tensor([1.0], dtype=torch.float64), 128, 128)
    assert int(t[0]) == ref_i


def test_levels_signed_unsigned():
    assert kl_levels(QuantSpec("int8"), nonnegative=False) == 128
    assert kl_levels(QuantSpec("int8"), nonnegative=True) == 128  # symmetric int8 spends half the codes
    assert kl_levels(QuantSpec("uint8", symmetric=False), nonnegative=True) == 256
    assert kl_levels(QuantSpec("int8", symmetric=False), nonnegative=True) == 256
    assert kl_levels(QuantSpec("int8", symmetric=False), nonnegative=False) == 128


def test_unsigned_variant_uses_256_levels_on_relu_data():
    torch.manual_seed(2)
    x = torch.relu(torch.randn(40000))
    obs = make_observer(QuantSpec("uint8", symmetric=False, calibrator="kl"))
    obs.update(x)
    h = (obs.stats.hist[0, 0] + obs.stats.hist[0, 1]).numpy().copy()
    h[0] = 0  # the exact zeros of the ReLU are left out of the KL search (see kl_range)
    ref_i, _ = reference_kl(h, 256, 128)
    lo, hi = obs.compute_range()
    w = float(obs.stats.width[0])
    assert float(lo) == 0.0
    assert float(hi) == pytest.approx(min(ref_i * w, float(x.max())), rel=1e-6)


def test_kl_clips_gaussian_tail_but_keeps_bulk():
    torch.manual_seed(3)
    x = torch.randn(200000)
    obs = make_observer(QuantSpec("int8", calibrator="kl"))
    obs.update(x)
    lo, hi = obs.compute_range()
    # TensorRT-style KL on a Gaussian clips well inside max|x| (~4.5 sigma) but keeps >= 2.5 sigma
    assert 2.5 < float(hi) < float(x.abs().max())
    assert float(lo) == -float(hi)


def test_relu_zero_spike_does_not_drive_kl_to_clip():
    """A ReLU output that is 40 % exact zeros: with the zero spike in P, TensorRT's Q expansion penalises
    large thresholds and KL clips ~10 % of the values; left out, KL keeps (almost) the whole range."""
    g = torch.Generator().manual_seed(3)
    body = torch.clamp(torch.randn(60000, generator=g).abs() * 1.2, max=6.0)
    x = torch.cat([torch.zeros(40000), body])
    obs = make_observer(QuantSpec("uint8", symmetric=False, calibrator="kl"))
    obs.update(x)
    lo, hi = obs.compute_range()
    assert float(obs.clipped_fraction(lo, hi)) < 0.01
    h = (obs.stats.hist[0, 0] + obs.stats.hist[0, 1]).numpy()
    ref_i, _ = reference_kl(h, 256, 128)  # the unmodified TensorRT search on the same histogram
    assert ref_i * float(obs.stats.width[0]) < float(hi)


@pytest.mark.parametrize("dist", ["gauss", "sparse"])
def test_direct_per_bin_path_equals_reference_loop(dist, monkeypatch):
    """Fractional counts (a smoothing shift above half the smallest count, but below every count, so no
    smoothed bin goes negative) take the direct per-bin path (``_dense_kl``) instead of the series: it must
    give the reference's divergences too."""
    import lowbit.calibration.kl as klm

    calls = []
    monkeypatch.setattr(klm, "_dense_kl", lambda *a: calls.append(1) or _DENSE_KL(*a))
    torch.manual_seed(4)
    x = torch.randn(20000) if dist == "gauss" else torch.randn(300) * 5
    h = _hist_of(x, 512) * 2e-4
    ref_i, ref_div = reference_kl(h, 64, 64)
    cand, kl = kl_divergences(torch.from_numpy(h)[None], 64, 64)
    assert calls  # the direct path ran
    assert int(cand[int(kl[0].argmin())]) == ref_i
    finite = np.isfinite(ref_div)
    assert np.array_equal(finite, torch.isfinite(kl[0]).numpy())
    np.testing.assert_allclose(kl[0].numpy()[finite], ref_div[finite], rtol=1e-9, atol=1e-12)


def test_signed_per_channel_range_equals_reference_threshold():
    """End to end, int8 per channel: each channel's range is ``(-i* w, i* w)`` clamped to its data, ``i*`` the
    reference search with 128 levels on |x| (bin 0 kept), or 128 levels with bin 0 dropped for the
    non-negative channel (symmetric int8 has 128 codes on [0, t])."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 3, generator=g) * torch.tensor([1.0, 3.0, 2.0])
    x[:, 1] = x[:, 1] ** 3  # heavy tails: KL clips
    x[:, 2] = torch.relu(x[:, 2])  # non-negative channel
    obs = make_observer(QuantSpec("int8", granularity="channel:1", calibrator=KL(num_bins=1024)))
    for part in torch.chunk(x, 3):
        obs.update(part)
    lo, hi = obs.compute_range()
    for c in range(3):
        h = (obs.stats.hist[c, 0] + obs.stats.hist[c, 1]).numpy().copy()
        if c == 2:
            h[0] = 0
        ref_i, _ = reference_kl(h, 128, 128)
        t = ref_i * float(obs.stats.width[c])
        xc = x[:, c]
        assert float(hi[c]) == pytest.approx(min(t, float(xc.max())), rel=1e-6), c
        assert float(lo[c]) == pytest.approx(max(-t, float(xc.min())), rel=1e-6), c
    assert float(hi[1]) < 0.5 * float(x[:, 1].abs().max())  # the check is not vacuous: channel 1 is clipped


def test_too_few_bins_for_the_levels_says_how_many_are_needed():
    """int16 has 65536 levels (32768 on one side): the message names the bins it needs, not the 8-bit default."""
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"at least 32768 histogram bins .* pass KL\(num_bins=32768\) or more"):
        kl_divergences(torch.ones(1, 2048), levels=32768)
