"""Minifloats: sign, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits (fp32, fp16, bf16, fp8, fp6, fp4).

Values (IEEE754 section 3.4, with ``E`` the exponent field, ``M`` the mantissa field, ``m = man_bits``)::

    normal     (E > 0):  (-1)^s * 2^(E - bias) * (1 + M / 2^m)
    subnormal  (E = 0):  (-1)^s * 2^(1 - bias) * (M / 2^m)

Three conventions for the top exponent field ``E = 2^e - 1`` (``special``):

* ``"ieee"``: reserved for inf (``M = 0``) and NaN (fp32, fp16, bf16, OCP fp8 E5M2);
* ``"fn"``: finite, except ``S.1111.111`` (all ones) which is NaN; no inf (OCP fp8 E4M3, max 448);
* ``"none"``: every code is finite, no inf, no NaN (OCP MX fp6 E3M2 max 28, fp6 E2M3 max 7.5, fp4 E2M1 max 6).

Rounding works on the magnitude in float64, where every format here is exact: with
``e = max(floor(log2 |x|), emin)`` the grid step in that binade is ``2^(e - m)``, so
``round(x) = sign(x) * rne(|x| / 2^(e - m)) * 2^(e - m)`` (subnormals fall out of clamping ``e`` at ``emin``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import ConfigError, NonFiniteError
from .base import Rounding, round_integer

__all__ = [
    "MinifloatFormat",
    "FP32",
    "FP16",
    "BF16",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP6_E3M2",
    "FP6_E2M3",
    "FP4_E2M1",
    "parse_minifloat",
    "pow2",
]

Special = Literal["ieee", "fn", "none"]
Overflow = Literal["inf", "nan", "saturate"]
SPECIALS: tuple[str, ...] = ("ieee", "fn", "none")
_DEFAULT_OVERFLOW: dict[str, str] = {"ieee": "inf", "fn": "nan", "none": "saturate"}


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0 ** e`` as float64 for an integer tensor ``e`` in [-1022, 1023], built from the bits
    (``torch.ldexp`` goes through a float32 ``pow`` and underflows below 2^-149)."""
    e = e.to(torch.int64)
    return ((e + 1023) << 52).view(torch.float64)


@dataclass(frozen=True)
class MinifloatFormat:
    """A binary floating-point format with ``1 + exp_bits + man_bits`` bits.

    Args:
        exp_bits: exponent field width, 1 to 8.
        man_bits: mantissa (trailing significand) width, 0 to 23.
        bias: exponent bias; default ``2^(exp_bits - 1) - 1`` (IEEE754).
        special: ``"ieee"``, ``"fn"`` or ``"none"`` (see the module docstring).

    Every value of a valid format is exactly a float32, so :meth:`dequantize` is exact.
    Storage codes are the bit patterns as non-negative integers: ``uint8`` up to 8 bits, ``int32`` up to
    16 bits (fp16 / bf16 patterns 0..65535), ``int64`` above (fp32 patterns 0..2^32 - 1).

    >>> f = MinifloatFormat(4, 3, special="fn")
    >>> f.name, f.max_value
    ('fp8_e4m3', 448.0)
    >>> f.round(torch.tensor([0.3, 500.0, -1e-9])).tolist()
    [0.3125, 448.0, -0.0]
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    special: Special = "ieee"
    is_integer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        e, m = self.exp_bits, self.man_bits
        if not isinstance(e, int) or not 1 <= e <= 8:
            raise ConfigError(f"minifloat exp_bits must be an integer in 1..8, got {e!r}.")
        if not isinstance(m, int) or not 0 <= m <= 23:
            raise ConfigError(f"minifloat man_bits must be an integer in 0..23, got {m!r}.")
        if self.special not in SPECIALS:
            raise ConfigError(f"minifloat special must be one of {SPECIALS}, got {self.special!r}.")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (e - 1) - 1)
        if not isinstance(self.bias, int):
            raise ConfigError(f"minifloat bias must be an integer, got {self.bias!r}.")
        if self._max_field < 1:
            raise ConfigError(
                f"fp_e{e}m{m} with special={self.special!r} has no normal numbers; "
                "use more exponent bits or special='none'."
            )
        if self.emax > 127 or self.emin - m < -149:
            raise ConfigError(
                f"fp_e{e}m{m} with bias {self.bias} spans 2^{self.emin - m}..2^{self.emax + 1}, outside float32 "
                "(2^-149..2^128); pick a bias closer to the IEEE default 2^(exp_bits-1)-1."
            )

    # ---- layout -------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:
        key = (self.exp_bits, self.man_bits, self.bias, self.special)
        if key in _NAMES:
            return _NAMES[key]
        name = f"fp_e{self.exp_bits}m{self.man_bits}"
        if self.bias != 2 ** (self.exp_bits - 1) - 1:
            name += f"_b{self.bias}"
        if self.special != "ieee":
            name += f"_{self.special}"
        return name

    @property
    def _max_field(self) -> int:
        top = 2**self.exp_bits - 1
        if self.special == "ieee" or (self.special == "fn" and self.man_bits == 0):
            return top - 1
        return top

    @property
    def _max_mantissa(self) -> int:
        full = 2**self.man_bits - 1
        if self.special == "fn" and self._max_field == 2**self.exp_bits - 1:
            return full - 1
        return full

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number, ``1 - bias``."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite number."""
        return self._max_field - self.bias

    @property
    def max_value(self) -> float:
        return math.ldexp(2**self.man_bits + self._max_mantissa, self.emax - self.man_bits)

    @property
    def min_value(self) -> float:
        return -self.max_value

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def code_dtype(self) -> torch.dtype:
        if self.bits <= 8:
            return torch.uint8
        return torch.int32 if self.bits <= 16 else torch.int64

    def grid(self) -> torch.Tensor | None:
        if self.bits > 16:
            return None
        vals = self.dequantize(torch.arange(2**self.bits, dtype=torch.int64)).double()
        vals = vals[torch.isfinite(vals)]
        return torch.unique(vals) + 0.0  # unique is sorted; + 0.0 turns -0.0 into +0.0

    # ---- rounding -----------------------------------------------------------------------------------
    def _round_unbounded(self, a: torch.Tensor, rounding: Rounding, generator: torch.Generator | None) -> torch.Tensor:
        """Round finite magnitudes ``a >= 0`` (float64) to the format's grid with an unbounded exponent range."""
        # Anything >= 2^(emax+1) overflows whatever the rounding; capping keeps every power of two below in range.
        a = torch.clamp(a, max=math.ldexp(1.0, self.emax + 2))
        _, ex = torch.frexp(a)
        e = torch.clamp(ex.to(torch.int64) - 1, min=self.emin)
        step = e - self.man_bits
        # a / 2^step and r * 2^step are exact: multiplications by powers of two in float64.
        r = round_integer(a * pow2(-step), rounding, generator)
        return r * pow2(step)

    def round(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Nearest representable value (ties to even mantissa), saturating: ``|x| > max`` and ``±inf``
        give ``±max`` (ONNX QuantizeLinear ``saturate=1``). NaN stays NaN; signed zeros are kept.
        Same shape and dtype as ``x``."""
        return self._convert(x, "saturate", rounding, generator)

    def cast(self, x: torch.Tensor, overflow: Overflow | None = None, rounding: Rounding = "nearest") -> torch.Tensor:
        """The dtype conversion: round to nearest even, then apply the format's overflow rule to results
        beyond ``max_value`` and to ``±inf`` inputs.

        ``overflow`` defaults to ``"inf"`` for ``special="ieee"`` (``x.to(torch.float16)``), ``"nan"`` for
        ``"fn"`` (OCP FP8 non-saturating mode) and ``"saturate"`` for ``"none"``. Note that
        ``x.to(torch.float8_e4m3fn)`` in recent PyTorch saturates, so it equals ``cast(x, "saturate")``.
        Returns values in ``x``'s dtype (use float32 or float64 so inf/NaN survive)."""
        overflow = overflow or _DEFAULT_OVERFLOW[self.special]
        if overflow not in _DEFAULT_OVERFLOW.values():
            raise ConfigError(f"overflow must be 'inf', 'nan' or 'saturate', got {overflow!r}.")
        return self._convert(x, overflow, rounding, None)

    def _convert(self, x: torch.Tensor, overflow: str, rounding: Rounding, generator) -> torch.Tensor:
        x64 = x.to(torch.float64)
        a = x64.abs()
        finite = torch.isfinite(a)
        q = self._round_unbounded(torch.where(finite, a, 0.0), rounding, generator)
        big = (q > self.max_value) | torch.isinf(a)
        fill = {"inf": math.inf, "nan": math.nan, "saturate": self.max_value}[overflow]
        q = torch.where(big, fill, q)
        q = torch.where(torch.isnan(a), math.nan, q)
        return torch.copysign(q, x64).to(x.dtype)

    # ---- codes --------------------------------------------------------------------------------------
    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Bit patterns of values that are already representable (the output of :meth:`round` or
        :meth:`cast`), in :attr:`code_dtype`. NaN becomes the quiet NaN ``sign | E all ones | top mantissa
        bit`` (``"ieee"``) or ``sign | all ones`` (``"fn"``).

        Raises:
            ConfigError: a value is not on the grid (round it first).
            NonFiniteError: inf or NaN for a format that cannot store it.
        """
        e, m = self.exp_bits, self.man_bits
        v = values.to(torch.float64)
        a = v.abs()
        nan, inf = torch.isnan(a), torch.isinf(a)
        if (self.special == "none" and bool((nan | inf).any())) or (self.special == "fn" and bool(inf.any())):
            raise NonFiniteError(
                f"{self.name} has no code for {'NaN/inf' if self.special == 'none' else 'inf'}; "
                "use round() (which saturates) and remove NaN before quantizing (torch.nan_to_num)."
            )
        if self.special == "ieee" and m == 0 and bool(nan.any()):  # E all ones, M = 0 is inf: no NaN code
            raise NonFiniteError(
                f"{self.name} has no mantissa bits, so no code for NaN; remove NaN before quantizing (torch.nan_to_num)."
            )
        af = torch.where(nan | inf, 0.0, a)
        _, ex = torch.frexp(af)
        ee = torch.clamp(ex.to(torch.int64) - 1, min=self.emin)
        normal = af >= self.smallest_normal
        sig = af * pow2(self.man_bits - ee)
        field = torch.where(normal, ee + self.bias, 0)
        if bool((sig != torch.floor(sig)).any() | (af > self.max_value).any()):
            raise ConfigError(f"values are not representable in {self.name}; call format.round(x) before encode().")
        mant = sig.to(torch.int64) - torch.where(normal, 2**m, 0)
        code = (field << m) | mant
        top = (2**e - 1) << m
        code = torch.where(inf, top, code)
        nan_code = top | ((1 << m >> 1) if self.special == "ieee" else 2**m - 1)
        code = torch.where(nan, nan_code, code)
        code = code | (torch.signbit(v).to(torch.int64) << (e + m))
        return code.to(self.code_dtype)

    def quantize(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Bit patterns of ``round(x)``; see :meth:`encode` for the dtype."""
        return self.encode(self.round(x, rounding, generator))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 values of bit patterns (only the low :attr:`bits` bits are read, so an ``int16`` view of
        fp16 data works too)."""
        e, m = self.exp_bits, self.man_bits
        c = codes.to(torch.int64) & (2**self.bits - 1)
        negative = ((c >> (e + m)) & 1).bool()
        field = (c >> m) & (2**e - 1)
        mant = c & (2**m - 1)
        sub = field == 0
        sig = torch.where(sub, mant, mant + 2**m).to(torch.float64)
        val = sig * pow2(torch.where(sub, self.emin, field - self.bias) - m)
        top = field == 2**e - 1
        if self.special == "ieee":
            val = torch.where(top & (mant == 0), math.inf, val)
            val = torch.where(top & (mant != 0), math.nan, val)
        elif self.special == "fn":
            val = torch.where(top & (mant == 2**m - 1), math.nan, val)
        return torch.where(negative, -val, val).to(torch.float32)

    def __str__(self) -> str:
        return self.name


FP32 = MinifloatFormat(8, 23)
FP16 = MinifloatFormat(5, 10)
BF16 = MinifloatFormat(8, 7)
FP8_E4M3 = MinifloatFormat(4, 3, special="fn")
FP8_E5M2 = MinifloatFormat(5, 2)
FP6_E3M2 = MinifloatFormat(3, 2, special="none")
FP6_E2M3 = MinifloatFormat(2, 3, special="none")
FP4_E2M1 = MinifloatFormat(2, 1, special="none")

_KNOWN: dict[str, MinifloatFormat] = {
    "fp32": FP32,
    "float32": FP32,
    "fp16": FP16,
    "float16": FP16,
    "half": FP16,
    "bf16": BF16,
    "bfloat16": BF16,
    "fp8_e4m3": FP8_E4M3,
    "fp8_e4m3fn": FP8_E4M3,
    "fp8_e5m2": FP8_E5M2,
    "fp6_e3m2": FP6_E3M2,
    "fp6_e2m3": FP6_E2M3,
    "fp4_e2m1": FP4_E2M1,
}
_NAMES: dict[tuple, str] = {}
for _n, _f in _KNOWN.items():
    _NAMES.setdefault((_f.exp_bits, _f.man_bits, _f.bias, _f.special), _n)

_CUSTOM = re.compile(r"^fp_e(\d+)m(\d+)(?:_b(-?\d+))?(?:_(ieee|fn|none))?$")


def parse_minifloat(key: str) -> MinifloatFormat | None:
    """Format for ``fp32``, ``fp16``, ``bf16``, ``fp8_e4m3`` (``fp8_e4m3fn``), ``fp8_e5m2``, ``fp6_e3m2``,
    ``fp6_e2m3``, ``fp4_e2m1``, or custom ``fp_e{E}m{M}[_b{bias}][_fn|_none]`` (default IEEE specials and
    bias); None for other names."""
    if key in _KNOWN:
        return _KNOWN[key]
    mt = _CUSTOM.match(key)
    if mt is None:
        return None
    bias = None if mt.group(3) is None else int(mt.group(3))
    return MinifloatFormat(int(mt.group(1)), int(mt.group(2)), bias, mt.group(4) or "ieee")
