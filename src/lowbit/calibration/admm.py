"""ADMM-style weight scale search (MNN's weight quantizer): alternate the codes and the scale.

Per block (channel), with ``Q(v)`` the format's rounding and saturation (``lowbit.ops.fake_quantize``
at scale 1, so int8 gives ``clamp(round(v), -128, 127)`` and binary gives ``sign(v)``)::

    a_0 = max|w| / (qmax * 1.25)
    q   = Q(w / a)                      # best codes for this scale
    a   = <w, q> / <q, q>               # least-squares scale for these codes

Each step can only lower ``||w - a q||^2``, so the error decreases monotonically. The search also runs
from the MinMax scale ``max|w| / qmax`` and keeps the better of the two per block, so ADMM is never
worse than MinMax on the tensor it saw. For a binary format one step gives the XNOR-Net scale
``mean|w|`` (Rastegari et al. 2016).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .base import Observer
from .histogram import blocks_2d

if TYPE_CHECKING:
    from ..spec import QuantSpec


def _codes(v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(v)``: the format's codes (as values) of already-scaled ``v``, per ``lowbit.ops`` semantics."""
    from ..granularity import PerTensor
    from ..ops import fake_quantize

    unit = spec.replace(granularity=PerTensor(), rounding="nearest", symmetric=True)
    one = torch.ones((), dtype=torch.float32)
    return fake_quantize(v, one, torch.zeros((), dtype=torch.int32), unit).to(v.dtype)


def admm_scale(w: torch.Tensor, spec: QuantSpec, max_iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Least-squares scale per row of ``w`` (B, n) float32; returns (B,) float32 scales ``a`` (at least
    float32 eps). ``spec`` gives the format; see the module docstring for the iteration."""
    from ..spec import SCALE_EPS

    qmax = float(spec.format.max_value)
    wd = w.double()
    amax = wd.abs().amax(dim=1)
    nonzero = amax > 0
    a_start = torch.cat([amax / (qmax * 1.25), amax / qmax]).clamp(min=SCALE_EPS)  # (2B,)
    ww = torch.cat([wd, wd])
    a = a_start
    for _ in range(max_iters):
        q = _codes(ww / a[:, None], spec)
        qq = (q * q).sum(1)
        a_new = torch.where(qq > 0, (ww * q).sum(1) / qq.clamp(min=1e-300), a).clamp(min=SCALE_EPS)
        change = ((a_new - a).abs() / a).amax()
        a = a_new
        if float(change) < tol:
            break
    err = ((ww - a[:, None] * _codes(ww / a[:, None], spec)) ** 2).sum(1)
    n_blocks = w.shape[0]
    best = torch.where(err[:n_blocks] <= err[n_blocks:], a[:n_blocks], a[n_blocks:])
    return torch.where(nonzero, best, torch.full_like(best, SCALE_EPS)).float()


class ADMMObserver(Observer):
    """Weight observer for ``spec.calibrator = ADMM()``: keeps the one weight tensor it is shown (seeing
    the same tensor again, as a weight quantizer does every forward, is a no-op) and returns
    ``(-a qmax, a qmax)`` per block, so :func:`lowbit.spec.compute_qparams` gives scale ``a``.
    Symmetric specs only."""

    def __init__(self, spec: QuantSpec, name: str = "tensor") -> None:
        super().__init__(spec, name)
        if not spec.symmetric:
            raise ConfigError(
                f"{name}: ADMM finds a symmetric scale (zero point 0); use symmetric=True, or MSE/percentile "
                "for an affine range."
            )
        self.weight: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        if self.weight is None:
            self.weight = x.clone()
        elif x.shape != self.weight.shape or not torch.equal(x, self.weight):
            raise ConfigError(
                f"{self.name}: the ADMM calibrator is for weights (one fixed tensor) but it was shown two "
                "different tensors; use MSE or Percentile for activations."
            )

    def _merge(self, other: ADMMObserver) -> None:
        self._update(other.weight)

    def _state_tensors(self) -> list[tuple[str, str]]:
        return [("weight", "same")]

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        cal = self.spec.calibrator
        a = admm_scale(blocks_2d(self.weight, self.spec.granularity), self.spec,
                       getattr(cal, "max_iters", 100), getattr(cal, "tol", 1e-6))
        shape = self.spec.granularity.scale_shape(tuple(self.weight.shape) or (1,))
        rows = blocks_2d(self.weight, self.spec.granularity).float()
        # Keep MinMax's bound wherever it quantizes better in the arithmetic that will really run
        # (float32, scale from compute_qparams): ADMM's choice is made in float64, and a scale that
        # ties there can lose by a rounding flip here, so "never worse than MinMax" is checked at the end.
        hi_admm = a * float(self.spec.format.max_value)
        hi_minmax = rows.abs().amax(dim=1)
        err = [self._row_error(rows, hi) for hi in (hi_admm, hi_minmax)]
        hi = torch.where(err[0] <= err[1], hi_admm, hi_minmax).reshape(shape)
        return -hi, hi

    def _row_error(self, rows: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Squared quantization error per row of ``rows`` (B, n) for the symmetric range ``+-hi`` (B,)."""
        from ..spec import compute_qparams

        scale, _ = compute_qparams(self.spec, -hi, hi)
        q = _codes(rows / scale[:, None], self.spec) * scale[:, None]
        return ((q - rows) ** 2).sum(1)
