"""Binary, ternary and power-of-two formats: closed-form values, codes, stochastic unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import ConfigError, NonFiniteError
from lowbit.formats import BinaryFormat, Log2Format, NumberFormat, TernaryFormat, parse


def test_binary_values_and_codes():
    f = BinaryFormat()
    x = torch.tensor([-3.0, -1e-9, -0.0, 0.0, 0.2, 7.0])
    assert f.round(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    codes = f.quantize(x)
    assert codes.tolist() == [0, 0, 1, 1, 1, 1] and codes.dtype == torch.uint8
    assert f.dequantize(codes).tolist() == f.round(x).tolist()
    assert (f.bits, f.min_value, f.max_value, f.grid().tolist()) == (1, -1.0, 1.0, [-1.0, 1.0])
    assert isinstance(f, NumberFormat) and parse("binary") == f
    assert torch.isnan(f.round(torch.tensor([math.nan]))).all()
    with pytest.raises(NonFiniteError):
        f.quantize(torch.tensor([math.nan]))


def test_ternary_threshold():
    x = torch.tensor([-2.0, -0.6, -0.5, -0.3, 0.0, 0.5, 0.50001, 0.71, 3.0])
    assert TernaryFormat().round(x).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert TernaryFormat(0.7).round(x).tolist() == [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    codes = TernaryFormat().quantize(x)
    assert codes.dtype == torch.int8 and codes.tolist() == [-1, -1, 0, 0, 0, 0, 1, 1, 1]
    assert TernaryFormat().dequantize(codes).tolist() == TernaryFormat().round(x).tolist()
    assert parse("ternary:0.7") == TernaryFormat(0.7) and TernaryFormat(0.7).name == "ternary:0.7"
    assert parse("ternary") == TernaryFormat() and TernaryFormat().bits == 2
    for bad in [-0.1, 1.0, 2.0]:
        with pytest.raises(ConfigError):
            TernaryFormat(bad)
    with pytest.raises(ConfigError):
        parse("ternary:abc")


@pytest.mark.parametrize(
    "fmt,value,support",
    [(BinaryFormat(), 0.4, {-1.0, 1.0}), (TernaryFormat(), -0.3, {-1.0, 0.0}), (Log2Format(4), 0.3, {0.25, 0.5}),
     (Log2Format(4), 0.01, {0.0, 2.0**-6})],
)
def test_stochastic_is_unbiased(fmt, value, support):
    gen = torch.Generator().manual_seed(1)
    x = torch.full((100_000,), value)
    q = fmt.round(x, "stochastic", gen).double()
    assert set(q.unique().tolist()) == support
    lo, hi = sorted(support)
    p = (value - lo) / (hi - lo)
    sigma = math.sqrt(p * (1 - p) / x.numel()) * (hi - lo)
    assert abs(float(q.mean()) - value) < 5 * sigma


def test_log2_grid_codes_and_rounding():
    f = Log2Format(4)
    mags = [2.0**-k for k in range(6, -1, -1)]
    assert f.grid().tolist() == [-m for m in reversed(mags)] + [0.0] + mags
    assert (f.min_exponent, f.max_exponent, f.max_value, f.name) == (-6, 0, 1.0, "log2_4")
    # code j = 1..7 is 2^(j - 7), sign bit 3
    assert f.dequantize(torch.arange(16)).tolist() == [0.0] + mags + [-0.0] + [-m for m in mags]
    x = torch.tensor([0.74, 0.75, 0.76, 0.375, 1.4, 9.0, -math.inf, 2.0**-7, 2.0**-7 + 1e-9, 1e-30, -0.0])
    # 0.75 = midpoint(0.5, 1): codes 6 and 7 -> even 6 (0.5); 0.375 = midpoint(0.25, 0.5): codes 5, 6 -> 0.5;
    # 2^-7 = midpoint(0, 2^-6): codes 0, 1 -> 0
    got = f.round(x)
    assert got.tolist() == [0.5, 0.5, 1.0, 0.5, 1.0, 1.0, -1.0, 0.0, 2.0**-6, 0.0, -0.0]
    assert torch.signbit(got[-1])
    codes = f.quantize(x)
    assert torch.equal(f.dequantize(codes), got)
    assert codes[:3].tolist() == [6, 6, 7] and codes[6] == 0b1111
    with pytest.raises(ConfigError):
        f.encode(torch.tensor([0.3]))
    with pytest.raises(NonFiniteError):
        f.quantize(torch.tensor([math.nan]))


def test_log2_names_and_limits():
    assert parse("log2_8") == Log2Format(8) and Log2Format(8).min_exponent == -126
    assert parse("log2_4_e2") == Log2Format(4, 2) and Log2Format(4, 2).max_value == 4.0
    assert parse(Log2Format(3, -1).name) == Log2Format(3, -1)
    assert Log2Format(8).grid().numel() == 255 and torch.equal(
        Log2Format(8).dequantize(Log2Format(8).quantize(Log2Format(8).grid().float())).double(), Log2Format(8).grid()
    )
    for bad in [dict(bits=1), dict(bits=9), dict(bits=8, max_exponent=-30)]:
        with pytest.raises(ConfigError):
            Log2Format(**bad)
