"""Range calibration: streaming observers (statistics) and the calibrators that turn them into ranges."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MinMaxObserver, Observer
from .config import ADMM, KL, MSE, Calibrator, MinMax, MovingAverageMinMax, Percentile, as_calibrator

if TYPE_CHECKING:
    from ..spec import QuantSpec

__all__ = [
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "ADMMObserver",
    "make_observer", "Calibrator", "as_calibrator",
    "MinMax", "MovingAverageMinMax", "KL", "Percentile", "MSE", "ADMM",
]

# calibrator class -> observer class; other modules of this package register theirs on import.
OBSERVERS: dict[type, type[Observer]] = {MinMax: MinMaxObserver}

from .admm import ADMMObserver  # noqa: E402
from .histogram import HistogramObserver  # noqa: E402
from .moving_average import MovingAverageMinMaxObserver  # noqa: E402

OBSERVERS.update({
    MovingAverageMinMax: MovingAverageMinMaxObserver,
    KL: HistogramObserver,
    Percentile: HistogramObserver,
    MSE: HistogramObserver,
    ADMM: ADMMObserver,
})


def make_observer(spec: QuantSpec, name: str = "tensor") -> Observer:
    """The streaming observer for ``spec.calibrator`` (MinMax -> MinMaxObserver, KL -> histogram ...)."""
    cls = OBSERVERS.get(type(spec.calibrator))
    if cls is None:
        from ..errors import ConfigError

        raise ConfigError(f"no observer implements calibrator {spec.calibrator!r}")
    return cls(spec, name)
