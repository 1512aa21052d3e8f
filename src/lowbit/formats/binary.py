"""Binary ``{-1, +1}`` and ternary ``{-1, 0, +1}`` formats (values in scaled units, the scale multiplies them).

Binary (BinaryConnect, Courbariaux et al. 2015; XNOR-Net, Rastegari et al. 2016): ``round(x) = +1 if x >= 0
else -1`` (0 goes to +1). Stochastic: ``+1`` with probability ``(clamp(x, -1, 1) + 1) / 2`` (the hard
sigmoid), so ``E[round(x)] = clamp(x, -1, 1)``.

Ternary (TWN, Li et al. 2016): ``round(x) = sign(x) if |x| > threshold else 0``. The default threshold 0.5
is plain round-to-nearest (a tie at 0.5 goes to the even value 0); TWN's ``0.7 * mean|w|`` rule is a
threshold of ``0.7 * mean|w| / scale``. Stochastic: ``sign(x)`` with probability ``min(|x|, 1)``, else 0
(unbiased on [-1, 1]; the threshold is not used).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, NonFiniteError
from .base import ROUNDINGS, Rounding

__all__ = ["BinaryFormat", "TernaryFormat", "parse_binary"]


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}; use one of {ROUNDINGS}.")


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(torch.float64)


def _check_codes_input(values: torch.Tensor, name: str) -> None:
    if bool(torch.isnan(values).any()):
        raise NonFiniteError(f"{name} has no code for NaN; remove NaN before quantizing (torch.nan_to_num).")


@dataclass(frozen=True)
class BinaryFormat:
    """One bit per value: ``{-1, +1}``. Codes (``uint8``): 0 for -1, 1 for +1.

    >>> BinaryFormat().round(torch.tensor([-0.2, 0.0, 3.0])).tolist()
    [-1.0, 1.0, 1.0]
    """

    is_integer: ClassVar[bool] = False
    bits: ClassVar[int] = 1
    name: ClassVar[str] = "binary"

    @property
    def min_value(self) -> float:
        return -1.0

    @property
    def max_value(self) -> float:
        return 1.0

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    def grid(self) -> torch.Tensor:
        return torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def round(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``+1`` where ``x >= 0`` (or with probability ``(clamp(x,-1,1)+1)/2`` when stochastic), else
        ``-1``; NaN stays NaN. Same dtype as ``x``."""
        _check_rounding(rounding)
        x64 = x.to(torch.float64)
        if rounding == "nearest":
            up = x64 >= 0
        else:
            up = _uniform(x, generator) < (torch.clamp(x64, -1.0, 1.0) + 1.0) / 2.0
        q = torch.where(up, 1.0, -1.0)
        return torch.where(torch.isnan(x64), math.nan, q).to(x.dtype)

    def quantize(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        q = self.round(x, rounding, generator)
        _check_codes_input(q, self.name)
        return (q > 0).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.where(codes.to(torch.int64) != 0, 1.0, -1.0).to(torch.float32)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TernaryFormat:
    """Two bits per value: ``{-1, 0, +1}``. Codes (``int8``) are the values themselves.

    Args:
        threshold: ``|x| <= threshold`` rounds to 0, in scaled units, ``0 <= threshold < 1``.

    >>> TernaryFormat().round(torch.tensor([-0.7, 0.5, 0.51, 9.0])).tolist()
    [-1.0, 0.0, 1.0, 1.0]
    """

    threshold: float = 0.5
    is_integer: ClassVar[bool] = False
    bits: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold < 1.0:
            raise ConfigError(
                f"ternary threshold must be in [0, 1) (in units of the scale), got {self.threshold!r}; "
                "0.5 rounds to nearest."
            )

    @property
    def name(self) -> str:
        return "ternary" if self.threshold == 0.5 else f"ternary:{self.threshold:g}"

    @property
    def min_value(self) -> float:
        return -1.0

    @property
    def max_value(self) -> float:
        return 1.0

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8

    def grid(self) -> torch.Tensor:
        return torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)

    def round(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``sign(x)`` where ``|x| > threshold`` (or with probability ``min(|x|, 1)`` when stochastic),
        else 0; NaN stays NaN. Same dtype as ``x``."""
        _check_rounding(rounding)
        x64 = x.to(torch.float64)
        a = x64.abs()
        if rounding == "nearest":
            keep = a > self.threshold
        else:
            keep = _uniform(x, generator) < torch.clamp(a, max=1.0)
        q = torch.where(keep, torch.sign(x64), 0.0)
        return torch.where(torch.isnan(x64), math.nan, q).to(x.dtype)

    def quantize(
        self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        q = self.round(x, rounding, generator)
        _check_codes_input(q, self.name)
        return q.to(torch.int8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.clamp(codes.to(torch.float32), -1.0, 1.0)

    def __str__(self) -> str:
        return self.name


_TERNARY = re.compile(r"^ternary(?::([0-9.eE+-]+))?$")


def parse_binary(key: str) -> BinaryFormat | TernaryFormat | None:
    """``binary``, ``ternary`` or ``ternary:<threshold>`` (``ternary:0.7``); None for other names."""
    if key == "binary":
        return BinaryFormat()
    mt = _TERNARY.match(key)
    if mt is None:
        return None
    if mt.group(1) is None:
        return TernaryFormat()
    try:
        threshold = float(mt.group(1))
    except ValueError:
        raise ConfigError(f"cannot read the ternary threshold in {key!r}; write it like 'ternary:0.7'.") from None
    return TernaryFormat(threshold)
