"""Range-estimation methods ("calibrators") as frozen dataclasses.

A :class:`~lowbit.spec.QuantSpec` names one of these; :func:`lowbit.calibration.make_observer` turns it
into a streaming observer. Strings are accepted wherever a calibrator is (``"kl"``, ``"percentile"``...).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class MinMax:
    """Running minimum and maximum of everything seen."""

    name = "minmax"


@dataclass(frozen=True)
class MovingAverageMinMax:
    """Exponential moving average of per-batch min/max: ``m = (1 - c) m + c min(X)``; first batch as is."""

    c: float = 0.01
    name = "moving_average"


@dataclass(frozen=True)
class KL:
    """TensorRT entropy calibration: the clipping threshold whose 2^(b-1)-level quantized histogram is
    closest (KL divergence) to the reference histogram. ``unsigned`` variant for non-negative tensors."""

    num_bins: int = 2048
    start_bin: int = 128
    name = "kl"


@dataclass(frozen=True)
class Percentile:
    """Clip at the given percentile of |x| (symmetric) or of each tail (affine)."""

    percentile: float = 99.99
    num_bins: int = 2048
    name = "percentile"

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:  # also rejects NaN
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}; 99.99 is the usual value.")


@dataclass(frozen=True)
class MSE:
    """The clipping range that minimises expected quantization + clipping squared error."""

    num_bins: int = 2048
    name = "mse"


@dataclass(frozen=True)
class ADMM:
    """Weights only: alternate ``q = clip(round(w / a))`` and least-squares ``a = <w, q> / <q, q>``
    (MNN's method), from ``a = max|w| / (qmax * 1.25)``, until the relative change is below ``tol``."""

    max_iters: int = 100
    tol: float = 1e-6
    name = "admm"


Calibrator = MinMax | MovingAverageMinMax | KL | Percentile | MSE | ADMM

_BY_NAME: dict[str, type] = {
    "minmax": MinMax,
    "moving_average": MovingAverageMinMax,
    "movingaverage": MovingAverageMinMax,
    "ema": MovingAverageMinMax,
    "kl": KL,
    "entropy": KL,
    "percentile": Percentile,
    "mse": MSE,
    "admm": ADMM,
}


def as_calibrator(c: Calibrator | str) -> Calibrator:
    """Accept a calibrator object or its name (``"kl"``, ``"percentile"``, ``"percentile:99.9"``...)."""
    if not isinstance(c, str):
        return c
    name, _, arg = c.strip().lower().partition(":")
    cls = _BY_NAME.get(name)
    if cls is None:
        raise ConfigError(f"unknown calibrator {c!r}; choose one of {sorted(set(_BY_NAME) - {'ema', 'movingaverage', 'entropy'})}.")
    if arg:
        if cls not in (Percentile, MovingAverageMinMax):
            raise ConfigError(f"calibrator {name!r} takes no argument (got {arg!r}).")
        try:
            value = float(arg)
        except ValueError:
            raise ConfigError(f"calibrator {c!r}: {arg!r} is not a number; write e.g. 'percentile:99.9' or "
                              "'moving_average:0.01'.") from None
        return Percentile(percentile=value) if cls is Percentile else MovingAverageMinMax(c=value)
    return cls()
