"""Integer formats: any width from 1 to 16 bits, signed or unsigned, optionally narrow (symmetric) range."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Rounding, code_dtype, round_integer


@dataclass(frozen=True)
class IntFormat:
    """Two's complement (signed) or plain binary (unsigned) integers of ``bits`` bits.

    Signed: codes in [-2^(b-1), 2^(b-1) - 1]; with ``narrow=True`` the most negative code is dropped,
    [-(2^(b-1) - 1), 2^(b-1) - 1], so the grid is symmetric (int8 -> [-127, 127], as TensorRT and the
    ONNX Runtime symmetric weight default use). Unsigned: [0, 2^b - 1]; ``narrow`` drops the top code.

    >>> IntFormat(8).min_value, IntFormat(8).max_value
    (-128, 127)
    >>> IntFormat(4, signed=False).round(torch.tensor([-1.0, 2.5, 3.5, 99.0])).tolist()
    [0.0, 2.0, 4.0, 15.0]
    """

    bits: int = 8
    signed: bool = True
    narrow: bool = False
    is_integer: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ConfigError(
                f"integer formats take 1 to 16 bits, got {self.bits!r}; use a minifloat format for other widths."
            )
        if self.narrow and self.bits == 1:
            raise ConfigError("a 1-bit integer has no narrow range; use BinaryFormat for {-a, +a}.")

    @property
    def name(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        return base + ("_narrow" if self.narrow else "")

    @property
    def min_value(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return 0

    @property
    def max_value(self) -> int:
        if self.signed:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1 - (1 if self.narrow else 0)

    @property
    def num_levels(self) -> int:
        return self.max_value - self.min_value + 1

    def grid(self) -> torch.Tensor:
        return torch.arange(self.min_value, self.max_value + 1, dtype=torch.float64)

    def round(self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.clamp(round_integer(x, rounding, generator), self.min_value, self.max_value)

    def quantize(self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
        return self.round(x, rounding, generator).to(self.code_dtype)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    @property
    def code_dtype(self) -> torch.dtype:
        return code_dtype(self.min_value, self.max_value)

    def __str__(self) -> str:
        return self.name
