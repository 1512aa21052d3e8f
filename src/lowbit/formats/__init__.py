"""Number formats: integer, minifloat (fp32/fp16/bf16/fp8/fp6/fp4/custom), binary, ternary, log2.

All satisfy :class:`NumberFormat`. :func:`parse` turns a name into a format.
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from .base import NumberFormat, Rounding, round_half_even, round_integer, round_stochastic
from .binary import BinaryFormat, TernaryFormat, parse_binary
from .decompose import Decomposition, decompose
from .integer import IntFormat
from .log2 import Log2Format, parse_log2
from .minifloat import (
    BF16,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    MinifloatFormat,
    parse_minifloat,
)

__all__ = [
    "NumberFormat", "Rounding", "IntFormat", "parse", "round_half_even", "round_stochastic", "round_integer",
    "MinifloatFormat", "BinaryFormat", "TernaryFormat", "Log2Format", "Decomposition", "decompose",
    "FP32", "FP16", "BF16", "FP8_E4M3", "FP8_E5M2", "FP6_E3M2", "FP6_E2M3", "FP4_E2M1",
]

_INT = re.compile(r"^(u?)int(\d+)(_narrow)?$")


def parse(name: str | NumberFormat) -> NumberFormat:
    """Format from a name: ``int8``, ``uint8``, ``int4``, ``int8_narrow``, ``fp16``, ``bf16``,
    ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``, ``binary``, ``ternary``, ``log2_4``...
    A format object (anything with ``name``, ``is_integer``, ``min_value``, ``max_value`` and ``round``) is
    returned unchanged; anything else raises :class:`~lowbit.errors.ConfigError`."""
    if not isinstance(name, str):
        if all(hasattr(name, a) for a in ("name", "is_integer", "min_value", "max_value", "round")):
            return name
        raise ConfigError(
            f"a number format is a name such as 'int8' or 'fp8_e4m3', or a format object, got {name!r} "
            f"({type(name).__name__})."
        )
    key = name.strip().lower()
    m = _INT.match(key)
    if m:
        return IntFormat(int(m.group(2)), signed=not m.group(1), narrow=bool(m.group(3)))
    for parser in _EXTRA_PARSERS:
        fmt = parser(key)
        if fmt is not None:
            return fmt
    raise ConfigError(
        f"unknown number format {name!r}; use intN/uintN (N = 1..16), fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, "
        "fp6_e3m2, fp6_e2m3, fp4_e2m1, fp_eEmM[_bBIAS][_fn|_none], binary, ternary[:T] or log2_N."
    )


# Other format families register a parser here: a function name -> format or None.
_EXTRA_PARSERS: list = [parse_minifloat, parse_binary, parse_log2]
