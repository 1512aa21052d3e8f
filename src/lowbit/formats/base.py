"""The one protocol every number format satisfies, and the rounding primitives they share.

A *format* maps real numbers (already divided by the scale) onto a finite set of representable values.
Integer formats are *affine*: the value set is a contiguous range of integers, so a zero point can shift
it and :mod:`lowbit.ops` adds the zero point after rounding (``q = clamp(round(x / s) + z, qmin, qmax)``,
the ONNX ``QuantizeLinear`` formula). Every other format (minifloats, binary, ternary, log2) rounds
itself in :meth:`NumberFormat.round` and takes no zero point.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch

Rounding = Literal["nearest", "stochastic"]
"""``nearest``: round half to even (IEEE754 default, ``torch.round``, ONNX QuantizeLinear).
``stochastic``: round down or up with probability given by the distance (unbiased in expectation)."""

ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")


@runtime_checkable
class NumberFormat(Protocol):
    """What lowbit needs of a number format.

    Attributes:
        name: canonical name, parseable by :func:`lowbit.formats.parse` (``"int8"``, ``"fp8_e4m3"``).
        bits: storage bits per value.
        is_integer: True for affine integer grids (a zero point is allowed).
        min_value, max_value: the most negative / most positive finite representable value
            (for integers, the codes qmin and qmax).
    """

    name: str
    bits: int
    is_integer: bool

    @property
    def min_value(self) -> float: ...

    @property
    def max_value(self) -> float: ...

    def grid(self) -> torch.Tensor | None:
        """All finite representable values, sorted ascending, float64; None when there are too many
        (more than 2**16) to list."""
        ...

    def round(self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
        """Nearest representable value of every element, saturating at min/max; same dtype as ``x``."""
        ...

    def quantize(self, x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
        """Storage codes of the rounded values (integers for int formats, bit patterns otherwise)."""
        ...

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 values of storage codes."""
        ...


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties to even (``torch.round`` semantics), same dtype."""
    return torch.round(x)


def round_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x + u)`` with ``u ~ U[0, 1)``: rounds up with probability ``x - floor(x)``, so
    ``E[round(x)] = x`` (unbiased; Gupta et al. 2015)."""
    work = x if x.dtype == torch.float64 else x.float()  # u in fp16/bf16 could round up to 1.0: bias
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(work.dtype)
    return torch.floor(work + u).to(x.dtype)


def round_integer(x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to integers with the chosen mode (no clamping)."""
    if rounding == "nearest":
        return round_half_even(x)
    if rounding == "stochastic":
        return round_stochastic(x, generator)
    from ..errors import ConfigError

    raise ConfigError(f"unknown rounding {rounding!r}; use one of {ROUNDINGS}.")


def code_dtype(lo: int, hi: int) -> torch.dtype:
    """Smallest torch integer dtype that holds every integer in [lo, hi]."""
    for dt in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    raise ValueError((lo, hi))
