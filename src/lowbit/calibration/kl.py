"""KL-divergence ("entropy") calibration, the TensorRT algorithm (Migacz, "8-bit Inference with
TensorRT", GTC 2017), with every candidate threshold evaluated in one batched computation.

For a histogram ``h`` of |x| with ``nb`` bins of width ``w`` and each candidate ``i`` in
``[max(start_bin, L), nb]``:

* ``P`` = ``h[:i]`` with the outliers ``sum(h[i:])`` added to bin ``i - 1`` (clipped into the last bin);
* ``Q``: ``h[:i]`` merged into ``L`` groups of ``m = i // L`` bins (the last group takes the remainder),
  each group's count spread evenly over the bins where ``P`` is non-zero, zero elsewhere;
* both smoothed as MXNet / ONNX Runtime do (zeros become ``eps = 1e-4``, the non-zeros give up the same
  mass), so clipping an isolated outlier costs a finite divergence instead of an infinite one;
* ``KL(P / sum P || Q / sum Q)``.

The smallest divergence wins (the first on ties) and the threshold is the candidate's upper edge
``i * w`` (the slides write ``(i + 0.5) w``; the edge is where the clipped mass sits). ``L = 2^(b-1)``
levels (128 for int8) for signed tensors; for non-negative tensors quantized to an unsigned grid
(uint8, or an affine int8 range) ``L = 2^b`` (256).

Vectorization, O(candidates x L) memory and time: group masses and non-zero counts come from prefix
sums; smoothing takes ``a = eps n_zero / n_nonzero`` from every non-zero bin of P, and the one sum that
does not split into prefix sums, ``sum (p - a) log(p - a)``, is the convergent series
``p log p - a (log p + 1) + sum_{n>=2} a^n / (n (n-1) p^(n-1))`` (``a`` <= 0.5 ``min p``, true for integer
counts and up to ~5000 bins), i.e. prefix sums of ``p^-n``. Otherwise the per-bin terms are evaluated
directly as (blocks, candidates, bins) slabs of a few MB; no path loops one candidate at a time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .estimators import clamp_to_data

if TYPE_CHECKING:
    from ..spec import QuantSpec
    from .histogram import Histogram


def _smooth(d: torch.Tensor, inside: torch.Tensor, length: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """MXNet's ``smooth_distribution`` over the first ``length`` bins of each row: zeros become ``eps``,
    non-zeros lose ``eps * n_zeros / n_nonzeros`` (the total is unchanged). ``d``: (B, K, nb)."""
    nz = d > 0
    n_nz = nz.sum(-1, keepdim=True).double()
    n_zero = length[None, :, None].double() - n_nz
    eps1 = eps * n_zero / n_nz.clamp(min=1)
    out = torch.where(nz, d - eps1, torch.full_like(d, eps))
    return torch.where(inside, out.clamp(min=1e-300), 0.0)


# _dense_kl is the direct per-bin evaluation; kl_divergences uses it when the series does not apply.


def kl_levels(spec: QuantSpec, nonnegative: bool) -> int:
    """Quantized levels on the |x| side: ``qmax + 1`` (128 for int8); ``qmax - qmin + 1`` (256) when the
    tensor is non-negative and the grid can spend every code on it (unsigned format or affine)."""
    fmt = spec.format
    if not fmt.is_integer:
        return 2 ** (fmt.bits - 1)
    qmin, qmax = int(fmt.min_value), int(fmt.max_value)
    if nonnegative and (qmin >= 0 or not spec.symmetric):
        return qmax - qmin + 1
    return qmax + 1


SMOOTH_EPS = 1e-4
SERIES_TERMS = 48
SLAB_ELEMENTS = 1 << 19
"""Elements per (blocks, candidates, bins) temporary: 4 MB in float64."""


def _dense_kl(h, i, m, qbar, outliers, levels) -> torch.Tensor:
    """KL of candidates ``i`` (K,) for every block: per-bin P and expanded Q as (B, K, nb) tensors."""
    n_blocks, nb = h.shape
    j = torch.arange(nb, dtype=torch.int64)
    inside = j[None, :] < i[:, None]  # (K, nb)
    group = torch.where(inside, torch.minimum(j[None, :] // m[:, None], torch.tensor(levels - 1)), levels)
    p = torch.where(inside, h[:, None, :], 0.0)
    p = p + (j[None, :] == (i - 1)[:, None]) * outliers[:, :, None]
    qx = torch.where(p > 0, qbar.gather(2, group[None].expand(n_blocks, -1, -1)), 0.0)
    p_s = _smooth(p, inside, i)
    q_s = _smooth(qx, inside, i)
    p_n = p_s / p_s.sum(-1, keepdim=True)
    q_n = q_s / q_s.sum(-1, keepdim=True).clamp(min=1e-300)
    terms = torch.where(inside & (p_n > 0), p_n * torch.log(p_n.clamp(min=1e-300) / q_n.clamp(min=1e-300)), 0.0)
    kl = terms.sum(-1)
    return torch.where((qx > 0).any(-1), kl, torch.full_like(kl, float("inf")))


def kl_divergences(hist: torch.Tensor, levels: int, start_bin: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """KL divergence of every candidate, vectorized over blocks and candidates.

    Args:
        hist: (B, nb) histogram of |x| (any real dtype, computed in float64).
        levels: ``L``, the number of quantized levels.
        start_bin: first candidate (raised to ``levels`` so every level covers at least one bin).

    Returns:
        ``(candidates, kl)``: candidates (K,) int64 bin counts ``i``; kl (B, K) float64.
    """
    h = hist.double()
    n_blocks, nb = h.shape
    start = max(start_bin, levels)
    if start > nb:
        raise ConfigError(
            f"KL calibration needs at least {start} histogram bins for {levels} levels (got num_bins={nb}): "
            f"pass KL(num_bins={start}) or more, or use it for formats of fewer levels (TensorRT's 2048 bins "
            "serve 8-bit ones); for 16-bit activations min/max or percentile ranges are the usual choice."
        )
    i = torch.arange(start, nb + 1, dtype=torch.int64)  # (K,)
    zero = torch.zeros(n_blocks, 1, dtype=torch.float64)
    cum = torch.cat([zero, h.cumsum(1)], 1)  # (B, nb + 1)
    nz = torch.cat([zero, (h > 0).double().cumsum(1)], 1)
    total = cum[:, -1:]  # N, (B, 1)

    g = torch.arange(levels, dtype=torch.int64)
    m = i // levels
    starts = g[None, :] * m[:, None]  # (K, L)
    ends = torch.where(g[None, :] == levels - 1, i[:, None], starts + m[:, None])

    def at(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # t (B, nb+1), idx (K, L) -> (B, K, L)
        # gather, not t[:, idx]: advanced indexing is ~50x slower here and this is the hot spot
        return t.gather(1, idx.reshape(1, -1).expand(n_blocks, -1)).reshape(n_blocks, *idx.shape)

    q = at(cum, ends) - at(cum, starts)  # group masses of h[:i]
    z = at(nz, ends) - at(nz, starts)  # non-zero bins of h[:i] per group
    kept = cum[:, i]  # (B, K) = sum h[:i]
    outliers = total - kept
    last = h[:, i - 1]  # (B, K)
    p_last = last + outliers
    # the outliers can make P's last bin non-zero where h's is zero
    z[:, :, -1] += ((last == 0) & (outliers > 0)).double()

    eps = SMOOTH_EPS
    nnz_p = nz[:, i - 1] + (p_last > 0).double()
    a = eps * (i.double() - nnz_p) / nnz_p.clamp(min=1)  # mass each non-zero bin of P gives up
    h_min = h[h > 0].min() if bool((h > 0).any()) else torch.tensor(1.0, dtype=torch.float64)
    if float(a.max()) > 0.5 * float(h_min):  # p_last >= h_min too: it is a sum of bins
        # series below would converge slowly: evaluate the per-bin terms directly
        qbar = torch.cat([q / z.clamp(min=1), torch.zeros(n_blocks, len(i), 1, dtype=torch.float64)], -1)
        slab = max(1, SLAB_ELEMENTS // (n_blocks * nb))
        kl = torch.cat([_dense_kl(h, i[k:k + slab], m[k:k + slab], qbar[:, k:k + slab], outliers[:, k:k + slab],
                                  levels) for k in range(0, len(i), slab)], dim=1)
        return i, kl
    qb = q / z.clamp(min=1)  # Q's value on the non-zero bins of each group
    nnz_q = (z * (q > 0)).sum(-1)
    b = eps * (i.double() - nnz_q) / nnz_q.clamp(min=1)
    log_q = torch.where(q > 0, torch.log((qb - b[:, :, None]).clamp(min=1e-300)), math.log(eps))
    pg = q.clone()
    pg[:, :, -1] += outliers
    cross = ((pg - a[:, :, None] * z) * log_q).sum(-1)
    # S(a) = sum over non-zero bins of (p - a) log(p - a), with (h - a) log(h - a) =
    # h log h - a (log h + 1) + sum_{n>=2} a^n / (n (n - 1) h^(n-1)) for the bins before the last
    hp = h.clamp(min=1e-300)
    pos = h > 0
    before = (i - 1)[None, :].expand(n_blocks, -1)

    def prefix(v: torch.Tensor) -> torch.Tensor:  # sum of v over the non-zero bins before bin i - 1, (B, K)
        return torch.cat([zero, torch.where(pos, v, 0.0).cumsum(1)], 1).gather(1, before)
    s_bins = prefix(h * torch.log(hp)) - a * (prefix(torch.log(hp)) + nz[:, i - 1])
    inv = 1.0 / hp
    inv_pow = torch.ones_like(hp)
    a_pow = a.clone()
    ratio = float(a.max()) / float(h_min)
    terms = SERIES_TERMS if ratio > 0 else 0
    if 0 < ratio < 1:  # stop once (a / min p)^n is below float64 resolution
        terms = min(SERIES_TERMS, max(1, math.ceil(math.log(1e-17) / math.log(ratio))))
    for n in range(2, terms + 2):
        inv_pow = inv_pow * inv
        a_pow = a_pow * a
        s_bins = s_bins + a_pow / (n * (n - 1)) * prefix(inv_pow)
    pl = (p_last - a).clamp(min=1e-300)
    s_all = s_bins + torch.where(p_last > 0, pl * torch.log(pl), 0.0)
    kl = (s_all - cross) / total + torch.log(kept.clamp(min=1e-300) / total)
    kl = torch.where(nnz_q > 0, kl, torch.full_like(kl, float("inf")))
    return i, kl


def kl_threshold(hist: torch.Tensor, width: torch.Tensor, levels: int, start_bin: int = 128) -> torch.Tensor:
    """TensorRT threshold ``i* w`` per block, ``i*`` the first candidate of smallest KL. ``hist``: (B, nb)
    histogram of |x|, ``width``: (B,). Returns (B,) float64; blocks with no valid candidate (all mass in
    one bin) get ``nb * w``, the full range."""
    nb = hist.shape[1]
    chunk = 16  # blocks at a time: bounds the (B, K, L) group tables
    best = torch.empty(hist.shape[0], dtype=torch.int64)
    for b0 in range(0, hist.shape[0], chunk):
        cand, kl = kl_divergences(hist[b0:b0 + chunk], levels, start_bin)
        k = kl.argmin(dim=1)
        finite = torch.isfinite(kl.gather(1, k[:, None])).squeeze(1)
        best[b0:b0 + chunk] = torch.where(finite, cand[k], torch.full_like(k, nb))
    return best.double() * width


def kl_range(h: Histogram, spec: QuantSpec, start_bin: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-t, t)`` clamped into ``[x_min, x_max]``, ``t`` the KL threshold of |x| per block."""
    nonneg = h.min_val >= 0
    absh = (h.hist[:, 0] + h.hist[:, 1])
    # Bin 0 ([0, w)) of a non-negative tensor is dominated by the exact zeros of a ReLU (often 30-60 % of
    # the values, the rest of the bin is below one bin width). Zero
    # is exactly representable at any threshold, but TensorRT's expansion of Q spreads that spike over
    # every non-empty bin of the first level, a penalty that grows with the threshold and drives KL to
    # clip (EfficientNet-Lite0: thresholds of 2.0 on ReLU6 outputs, W8A8 top-1 0 %). Leave it out.
    absh = torch.where(nonneg[:, None] & (torch.arange(absh.shape[1]) == 0)[None, :], torch.zeros_like(absh), absh)
    t = torch.empty(absh.shape[0], dtype=torch.float64)
    for flag in (True, False):
        sel = nonneg == flag
        if bool(sel.any()):
            t[sel] = kl_threshold(absh[sel], h.width[sel], kl_levels(spec, flag), start_bin)
    return clamp_to_data(h, -t, t)
