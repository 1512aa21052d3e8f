"""Power-of-two (logarithmic) format: values ``0`` and ``±2^k`` (Miyashita et al. 2016, "Convolutional
neural networks using logarithmic data representation"; multiplications become shifts).

Layout of a ``b``-bit code: a sign bit on top, then a ``b - 1`` bit field ``j``. ``j = 0`` is zero;
``j = 1 .. n`` with ``n = 2^(b-1) - 1`` is ``2^(kmin + j - 1)``, where ``kmin = max_exponent - n + 1``.
So ``log2_4`` (``max_exponent=0``) holds ``0, ±1/64, ±1/32, ..., ±1/2, ±1``.

Rounding is to the nearest value in the linear domain: between ``2^k`` and ``2^(k+1)`` the midpoint is
``1.5 * 2^k``; between 0 and ``2^kmin`` it is ``2^(kmin-1)``. Ties go to the even field ``j`` (half to
even on the codes). Stochastic rounding picks the upper neighbour with probability
``(|x| - lo) / (hi - lo)``, unbiased inside the range.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, NonFiniteError
from .base import ROUNDINGS, Rounding
from .minifloat import pow2

__all__ = ["Log2Format", "parse_log2"]


@dataclass(frozen=True)
class Log2Format:
    """Sign + exponent code; one code for zero.

    Args:
        bits: 2 to 8 bits per value.
        max_exponent: the largest value is ``2^max_exponent``.

    Codes are ``uint8`` (sign bit ``bits - 1``, field ``j`` below it).

    >>> f = Log2Format(4)
    >>> f.round(torch.tensor([0.74, 0.76, -3.0, 0.001])).tolist()
    [0.5, 1.0, -1.0, 0.0]
    """

    bits: int = 4
    max_exponent: int = 0
    is_integer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"log2 formats take 2 to 8 bits, got {self.bits!r}.")
        if not isinstance(self.max_exponent, int):
            raise ConfigError(f"log2 max_exponent must be an integer, got {self.max_exponent!r}.")
        if self.max_exponent > 127 or self.min_exponent < -149:
            raise ConfigError(
                f"log2_{self.bits} with max_exponent {self.max_exponent} spans 2^{self.min_exponent}.."
                f"2^{self.max_exponent}, outside float32 (2^-149..2^127); move max_exponent toward 0."
            )

    @property
    def name(self) -> str:
        return f"log2_{self.bits}" + (f"_e{self.max_exponent}" if self.max_exponent else "")

    @property
    def num_exponents(self) -> int:
        """Number of non-zero magnitudes, ``2^(bits-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        return self.max_exponent - self.num_exponents + 1

    @property
    def max_value(self) -> float:
        return math.ldexp(1.0, self.max_exponent)

    @property
    def min_value(self) -> float:
        return -self.max_value

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    def grid(self) -> torch.Tensor:
        mags = pow2(torch.arange(self.min_exponent, self.max_exponent + 1))
        return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])

    def round(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Nearest of ``0, ±2^k`` (linear distance, ties to even code), saturating at ``±2^max_exponent``
        (also for ``±inf``); NaN stays NaN; signed zeros kept. Same dtype as ``x``."""
        if rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {rounding!r}; use one of {ROUNDINGS}.")
        kmin, kmax = self.min_exponent, self.max_exponent
        x64 = x.to(torch.float64)
        a = x64.abs()
        af = torch.clamp(torch.where(torch.isnan(a), 0.0, a), max=self.max_value)
        _, ex = torch.frexp(af)
        k = torch.clamp(ex.to(torch.int64) - 1, kmin - 1, kmax)  # |x| in [2^k, 2^(k+1)), or below 2^kmin
        lo = torch.where(k >= kmin, pow2(k), 0.0)
        hi = pow2(k + 1)
        if rounding == "nearest":
            mid = (lo + hi) / 2  # exact: 1.5 * 2^k, or 2^(kmin - 1)
            lo_field_odd = (k - kmin + 1) % 2 == 1
            up = (af > mid) | ((af == mid) & lo_field_odd)
        else:
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(torch.float64)
            up = u < (af - lo) / (hi - lo)
        q = torch.where(up, hi, lo)
        q = torch.where(af == 0, 0.0, q)
        q = torch.where(af >= self.max_value, self.max_value, q)
        q = torch.where(torch.isnan(a), math.nan, q)
        return torch.copysign(q, x64).to(x.dtype)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Codes of values already on the grid (``uint8``).

        Raises:
            NonFiniteError: NaN (no code for it).
            ConfigError: a value is not on the grid (round it first).
        """
        v = values.to(torch.float64)
        a = v.abs()
        if bool(torch.isnan(a).any()):
            raise NonFiniteError(f"{self.name} has no code for NaN; remove NaN before quantizing (torch.nan_to_num).")
        mant, ex = torch.frexp(a)
        field = torch.where(a == 0, 0, ex.to(torch.int64) - 1 - self.min_exponent + 1)
        if bool(((a != 0) & ((mant != 0.5) | (field < 1) | (field > self.num_exponents))).any()):
            raise ConfigError(f"values are not representable in {self.name}; call format.round(x) before encode().")
        code = field | (torch.signbit(v).to(torch.int64) << (self.bits - 1))
        return code.to(torch.uint8)

    def quantize(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.encode(self.round(x, rounding, generator))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int64) & (2**self.bits - 1)
        field = c & self.num_exponents
        mag = torch.where(field == 0, 0.0, pow2(self.min_exponent + field - 1))
        negative = ((c >> (self.bits - 1)) & 1).bool()
        return torch.where(negative, -mag, mag).to(torch.float32)

    def __str__(self) -> str:
        return self.name


_LOG2 = re.compile(r"^log2_(\d+)(?:_e(-?\d+))?$")


def parse_log2(key: str) -> Log2Format | None:
    """``log2_{bits}`` or ``log2_{bits}_e{max_exponent}`` (``log2_4``, ``log2_8``, ``log2_4_e2``)."""
    mt = _LOG2.match(key)
    if mt is None:
        return None
    return Log2Format(int(mt.group(1)), int(mt.group(2) or 0))
