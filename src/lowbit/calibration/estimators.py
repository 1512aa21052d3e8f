"""Percentile and MSE range estimators over a :class:`~lowbit.calibration.histogram.Histogram`.

All functions are vectorized over blocks (B) and candidates; they return ``(min_val, max_val)`` float32
of shape (B,), clamped to the observed extremes (a clip range never exceeds the data, and ``min <= max``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..formats.binary import BinaryFormat

if TYPE_CHECKING:
    from ..spec import QuantSpec
    from .histogram import Histogram


def signed_counts(h: Histogram) -> torch.Tensor:
    """(B, 2 nb) float64 counts on the signed grid: bin ``j`` covers ``[(j - nb) w, (j - nb + 1) w)``."""
    return torch.cat([h.hist[:, 1].flip(-1), h.hist[:, 0]], dim=1).double()


def abs_counts(h: Histogram) -> torch.Tensor:
    """(B, nb) float64 counts of |x|: bin ``k`` covers ``[k w, (k + 1) w)``."""
    return (h.hist[:, 0] + h.hist[:, 1]).double()


def clamp_to_data(h: Histogram, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both bounds (B,) clamped into the observed ``[min_val, max_val]`` (float32), so a clip interval that
    misses the data (a constant tensor, a symmetric clip below a one-signed block) still gives ``lo <= hi``."""
    return torch.clamp(lo.float(), h.min_val, h.max_val), torch.clamp(hi.float(), h.min_val, h.max_val)


def quantile(counts: torch.Tensor, first_edge: torch.Tensor, width: torch.Tensor, q: float) -> torch.Tensor:
    """Value below which a fraction ``q`` of the counts lies, interpolating linearly inside the bin.

    ``counts``: (B, M) float64; bin ``j`` of block ``b`` covers ``first_edge[b] + [j, j + 1) * width[b]``.
    Returns (B,) float64.
    """
    cum = counts.cumsum(dim=1)
    target = q * cum[:, -1:]
    j = torch.searchsorted(cum, target).clamp(max=counts.shape[1] - 1)  # first bin with cum >= target
    below = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
    inside = counts.gather(1, j)
    frac = torch.where(inside > 0, (target - below) / inside.clamp(min=1e-300), torch.zeros_like(target))
    return (first_edge + (j.squeeze(1) + frac.squeeze(1).clamp(0, 1)) * width)


def percentile_range(h: Histogram, percentile: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric: ``t`` = the ``percentile`` of |x|, range ``(-t, t)``; affine: the ``100 - p`` and ``p``
    percentiles of x. Clamped to the observed [min, max]."""
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must be in (0, 100], got {percentile}; 99.99 is the usual value.")
    p = percentile / 100.0
    w = h.width
    nb = h.num_bins
    if symmetric:
        t = quantile(abs_counts(h), torch.zeros_like(w), w, p)
        return clamp_to_data(h, -t, t)
    counts = signed_counts(h)
    first = -nb * w
    hi = quantile(counts, first, w, p)
    lo = quantile(counts, first, w, 1.0 - p)
    return clamp_to_data(h, lo, hi)


def _prefix(counts: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix sums (with a leading 0) of n, n c and n c^2 over the bins: each (B, M + 1)."""
    z = torch.zeros(counts.shape[0], 1, dtype=counts.dtype)
    return (torch.cat([z, counts.cumsum(1)], 1), torch.cat([z, (counts * centers).cumsum(1)], 1),
            torch.cat([z, (counts * centers**2).cumsum(1)], 1))


def _interval_error(pre, width, nb, lo, hi, step) -> torch.Tensor:
    """Expected squared error with the clip interval [lo, hi] and step ``step`` (all (B, K), float64):
    ``sum_{c < lo} n (lo - c)^2 + sum_{c > hi} n (c - hi)^2 + step^2 / 12 * sum_{lo <= c <= hi} n``,
    ``c`` the signed bin centers ``(j - nb + 0.5) w``."""
    n, s1, s2 = pre
    m = n.shape[1] - 1
    w = width[:, None]
    # number of bins whose center is < lo, and index of the first bin whose center is > hi
    j_lo = torch.ceil(lo / w + nb - 0.5).clamp(0, m).long()
    j_hi = (torch.floor(hi / w + nb - 0.5) + 1).clamp(0, m).long()
    n_lo, s1_lo, s2_lo = n.gather(1, j_lo), s1.gather(1, j_lo), s2.gather(1, j_lo)
    tot_n, tot_s1, tot_s2 = n[:, -1:], s1[:, -1:], s2[:, -1:]
    n_hi = tot_n - n.gather(1, j_hi)
    s1_hi = tot_s1 - s1.gather(1, j_hi)
    s2_hi = tot_s2 - s2.gather(1, j_hi)
    left = s2_lo - 2 * lo * s1_lo + lo**2 * n_lo
    right = s2_hi - 2 * hi * s1_hi + hi**2 * n_hi
    inside = (tot_n - n_lo - n_hi).clamp(min=0)
    return left.clamp(min=0) + right.clamp(min=0) + step**2 / 12.0 * inside


def mse_range(h: Histogram, spec: QuantSpec, grid: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip range minimising the expected squared error (quantization noise + clipping) over the
    histogram, the data taken at the bin centers.

    * integer, symmetric: every ``t = k w`` (k = 1..nb) is a candidate, ``s = t / qmax``, clip interval
      ``[qmin s, qmax s]``, noise ``s^2 / 12`` per value inside (uniform rounding error);
    * integer, affine: a ``(grid + 1) x grid`` grid of ``lo = min(x_min, 0) i / grid``,
      ``hi = max(x_max, 0) j / grid``, ``s = (hi - lo) / (qmax - qmin)``;
    * binary ``{-a, +a}``: the closed form ``a = sum n |c| / sum n`` (the mean magnitude, XNOR-Net's
      scale: ``sum n (a sign(c) - c)^2`` is a parabola in ``a``), exact and O(bins);
    * other formats (fp8, fp4, log2, ternary): ``grid`` candidates ``t = max|x| k / grid`` with the
      exact error ``sum n (format.round(c / s) s - c)^2``, ``s = t / format.max_value``.
    """
    fmt = spec.format
    nb = h.num_bins
    w = h.width
    counts = signed_counts(h)
    centers = (torch.arange(2 * nb, dtype=torch.float64)[None, :] - nb + 0.5) * w[:, None]
    if isinstance(fmt, BinaryFormat):
        best = (counts * centers.abs()).sum(1) / counts.sum(1).clamp(min=1e-300)
        return clamp_to_data(h, -best, best)
    if not fmt.is_integer:
        amax = torch.maximum(h.min_val.abs(), h.max_val.abs()).double()
        return _mse_generic(h, fmt, counts, centers, amax, grid)
    qmin, qmax = float(fmt.min_value), float(fmt.max_value)
    pre = _prefix(counts, centers)
    safe_w = torch.where(w > 0, w, torch.ones_like(w))
    if spec.symmetric:
        t = torch.arange(1, nb + 1, dtype=torch.float64)[None, :] * safe_w[:, None]  # (B, nb)
        s = t / qmax
        err = _interval_error(pre, safe_w, nb, qmin * s, qmax * s, s)
        best = t.gather(1, err.argmin(dim=1, keepdim=True)).squeeze(1)
        best = torch.where(w > 0, best, torch.zeros_like(best))
        return clamp_to_data(h, -best, best)
    lo_end = h.min_val.double().clamp(max=0)
    hi_end = h.max_val.double().clamp(min=0)
    i = torch.arange(grid + 1, dtype=torch.float64)
    j = torch.arange(1, grid + 1, dtype=torch.float64)
    lo = (lo_end[:, None, None] * i[None, :, None] / grid).expand(-1, grid + 1, grid)
    hi = (hi_end[:, None, None] * j[None, None, :] / grid).expand(-1, grid + 1, grid)
    n_blocks = lo.shape[0]
    lo2, hi2 = lo.reshape(n_blocks, -1), hi.reshape(n_blocks, -1)
    s = (hi2 - lo2) / (qmax - qmin)
    err = _interval_error(pre, safe_w, nb, lo2, hi2, s)
    k = err.argmin(dim=1, keepdim=True)
    best_lo, best_hi = lo2.gather(1, k).squeeze(1), hi2.gather(1, k).squeeze(1)
    return clamp_to_data(h, best_lo, best_hi)


def _mse_generic(h, fmt, counts, centers, amax, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact error at the bin centers for formats that round themselves; chunked over blocks."""
    k = torch.arange(1, grid + 1, dtype=torch.float64) / grid
    best = torch.empty_like(amax)
    chunk = max(1, (1 << 22) // (grid * counts.shape[1]))
    for b0 in range(0, counts.shape[0], chunk):
        c = centers[b0:b0 + chunk, None, :]  # (b, 1, M)
        t = amax[b0:b0 + chunk, None] * k[None, :]  # (b, K)
        s = (t / float(fmt.max_value)).clamp(min=1e-300)[:, :, None]
        err = (counts[b0:b0 + chunk, None, :] * (fmt.round(c / s) * s - c) ** 2).sum(-1)
        best[b0:b0 + chunk] = t.gather(1, err.argmin(dim=1, keepdim=True)).squeeze(1)
    return clamp_to_data(h, -best, best)
