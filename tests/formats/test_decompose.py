"""decompose() against Python's struct module (IEEE754 binary32 'f' and binary16 'e')."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import ConfigError
from lowbit.formats import Decomposition, IntFormat, decompose

F32_MAX = 3.4028234663852886e38


def _struct_fields(value: float, fmt: str, e: int, m: int) -> tuple[int, str, str, float]:
    width = 1 + e + m
    code = int.from_bytes(struct.pack(">" + fmt, value), "big")
    bits = format(code, f"0{width}b")
    stored = struct.unpack(">" + fmt, struct.pack(">" + fmt, value))[0]
    return code, bits[1 : 1 + e], bits[1 + e :], stored


@given(st.floats(min_value=-F32_MAX, max_value=F32_MAX, allow_nan=False))
def test_fp32_matches_struct(value):
    d = decompose(value, "fp32")
    code, exp_bits, man_bits, stored = _struct_fields(value, "f", 8, 23)
    assert (d.code, d.exponent_bits, d.mantissa_bits) == (code, exp_bits, man_bits)
    assert d.stored == stored and math.copysign(1, d.stored) == math.copysign(1, stored)
    assert d.sign == code >> 31 and d.biased_exponent == int(exp_bits, 2)
    assert d.error == stored - value


@given(st.floats(min_value=-65519.99, max_value=65519.99, allow_nan=False))
def test_fp16_matches_struct_half(value):
    d = decompose(value, "fp16")
    code, exp_bits, man_bits, stored = _struct_fields(value, "e", 5, 10)
    assert (d.code, d.exponent_bits, d.mantissa_bits, d.stored) == (code, exp_bits, man_bits, stored)


@pytest.mark.parametrize(
    "value,fmt,kind,exponent,stored",
    [
        (1.0, "fp16", "normal", 0, 1.0),
        (2.0**-24, "fp16", "subnormal", -14, 2.0**-24),
        (3 * 2.0**-26, "fp16", "subnormal", -14, 2.0**-24),  # 0.75 of the smallest subnormal rounds up
        (2.0**-25, "fp16", "zero", None, 0.0),  # exactly half of it: tie to even -> 0
        (-0.0, "bf16", "zero", None, -0.0),
        (1e6, "fp16", "inf", None, math.inf),
        (math.nan, "fp8_e5m2", "nan", None, math.nan),
        (500.0, "fp8_e4m3", "nan", None, math.nan),
        (0.1, "fp4_e2m1", "zero", None, 0.0),
        (5.0, "fp4_e2m1", "normal", 2, 4.0),
    ],
)
def test_classes(value, fmt, kind, exponent, stored):
    d = decompose(value, fmt)
    assert (d.kind, d.exponent) == (kind, exponent)
    assert (math.isnan(d.stored) and math.isnan(stored)) or (d.stored == stored and
                                                             math.copysign(1, d.stored) == math.copysign(1, stored))


def test_fp16_example_and_text():
    d = decompose(0.1, "fp16")
    assert isinstance(d, Decomposition)
    assert d.bits == "0010111001100110"
    assert (d.sign, d.exponent_bits, d.mantissa_bits, d.biased_exponent, d.exponent) == (0, "01011", "1001100110", 11, -4)
    assert d.stored == 1638 / 16384 and d.error == 1638 / 16384 - 0.1
    assert "0010111001100110" in str(d) and "normal" in str(d)


def test_saturate_option_and_overflow_flag():
    cast = decompose(70000.0, "fp16")
    clip = decompose(70000.0, "fp16", saturate=True)
    assert cast.kind == "inf" and cast.saturated and cast.code == 0x7C00
    assert clip.stored == 65504.0 and clip.saturated and clip.code == 0x7BFF
    assert not decompose(65519.0, "fp16").saturated  # rounds to max, no overflow


def test_integer_with_scale_and_zero_point():
    d = decompose(0.26, IntFormat(8), scale=0.1)
    assert (d.code, d.bits, d.sign, d.kind, d.saturated) == (3, "00000011", 0, "normal", False)
    assert d.stored == 3 * 0.1 and d.error == 3 * 0.1 - 0.26
    neg = decompose(-0.05, "int8", scale=0.1)  # -0.5 rounds half to even -> 0
    assert (neg.code, neg.kind, neg.stored) == (0, "zero", 0.0)
    sat = decompose(-100.0, "int8", scale=0.1)
    assert (sat.code, sat.bits, sat.sign, sat.saturated) == (-128, "10000000", 1, True)
    assert sat.stored == -12.8
    u = decompose(1.0, "uint8", scale=0.02, zero_point=128)
    assert (u.code, u.stored, u.bits) == (178, 50 * 0.02, "10110010")


def test_log2_ternary_binary():
    d = decompose(-0.3, "log2_4")
    assert (d.code, d.bits, d.sign, d.exponent_bits, d.exponent, d.stored) == (0b1101, "1101", 1, "101", -2, -0.25)
    assert decompose(0.0, "log2_4").kind == "zero"
    t = decompose(0.3, "ternary")
    assert (t.code, t.stored, t.kind) == (0, 0.0, "zero")
    b = decompose(-2.0, "binary")
    assert (b.code, b.stored, b.saturated) == (0, -1.0, True)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        decompose(1.0, "fp16", scale=0.0)
    with pytest.raises(ConfigError):
        decompose(1.0, "fp16", zero_point=3)
    with pytest.raises(ConfigError):
        decompose(1.0, "int8", saturate=True)
    with pytest.raises(ConfigError):
        decompose(math.nan, "int8")
    with pytest.raises(ConfigError):
        decompose(1.0, "fp7")
    assert torch.isfinite(torch.tensor(decompose(1.0, "fp8_e4m3").stored))
