"""Take one number apart in a format: stored code, its fields, and the rounding error (``lowbit explain``).

For minifloats the fields follow IEEE754: sign bit, exponent field (``biased_exponent``), mantissa field;
``exponent`` is the unbiased exponent (``biased - bias`` for normals, ``1 - bias`` for subnormals, which
carry a leading 0 instead of 1). For integer, binary, ternary and log2 formats there is no mantissa;
log2's exponent field is its code ``j`` and ``exponent`` the power ``k`` of ``2^k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import NumberFormat
from .binary import BinaryFormat, TernaryFormat
from .integer import IntFormat
from .log2 import Log2Format
from .minifloat import MinifloatFormat

__all__ = ["Decomposition", "decompose"]


@dataclass(frozen=True)
class Decomposition:
    """One value in one format.

    Attributes:
        format: the format's name.
        value: the input (a Python float, i.e. float64).
        scale, zero_point: what the value was divided by / shifted by before rounding (1 and 0 for casts).
        code: the storage code: the unsigned bit pattern for minifloats and log2, the integer for integer
            formats, 0/1 for binary, -1/0/1 for ternary.
        bits: the code as a bit string, ``format.bits`` wide (two's complement for signed integers).
        sign: 1 for negative (including -0.0), else 0.
        exponent_bits, mantissa_bits: the fields as bit strings ('' where the format has none).
        biased_exponent: the exponent field as an integer (None where there is none).
        exponent: the unbiased exponent (None for zero, inf, NaN and formats without one).
        kind: ``"normal"``, ``"subnormal"``, ``"zero"``, ``"inf"`` or ``"nan"`` (non-float formats use
            ``"normal"`` for any non-zero value).
        stored: the exact value the code stands for, ``(dequantize(code) - zero_point) * scale``.
        error: ``stored - value``.
        saturated: the value lay outside the format's finite range: clipped to ``±max``, or (minifloat
            casts) turned into inf / NaN.
    """

    format: str
    value: float
    scale: float
    zero_point: int
    code: int
    bits: str
    sign: int
    exponent_bits: str
    mantissa_bits: str
    biased_exponent: int | None
    exponent: int | None
    kind: str
    stored: float
    error: float
    saturated: bool

    @property
    def relative_error(self) -> float:
        """``|error| / |value|`` (inf for a non-zero error on 0, NaN when either is not finite)."""
        if not (math.isfinite(self.error) and math.isfinite(self.value)):
            return math.nan
        if self.value == 0:
            return 0.0 if self.error == 0 else math.inf
        return abs(self.error) / abs(self.value)

    def __str__(self) -> str:
        fields = f"sign {self.sign}"
        if self.exponent_bits:
            fields += f" | exponent {self.exponent_bits} (field {self.biased_exponent}"
            fields += f", 2^{self.exponent})" if self.exponent is not None else ")"
        if self.mantissa_bits:
            fields += f" | mantissa {self.mantissa_bits}"
        lines = [
            f"{self.value!r} in {self.format}" + (f" (scale {self.scale!r}, zero point {self.zero_point})"
                                                  if self.scale != 1.0 or self.zero_point else ""),
            f"  code    {self.bits} = {self.code} ({self.kind}{', saturated' if self.saturated else ''})",
            f"  fields  {fields}",
            f"  stored  {self.stored!r}",
            f"  error   {self.error!r} (relative {self.relative_error:.3g})",
        ]
        return "\n".join(lines)


def _bitstr(code: int, width: int) -> str:
    return format(code & ((1 << width) - 1), f"0{width}b") if width else ""


def decompose(
    value: float,
    format: NumberFormat | str,
    scale: float = 1.0,
    zero_point: int = 0,
    saturate: bool | None = None,
) -> Decomposition:
    """Round ``value / scale`` into ``format`` and take the result apart.

    Args:
        value: the real number.
        format: a format or its name (``"fp16"``, ``"int8"``, ``"log2_4"``).
        scale: divide by this first (quantizer scale); must be positive and finite.
        zero_point: integer formats only: ``code = clamp(round(value / scale) + zero_point, qmin, qmax)``.
        saturate: minifloats only. False (the default): convert as the dtype cast does (overflow to inf for
            IEEE formats, NaN for fp8 E4M3); True: clip to ``±max`` as a quantizer does. Other formats
            always saturate.

    >>> d = decompose(0.1, "fp16")
    >>> d.bits, d.exponent, d.stored
    ('0010111001100110', -4, 0.0999755859375)
    """
    from . import parse

    fmt = parse(format)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"decompose: scale must be a positive finite number, got {scale!r}.")
    if zero_point and not fmt.is_integer:
        raise ConfigError(f"decompose: {fmt.name} takes no zero point; leave zero_point=0.")
    if saturate is not None and not isinstance(fmt, MinifloatFormat):
        raise ConfigError("decompose: saturate= applies to minifloat formats only; other formats always clip.")
    value = float(value)
    v = torch.tensor([value / scale], dtype=torch.float64)
    common = {"format": fmt.name, "value": value, "scale": float(scale), "zero_point": int(zero_point)}
    if isinstance(fmt, MinifloatFormat):
        return _minifloat(fmt, v, bool(saturate), common)
    if isinstance(fmt, IntFormat):
        return _integer(fmt, v, int(zero_point), common)
    if isinstance(fmt, (Log2Format, BinaryFormat, TernaryFormat)):
        return _other(fmt, v, common)
    raise ConfigError(f"decompose does not know the layout of {fmt.name} ({type(fmt).__name__}).")


def _finish(common: dict, stored_unscaled: float, **fields) -> Decomposition:
    stored = stored_unscaled * common["scale"]
    return Decomposition(**common, stored=stored, error=stored - common["value"], **fields)


def _minifloat(fmt: MinifloatFormat, v: torch.Tensor, saturate: bool, common: dict) -> Decomposition:
    q = fmt.round(v) if saturate else fmt.cast(v)
    stored = float(q[0])
    code = int(fmt.encode(q)[0])
    e, m = fmt.exp_bits, fmt.man_bits
    field = (code >> m) & ((1 << e) - 1)
    mant = code & ((1 << m) - 1)
    if math.isnan(stored):
        kind, exponent = "nan", None
    elif math.isinf(stored):
        kind, exponent = "inf", None
    elif stored == 0:
        kind, exponent = "zero", None
    elif field == 0:
        kind, exponent = "subnormal", fmt.emin
    else:
        kind, exponent = "normal", field - fmt.bias
    return _finish(
        common,
        stored,
        code=code,
        bits=_bitstr(code, fmt.bits),
        sign=code >> (e + m),
        exponent_bits=_bitstr(field, e),
        mantissa_bits=_bitstr(mant, m),
        biased_exponent=field,
        exponent=exponent,
        kind=kind,
        saturated=bool(torch.isinf(fmt.cast(v, "inf"))[0]),
    )


def _integer(fmt: IntFormat, v: torch.Tensor, zero_point: int, common: dict) -> Decomposition:
    x = float(v[0])
    if math.isnan(x):
        raise ConfigError("decompose: NaN has no integer code.")
    unclipped = torch.round(v) + zero_point
    code = int(torch.clamp(unclipped, fmt.min_value, fmt.max_value)[0])
    return _finish(
        common,
        float(code - zero_point),
        code=code,
        bits=_bitstr(code, fmt.bits),
        sign=int(code < 0),
        exponent_bits="",
        mantissa_bits="",
        biased_exponent=None,
        exponent=None,
        kind="zero" if code == zero_point else "normal",
        saturated=bool(float(unclipped[0]) != code),
    )


def _other(fmt: Log2Format | BinaryFormat | TernaryFormat, v: torch.Tensor, common: dict) -> Decomposition:
    x = float(v[0])
    if math.isnan(x):
        raise ConfigError(f"decompose: NaN has no code in {fmt.name}.")
    q = fmt.round(v)
    stored = float(q[0])
    code = int(fmt.quantize(v)[0])
    exponent_bits, field, exponent = "", None, None
    if isinstance(fmt, Log2Format):
        field = code & fmt.num_exponents
        exponent_bits = _bitstr(field, fmt.bits - 1)
        exponent = fmt.min_exponent + field - 1 if field else None
    return _finish(
        common,
        stored,
        code=code,
        bits=_bitstr(code, fmt.bits),
        sign=int(math.copysign(1.0, stored) < 0),
        exponent_bits=exponent_bits,
        mantissa_bits="",
        biased_exponent=field,
        exponent=exponent,
        kind="zero" if stored == 0 else "normal",
        saturated=abs(x) > fmt.max_value,
    )
