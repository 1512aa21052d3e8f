"""How one tensor is quantized (:class:`QuantSpec`) and its parameters from a range (:func:`compute_qparams`).

Formulas (integer formats, ``qmin``/``qmax`` the format's code range):

* affine:    ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``, ``scale = (hi - lo) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - round(lo / scale), qmin, qmax)`` (so 0.0 is exactly representable);
* symmetric: ``scale = max(|x_min|, |x_max|) / qmax``, ``zero_point = 0`` (int8: max|x| -> 127);
* non-integer formats (fp8, fp4, log2, binary, ternary): symmetric only,
  ``scale = max|x| / format.max_value``; fp16/bf16 casts use ``scaled=False`` (scale 1).

The scale never drops below ``torch.finfo(torch.float32).eps`` (a constant or all-zero tensor gets a
valid, finite scale instead of a division by zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration.config import Calibrator, MinMax, as_calibrator
from .errors import ConfigError, check_finite
from .formats.base import ROUNDINGS, NumberFormat, Rounding
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken, parse_granularity

__all__ = [
    "QuantSpec",
    "compute_qparams",
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerToken",
    "SCALE_EPS",
]

SCALE_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class QuantSpec:
    """Everything about how one tensor is quantized.

    Args:
        format: a :class:`~lowbit.formats.NumberFormat` or its name (``"int8"``, ``"uint8"``,
            ``"int4"``, ``"fp8_e4m3"``, ``"fp16"``, ``"binary"``...).
        symmetric: True: zero point 0 and a range symmetric around 0; False: affine (integers only).
        granularity: the block one scale covers (:class:`PerTensor`, :class:`PerChannel`,
            :class:`PerGroup`, :class:`PerToken`), or a string (``"channel"``, ``"group:128"``).
        rounding: ``"nearest"`` (half to even) or ``"stochastic"``.
        calibrator: how the range is chosen (``MinMax()``, ``KL()``, ``"percentile"``, ``"mse"``...).
        dynamic: the range is measured on every batch at run time instead of calibrated once.
        scaled: False for plain casts (fp16/bf16): scale 1, no calibration needed.

    >>> s = QuantSpec("int8", symmetric=True, granularity="channel")
    >>> s.format.name, str(s.granularity)
    ('int8', 'per-channel(axis=0)')
    """

    format: NumberFormat | str = "int8"
    symmetric: bool = True
    granularity: Granularity | str = field(default_factory=PerTensor)
    rounding: Rounding = "nearest"
    calibrator: Calibrator | str = field(default_factory=MinMax)
    dynamic: bool = False
    scaled: bool = True

    def __post_init__(self) -> None:
        from .formats import parse as parse_format

        object.__setattr__(self, "format", parse_format(self.format))  # a name, or a format (kept as is)
        if isinstance(self.granularity, str):
            object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        object.__setattr__(self, "calibrator", as_calibrator(self.calibrator))
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {self.rounding!r}; use one of {ROUNDINGS}.")
        if self.symmetric and self.scaled and not float(self.format.max_value) > 0:
            raise ConfigError(
                f"format {self.format.name} has no positive value, so a symmetric scale (max|x| / "
                f"{self.format.max_value}) is undefined; use symmetric=False, an unsigned format or 'binary'."
            )
        if not self.format.is_integer and not self.symmetric:
            raise ConfigError(
                f"format {self.format.name} has no zero point, so it cannot be affine; use symmetric=True "
                "(or an integer format such as uint8 for asymmetric activations)."
            )

    @property
    def qmin(self) -> float:
        return self.format.min_value

    @property
    def qmax(self) -> float:
        return self.format.max_value

    def replace(self, **changes) -> QuantSpec:
        """A copy with some fields changed (``spec.replace(format="int4")``)."""
        import dataclasses

        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        kind = "sym" if self.symmetric else "affine"
        dyn = " dynamic" if self.dynamic else ""
        return f"{self.format.name} {kind} {self.granularity} {self.calibrator.name}{dyn}"


def compute_qparams(spec: QuantSpec, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) from a range, elementwise over any shape.

    Args:
        spec: the quantization spec (format, symmetric).
        min_val, max_val: range per block, same shape (``spec.granularity.scale_shape(x.shape)``).

    Returns:
        ``(scale, zero_point)`` with the shape of ``min_val``; see the module docstring for the formulas.

    Raises:
        NonFiniteError: NaN or ``±inf`` in the range (it would give a NaN or infinite scale).

    >>> s, z = compute_qparams(QuantSpec("uint8", symmetric=False), torch.tensor(-1.0), torch.tensor(3.0))
    >>> round(float(s), 6), int(z)
    (0.015686, 64)
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if min_val.shape != max_val.shape:
        raise ConfigError(f"min and max must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}.")
    fmt = spec.format
    zero = torch.zeros_like(min_val, dtype=torch.int32)
    if not spec.scaled:
        return torch.ones_like(min_val), zero
    check_finite(torch.stack([min_val, max_val]), "compute_qparams: the range (min_val, max_val)")  # one sync
    if spec.symmetric or not fmt.is_integer:
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = torch.clamp(amax / float(fmt.max_value), min=SCALE_EPS)
        return scale, zero
    qmin, qmax = float(fmt.min_value), float(fmt.max_value)
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=SCALE_EPS)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp
