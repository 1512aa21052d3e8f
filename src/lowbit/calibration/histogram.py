"""Streaming per-block histograms that grow without losing counts, and the observer built on them.

Layout: for each block ``b`` (one per scale, ``B = prod(scale_shape)``) two histograms of ``nb`` bins of
width ``w_b = 2**e_b``, anchored at 0: ``hist[b, 0, k]`` counts ``x >= 0`` with ``floor(x / w_b) = k``,
``hist[b, 1, k]`` counts ``x < 0`` with ``floor(-x / w_b) = k``. ``e_b`` is the smallest integer with
``max|x| < nb * 2**e_b``. When a batch exceeds the range the width doubles ``d`` times and bin ``k``
moves to bin ``k >> d``, which is exact because ``floor(floor(v / w) / 2**d) = floor(v / (2**d w))``.
So the histogram depends only on the data, not on the batch order or split: merging two observers or
all-reducing across ranks gives exactly the histogram of the concatenated data.

Memory: ``B * 2 * nb`` int64 counts plus per-block min/max, independent of the number of batches.

Device: the batch is binned where it lives (CPU or CUDA), and the counts and extremes, which are small,
are kept on the CPU. The counts are exact integers on every device, so the KL / percentile / MSE ranges
computed from them are bit-identical whether the model was calibrated on a CPU or a GPU.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, NonFiniteError, ShapeMismatchError, check_finite
from .base import Observer
from .estimators import mse_range, percentile_range
from .kl import kl_levels, kl_range

if TYPE_CHECKING:
    from ..spec import QuantSpec

EMPTY_EXPONENT = -(2**40)
"""Exponent of a block that has seen only zeros (its width is not yet known; every count is in bin 0)."""


log = logging.getLogger(__name__)


def blocks_2d(x: torch.Tensor, granularity) -> torch.Tensor:
    """``x`` as ``(B, n)``: one row per block of ``granularity`` (row order = scale tensor order)."""
    from ..granularity import to_blocks

    if x.dim() == 0:
        x = x.reshape(1)
    v = to_blocks(x, granularity)
    nd = x.dim()
    perm = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    n_blocks = 1
    for d in range(0, 2 * nd, 2):
        n_blocks *= v.shape[d]
    return v.permute(perm).reshape(n_blocks, -1)


def covering_exponent(amax: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Smallest integer ``e`` (int64) with ``amax < num_bins * 2**e``; :data:`EMPTY_EXPONENT` where amax is 0."""
    a = amax.double()
    _, k = torch.frexp(a / num_bins)
    e = k.long()
    # frexp of a rounded quotient can be one off: fix both ways against the exact product.
    e = torch.where(a >= num_bins * torch.ldexp(torch.ones_like(a), e), e + 1, e)
    e = torch.where(a < num_bins * torch.ldexp(torch.ones_like(a), e - 1), e - 1, e)
    return torch.where(a > 0, e, torch.full_like(e, EMPTY_EXPONENT))


CHUNK_ELEMENTS = 1 << 16
"""Elements binned at a time on the CPU: the chunk and its temporaries stay in cache, and no temporary
grows with the batch (peak memory of an update is independent of the batch size)."""

CHUNK_ELEMENTS_GPU = 1 << 22
"""Elements binned at a time on a GPU, where a kernel launch costs more than the cache misses of a
larger chunk (16 MiB of float32 temporaries)."""


def covering_exponent_scalar(amax: float, num_bins: int) -> int:
    """:func:`covering_exponent` of one value, in Python arithmetic (no tensor overhead per batch)."""
    if amax == 0:
        return EMPTY_EXPONENT
    _, k = math.frexp(amax)  # 2**(k - 1) <= amax < 2**k
    e = k - (num_bins.bit_length() - 1)  # num_bins * 2**e >= 2**k > amax
    while amax < math.ldexp(num_bins, e - 1):  # exact: num_bins * 2**e is a float64
        e -= 1
    return e


def count_bins(xb: torch.Tensor, exponent: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Counts of ``xb`` (B, n) on the signed grid of each block: (B, 2 nb) int64, where column ``nb + k``
    counts ``x >= 0`` with ``floor(x / w) = k`` and column ``nb - 1 - k`` counts ``x < 0`` with
    ``floor(-x / w) = k``, ``w = 2**exponent[b]`` (0 for an all-zero block: everything in ``nb``).

    Exact, with one multiply and one cast per element: ``s = x * 2**-e`` is exact (a power-of-two scale
    that cannot overflow, since ``|x| < nb w``; an underflow only touches ``|s| < 1``), the cast to int
    truncates toward zero, i.e. gives ``sign(x) floor(|x| / w)``, and the sign bit of ``s`` (``-1`` after
    an arithmetic shift) moves negatives one column down so ``(-w, 0)`` and ``[0, w)`` stay apart.
    ``x + 0.0`` (before the scaling) turns ``-0.0`` into ``+0.0``: a negative zero counts as ``x >= 0``, while a
    tiny negative ``x`` whose product underflows keeps its sign (``-0.0``) and counts as negative. Works in float32 while
    ``2**-e`` is a normal float32, else in float64. Caller guarantees ``|x| < nb * 2**exponent``.
    ``exponent`` may live on the CPU; the counts are computed and returned on ``xb``'s device.
    """
    n_blocks, n = xb.shape
    device = xb.device
    exponent = exponent.cpu()
    live = exponent != EMPTY_EXPONENT
    e_live = exponent[live]
    wide = bool(e_live.numel()) and not (-126 <= int(e_live.min()) and int(e_live.max()) <= 126)
    work, itype, sign_shift = (torch.float64, torch.int64, 63) if wide else (torch.float32, torch.int32, 31)
    inv = torch.where(live, torch.ldexp(torch.ones(n_blocks, dtype=torch.float64), (-exponent).clamp(-1100, 1100)),
                      torch.zeros(n_blocks, dtype=torch.float64))
    chunk = CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS_GPU
    cols = min(n, chunk)
    rows = max(1, chunk // cols)
    counts = torch.zeros(n_blocks * 2 * num_bins, dtype=torch.int64, device=device)
    if n_blocks == 1:
        scale, offset = float(inv[0]), num_bins
    else:
        scale = inv.to(device, work)[:, None]
        offset = (torch.arange(n_blocks, dtype=itype, device=device) * (2 * num_bins) + num_bins)[:, None]
    for r0 in range(0, n_blocks, rows):
        r1 = min(r0 + rows, n_blocks)
        sc = scale if n_blocks == 1 else scale[r0:r1]
        off = offset if n_blocks == 1 else offset[r0:r1] - r0 * 2 * num_bins
        out = counts[r0 * 2 * num_bins:r1 * 2 * num_bins]
        for c0 in range(0, n, cols):
            part = xb[r0:r1, c0:c0 + cols]
            s_buf, i_buf = _workspace(work, itype, part.numel(), device)
            s = s_buf.view(part.shape)
            torch.add(part, 0.0, out=s).mul_(sc)  # -0.0 -> +0.0 first; an underflow to -0.0 keeps its sign
            idx = i_buf.view(part.shape)
            idx.copy_(s)  # float -> int casts truncate toward zero
            idx += s.view(itype).bitwise_right_shift_(sign_shift)
            idx += off
            out += torch.bincount(idx.reshape(-1), minlength=out.numel())
    return counts.view(n_blocks, 2 * num_bins)


_SCRATCH = threading.local()


def _workspace(work: torch.dtype, itype: torch.dtype, numel: int,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-thread scratch buffers of ``numel`` elements, reused across calls. A fresh pair of temporaries
    per chunk would be allocated between the model's large activation buffers and, with glibc malloc,
    keep freed activation memory from being returned to the OS: RSS then creeps up with every batch."""
    device = torch.device("cpu") if device is None else device
    key = (work, itype, device)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    pair = bufs.get(key)
    if pair is None or pair[0].numel() < numel:
        pair = bufs[key] = (torch.empty(max(numel, CHUNK_ELEMENTS), dtype=work, device=device),
                            torch.empty(max(numel, CHUNK_ELEMENTS), dtype=itype, device=device))
    return pair[0][:numel], pair[1][:numel]


def _raise_non_finite(x: torch.Tensor, name: str) -> None:
    check_finite(x.float(), name)  # counts NaN / Inf for the message
    raise NonFiniteError(f"{name} contains NaN or Inf values; quantization ranges need finite data.")


def rescale_counts(hist: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move bin ``k`` of block ``b`` to bin ``k >> shift[b]`` (the width doubled ``shift[b]`` times).
    ``hist``: (B, S, nb) int64, ``shift``: (B,) int64 >= 0. Exact: counts are only added."""
    n_blocks, n_sides, nb = hist.shape
    if not bool((shift > 0).any()):
        return hist
    k = torch.arange(nb, device=hist.device)
    target = k[None, :] >> shift.clamp(max=62)[:, None]  # (B, nb)
    target = target[:, None, :].expand(n_blocks, n_sides, nb)
    return torch.zeros_like(hist).scatter_add_(2, target, hist)


class Histogram:
    """Mergeable per-block signed histogram; see the module docstring for the bin layout.

    Attributes:
        hist: (B, 2, nb) int64; ``[:, 0]`` non-negative values, ``[:, 1]`` negative values by |x|.
        exponent: (B,) int64, bin width ``2**exponent``.
        min_val, max_val: (B,) float32, exact extremes seen.
    """

    def __init__(self, num_blocks: int, num_bins: int) -> None:
        if num_bins < 2:
            raise ConfigError(f"a histogram needs at least 2 bins, got {num_bins}; 2048 is the default.")
        self.num_bins = num_bins
        self.hist = torch.zeros(num_blocks, 2, num_bins, dtype=torch.int64)
        self.exponent = torch.full((num_blocks,), EMPTY_EXPONENT, dtype=torch.int64)
        self.min_val = torch.full((num_blocks,), float("inf"))
        self.max_val = torch.full((num_blocks,), float("-inf"))

    @property
    def width(self) -> torch.Tensor:
        """(B,) float64 bin widths (0 for blocks that have seen only zeros)."""
        w = torch.ldexp(torch.ones(self.exponent.shape, dtype=torch.float64), self.exponent.clamp(min=-1100))
        return torch.where(self.exponent == EMPTY_EXPONENT, torch.zeros_like(w), w)

    def align_to(self, exponent: torch.Tensor) -> None:
        """Coarsen every block to ``exponent`` (>= the current one), keeping all counts."""
        shift = torch.where(self.exponent == EMPTY_EXPONENT, torch.full_like(exponent, 62), exponent - self.exponent)
        self.hist = rescale_counts(self.hist, torch.where(exponent == EMPTY_EXPONENT, 0, shift))
        self.exponent = exponent.clone()

    def add(self, xb: torch.Tensor, name: str = "tensor") -> None:
        """Count the rows of ``xb`` (B, n), float32 / float16 / bfloat16, into their blocks.

        One ``aminmax`` pass gives the extremes and the finite check together (NaN propagates through
        min/max, +-Inf shows as an extreme), then :func:`count_bins` bins the data chunk by chunk.
        Raises :class:`~lowbit.errors.NonFiniteError` (naming ``name``) before changing any state.
        ``xb`` may live on any device; the statistics stay on the CPU (module docstring).
        """
        n_blocks, nb = self.hist.shape[0], self.num_bins
        if n_blocks == 1:
            mn, mx = (t.cpu() for t in torch.aminmax(xb))
            lo, hi = float(mn), float(mx)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                _raise_non_finite(xb, name)
            e = covering_exponent_scalar(max(-lo, hi), nb)
            if e > int(self.exponent[0]):
                self.align_to(torch.tensor([e], dtype=torch.int64))
            self.min_val = torch.minimum(self.min_val, mn.float().reshape(1))
            self.max_val = torch.maximum(self.max_val, mx.float().reshape(1))
        else:
            mn, mx = torch.aminmax(xb, dim=1)
            mn, mx = mn.float().cpu(), mx.float().cpu()
            if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
                _raise_non_finite(xb, name)
            self.align_to(torch.maximum(self.exponent, covering_exponent(torch.maximum(-mn, mx), nb)))
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)
        counts = count_bins(xb, self.exponent, nb).cpu()
        self.hist[:, 0] += counts[:, nb:]
        self.hist[:, 1] += counts[:, :nb].flip(-1)

    def merge(self, other: Histogram) -> None:
        """Add another histogram of the same blocks and bin count (exactly)."""
        if other.hist.shape != self.hist.shape:
            raise ShapeMismatchError(
                f"cannot merge histograms of shape {tuple(other.hist.shape)} into {tuple(self.hist.shape)}; "
                "observers must watch the same tensor with the same number of bins."
            )
        e = torch.maximum(self.exponent, other.exponent)
        other_hist = other.hist.clone()
        self.align_to(e)
        shift = torch.where(other.exponent == EMPTY_EXPONENT, torch.full_like(e, 62), e - other.exponent)
        self.hist += rescale_counts(other_hist, torch.where(e == EMPTY_EXPONENT, 0, shift))
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)

    def clone(self) -> Histogram:
        h = Histogram.__new__(Histogram)
        h.num_bins = self.num_bins
        h.hist, h.exponent = self.hist.clone(), self.exponent.clone()
        h.min_val, h.max_val = self.min_val.clone(), self.max_val.clone()
        return h


class HistogramObserver(Observer):
    """Streaming histogram per block; the range comes from ``spec.calibrator`` (KL, Percentile or MSE)
    and :meth:`candidate_ranges` gives every estimator's range from the same statistics.

    >>> from lowbit.spec import QuantSpec
    >>> obs = HistogramObserver(QuantSpec("int8", calibrator="percentile:50"))
    >>> obs.update(torch.arange(-100.0, 101.0))
    >>> [round(float(v), 3) for v in obs.compute_range()]
    [-50.047, 50.047]
    """

    def __init__(self, spec: QuantSpec, name: str = "tensor") -> None:
        super().__init__(spec, name)
        self.num_bins = int(getattr(spec.calibrator, "num_bins", 2048))
        self.stats: Histogram | None = None
        self.scale_shape: tuple[int, ...] | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add one batch. Same contract as :meth:`Observer.update` (NonFiniteError on NaN/Inf), but the
        finite check comes from the histogram's own min/max pass instead of a separate pass, and
        float16/bfloat16 batches are widened chunk by chunk instead of copied whole."""
        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            x = x.float()
        self._update(x)
        self.num_batches += 1

    def _update(self, x: torch.Tensor) -> None:
        shape = tuple(self.spec.granularity.scale_shape(tuple(x.shape) or (1,)))
        if self.stats is None:
            n_blocks = 1
            for s in shape:
                n_blocks *= s
            stats = Histogram(n_blocks, self.num_bins)
            stats.add(blocks_2d(x, self.spec.granularity), f"{self.name} (batch 0)")
            self.stats, self.scale_shape = stats, shape  # only once the first batch is known to be valid
            return
        if shape != self.scale_shape:
            raise ShapeMismatchError(
                f"{self.name}: batch of shape {tuple(x.shape)} gives scales of shape {shape}, but earlier batches "
                f"gave {self.scale_shape}; per-channel observers need the same channel count every batch."
            )
        self.stats.add(blocks_2d(x, self.spec.granularity), f"{self.name} (batch {self.num_batches})")

    def _merge(self, other: HistogramObserver) -> None:
        self.stats.merge(other.stats)

    def _copy_from(self, other: Observer) -> None:
        self.stats = other.stats.clone()
        self.scale_shape = other.scale_shape
        self.num_bins = other.num_bins

    def _state_tensors(self) -> list[tuple[str, str]]:
        # the exponent goes first: every rank coarsens to the common width before counts are summed
        return [("exponent", "max"), ("hist", "sum"), ("min_val", "min"), ("max_val", "max")]

    def _get_state(self, attr: str) -> torch.Tensor:
        return getattr(self.stats, attr)

    def _set_state(self, attr: str, value: torch.Tensor) -> None:
        if attr == "exponent":
            self.stats.align_to(value)
        else:
            setattr(self.stats, attr, value)

    def _empty_state(self, meta: dict) -> None:
        self.stats = Histogram(meta["num_blocks"], meta["num_bins"])
        self.scale_shape = meta["scale_shape"]

    def _meta(self) -> dict:
        return {"num_blocks": self.stats.hist.shape[0], "num_bins": self.num_bins, "scale_shape": self.scale_shape}

    def kl_levels_and_bins(self) -> tuple[int, int]:
        """``(L, nb)``: the bins per sign TensorRT's KL search needs here (one per level of the |x| side, at
        least ``start_bin``; :func:`~lowbit.calibration.kl.kl_levels`) and the bins per sign this histogram has.
        KL is possible when ``L <= nb`` (int16 needs 32768, the default histogram has 2048)."""
        signs = {bool(v) for v in (self.stats.min_val >= 0).reshape(-1).tolist()}  # per block, as kl_range
        start = int(getattr(self.spec.calibrator, "start_bin", 128))
        return max(start, *(kl_levels(self.spec, nonneg) for nonneg in signs)), self.stats.num_bins

    def candidate_ranges(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"minmax", "percentile", "kl", "mse"}`` -> ``(min_val, max_val)`` in the scale shape, all from
        the same histogram (percentile at ``spec.calibrator.percentile`` if set, else 99.99). ``"kl"`` is
        left out where the histogram has too few bins for it (:meth:`kl_levels_and_bins`)."""
        if self.num_batches == 0:
            self.compute_range()  # raises EmptyCalibrationError, naming the tensor
        pct = float(getattr(self.spec.calibrator, "percentile", 99.99))
        start = int(getattr(self.spec.calibrator, "start_bin", 128))
        s = self.stats
        levels, bins = self.kl_levels_and_bins()
        out = {
            "minmax": (s.min_val.clone(), s.max_val.clone()),
            "percentile": percentile_range(s, pct, self.spec.symmetric),
            **({"kl": kl_range(s, self.spec, start_bin=start)} if levels <= bins else {}),
            "mse": mse_range(s, self.spec),
        }
        return {k: (lo.reshape(self.scale_shape), hi.reshape(self.scale_shape)) for k, (lo, hi) in out.items()}

    def clipped_fraction(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(B,) fraction of the observed values that lie outside ``[lo, hi]``, from the histogram
        (a value counts as clipped when its whole bin lies beyond the bound)."""
        s = self.stats
        w = s.width.to(torch.float64)[:, None]
        start = torch.arange(s.num_bins, dtype=torch.float64)[None, :] * w  # lower edge of |x| bins
        lo = lo.reshape(-1).to(torch.float64)[:, None]
        hi = hi.reshape(-1).to(torch.float64)[:, None]
        pos = (s.hist[:, 0] * (start > hi)).sum(-1)
        neg = (s.hist[:, 1] * (start > -lo)).sum(-1)
        total = s.hist.sum(dim=(1, 2)).clamp(min=1)
        return (pos + neg).to(torch.float64) / total

    def _warn_if_clipping(self, lo: torch.Tensor, hi: torch.Tensor, method: str, limit: float = 0.01) -> None:
        frac = float(self.clipped_fraction(lo, hi).max())
        if frac > limit:
            log.warning(
                "%s: %s clips %.1f%% of the observed values (range [%.4g, %.4g], observed [%.4g, %.4g]); "
                "if accuracy drops, use calibrator='percentile' or 'mse' for this tensor.",
                self.name, method, 100 * frac, float(lo.min()), float(hi.max()),
                float(self.stats.min_val.min()), float(self.stats.max_val.max()),
            )

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        from .config import KL, MSE, Percentile

        cal, s = self.spec.calibrator, self.stats
        if isinstance(cal, KL):
            lo, hi = kl_range(s, self.spec, start_bin=cal.start_bin)
            self._warn_if_clipping(lo, hi, "KL")
        elif isinstance(cal, Percentile):
            lo, hi = percentile_range(s, cal.percentile, self.spec.symmetric)
        elif isinstance(cal, MSE):
            lo, hi = mse_range(s, self.spec)
        else:
            lo, hi = s.min_val.clone(), s.max_val.clone()
        return lo.reshape(self.scale_shape), hi.reshape(self.scale_shape)
