"""Exponential moving average of per-batch minimum and maximum (QAT activation ranges).

``m_t = m_{t-1} + c (min(X_t) - m_{t-1})`` (= ``(1 - c) m_{t-1} + c min(X_t)``), the first batch taken as
is; the same for the maximum. Written in the increment form so float32 results match
``torch.ao.quantization.MovingAverageMinMaxObserver`` bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .base import MinMaxObserver

if TYPE_CHECKING:
    from ..spec import QuantSpec


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Moving-average min/max per block (shape ``granularity.scale_shape(x.shape)``), constant ``c``
    from ``spec.calibrator`` (``MovingAverageMinMax(c=0.01)``).

    ``merge`` and ``all_reduce`` average the ranks' moving averages weighted by their batch counts
    (a moving average has no exact merge: it depends on batch order).

    >>> from lowbit.spec import QuantSpec
    >>> from lowbit.calibration import MovingAverageMinMax
    >>> obs = MovingAverageMinMaxObserver(QuantSpec(calibrator=MovingAverageMinMax(c=0.5)))
    >>> obs.update(torch.tensor([0.0, 2.0])); obs.update(torch.tensor([-2.0, 4.0]))
    >>> [float(v) for v in obs.compute_range()]
    [-1.0, 3.0]
    """

    def __init__(self, spec: QuantSpec, name: str = "tensor") -> None:
        super().__init__(spec, name)
        self.c = float(getattr(spec.calibrator, "c", 0.01))
        if not 0.0 < self.c <= 1.0:
            raise ConfigError(f"MovingAverageMinMax: c must be in (0, 1], got {self.c}; 0.01 is the usual value.")

    def _combine(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        self.min_val = self.min_val + self.c * (mn - self.min_val)
        self.max_val = self.max_val + self.c * (mx - self.max_val)

    def _merge(self, other: MovingAverageMinMaxObserver) -> None:
        self._check_shape(tuple(other.min_val.shape), "the merged observer")
        n, m = self.num_batches, other.num_batches
        self.min_val = (self.min_val * n + other.min_val * m) / (n + m)
        self.max_val = (self.max_val * n + other.max_val * m) / (n + m)

    def _state_tensors(self) -> list[tuple[str, str]]:
        return [("min_val", "mean"), ("max_val", "mean")]
