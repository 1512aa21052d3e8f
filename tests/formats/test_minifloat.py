"""Minifloats, bit for bit against torch's own dtypes and the OCP MX tables."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import ConfigError, NonFiniteError
from lowbit.formats import (
    BF16,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    MinifloatFormat,
    NumberFormat,
    parse,
)

from ._reference import assert_same_floats, next_down, next_up

TORCH_16 = [(FP16, torch.float16), (BF16, torch.bfloat16)]
TORCH_8 = [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)]
ALL = [FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1]


def _all_values(fmt: MinifloatFormat) -> torch.Tensor:
    """Every finite value of a format with a grid, as float32 (both zeros)."""
    vals = fmt.dequantize(torch.arange(2**fmt.bits))
    return vals[torch.isfinite(vals)]


def _probe_inputs(fmt: MinifloatFormat, seed: int = 0) -> torch.Tensor:
    """float32 inputs that stress a cast: random, exact midpoints between neighbours and their float32
    neighbours, subnormals, overflow, signed zeros, inf and NaN."""
    g = torch.manual_seed(seed)
    grid = fmt.grid()
    mids = ((grid[1:] + grid[:-1]) / 2).float()  # exact: one more significant bit than the format
    assert torch.equal(mids.double(), (grid[1:] + grid[:-1]) / 2)
    m = fmt.max_value
    top = torch.tensor(
        [m, m * (1 + 2.0 ** -(fmt.man_bits + 2)), m * (1 + 2.0 ** -(fmt.man_bits + 1)), 2 * m,
         min(m * 1e3, 3e38), math.inf, 0.0, -0.0, fmt.smallest_subnormal / 2, fmt.smallest_subnormal / 4],
        dtype=torch.float64,
    ).float()
    top = torch.cat([top, next_up(top[:5]), next_down(top[:5])])
    rand_scale = torch.exp2(torch.randint(fmt.emin - fmt.man_bits - 2, fmt.emax + 2, (20000,), generator=g).float())
    rand = torch.randn(20000, generator=g) * rand_scale
    x = torch.cat([mids, next_up(mids), next_down(mids), top, rand])
    return torch.cat([x, -x, torch.tensor([math.nan])])


@pytest.mark.parametrize("fmt,dtype", TORCH_16, ids=["fp16", "bf16"])
def test_every_16bit_pattern_decodes_like_torch_and_round_trips(fmt, dtype):
    codes = torch.arange(2**16, dtype=torch.int32)
    expected = codes.to(torch.int16).view(dtype).float()
    got = fmt.dequantize(codes)
    assert_same_floats(got, expected)
    not_nan = ~torch.isnan(got)
    assert torch.equal(fmt.encode(got[not_nan]), codes[not_nan])
    # NaN codes come back as the canonical quiet NaN, keeping the sign
    nan_codes = fmt.encode(got[~not_nan])
    assert torch.isnan(fmt.dequantize(nan_codes)).all()
    # an int16 view (negative ints) decodes the same as the unsigned pattern
    assert_same_floats(fmt.dequantize(codes.to(torch.int16)), expected)


@pytest.mark.parametrize("fmt,dtype", TORCH_16, ids=["fp16", "bf16"])
def test_cast_matches_torch_bit_for_bit(fmt, dtype):
    x = _probe_inputs(fmt)
    expected = x.to(dtype).float()
    got = fmt.cast(x)
    assert_same_floats(got, expected)
    # and the bit patterns, not only the values
    not_nan = ~torch.isnan(x)
    want_codes = x[not_nan].to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(fmt.encode(got[not_nan]), want_codes)


@pytest.mark.parametrize("fmt,dtype", TORCH_8, ids=["e4m3fn", "e5m2"])
def test_all_fp8_codes_decode_like_torch(fmt, dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = codes.view(dtype).float()
    got = fmt.dequantize(codes)
    assert_same_floats(got, expected)
    not_nan = ~torch.isnan(got)
    assert torch.equal(fmt.encode(got[not_nan]), codes[not_nan])
    assert fmt.code_dtype == torch.uint8


@pytest.mark.parametrize("fmt,dtype", TORCH_8, ids=["e4m3fn", "e5m2"])
def test_fp8_cast_matches_torch(fmt, dtype):
    x = _probe_inputs(fmt)
    # torch's overflow rule for float8_e4m3fn changed between releases: 2.11 follows the OCP
    # non-saturating rule (NaN), 2.14 saturates to +-448; e5m2 overflows to inf. Compare with lowbit's
    # mode that matches the installed torch, found from one overflowing value.
    overflow = "saturate" if torch.isfinite(torch.tensor([1e6]).to(dtype).float()).all() else None
    got = fmt.cast(x, overflow)
    assert_same_floats(got, x.to(dtype).float())
    not_nan = ~torch.isnan(x)
    assert torch.equal(fmt.encode(got[not_nan]), x[not_nan].to(dtype).view(torch.uint8))


def test_fp8_e4m3fn_default_cast_is_ocp_non_saturating():
    # OCP FP8 spec: E4M3 has no inf; overflow in non-saturating mode gives NaN. 464 is the tie between
    # 448 (mantissa 110, even) and 480 (not representable), so it rounds down.
    x = torch.tensor([448.0, 463.9, 464.0, 464.1, 1e4, math.inf, -math.inf, -464.1])
    got = FP8_E4M3.cast(x)
    assert got[:3].tolist() == [448.0, 448.0, 448.0]
    assert torch.isnan(got[3:]).all()
    assert FP8_E4M3.round(x).tolist() == [448.0] * 6 + [-448.0, -448.0]


def test_fp32_cast_of_float64_equals_torch():
    g = torch.manual_seed(1)
    fmt = FP32
    # float64 midpoints between neighbouring float32 values, incl. subnormals and the top
    f = torch.cat([torch.randn(5000, generator=g) * torch.exp2(torch.randint(-150, 127, (5000,), generator=g).float()),
                   torch.tensor([3.4028234663852886e38, 1.401298464324817e-45, 1.1754942e-38])])
    mids = (f.double() + next_up(f).double()) / 2
    top = torch.tensor([3.4028235677973366e38, 3.40282357e38, 1e300, 1e-50, 2.0**-150, 3 * 2.0**-151],
                       dtype=torch.float64)
    x = torch.cat([f.double(), mids, mids.nextafter(torch.tensor(math.inf, dtype=torch.float64)),
                   mids.nextafter(torch.tensor(-math.inf, dtype=torch.float64)), top])
    x = torch.cat([x, -x])
    assert_same_floats(fmt.cast(x), x.to(torch.float32))
    assert fmt.grid() is None
    assert fmt.code_dtype == torch.int64
    codes = fmt.quantize(f)
    assert torch.equal(codes, f.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)
    assert_same_floats(fmt.dequantize(codes), f)


# OCP Microscaling Formats (MX) v1.0, section 5.3.3, tables of element values (positive half).
OCP_FP4_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
OCP_FP6_E2M3 = [i / 8 for i in range(8)] + [1 + i / 8 for i in range(8)] + [2 + i / 4 for i in range(8)] + \
    [4 + i / 2 for i in range(8)]
OCP_FP6_E3M2 = [i / 16 for i in range(4)] + [2.0 ** (e - 3) * (1 + i / 4) for e in range(1, 8) for i in range(4)]


@pytest.mark.parametrize(
    "fmt,positive,maximum,min_sub",
    [(FP4_E2M1, OCP_FP4_E2M1, 6.0, 0.5), (FP6_E2M3, OCP_FP6_E2M3, 7.5, 0.125), (FP6_E3M2, OCP_FP6_E3M2, 28.0, 0.0625)],
    ids=["fp4_e2m1", "fp6_e2m3", "fp6_e3m2"],
)
def test_ocp_mx_tables(fmt, positive, maximum, min_sub):
    half = 2 ** (fmt.bits - 1)
    # codes 0..half-1 are the positive values in order, codes half.. the same with the sign bit set
    assert fmt.dequantize(torch.arange(half)).tolist() == positive
    neg = fmt.dequantize(torch.arange(half, 2 * half))
    assert neg.tolist() == [-v for v in positive] and torch.signbit(neg).all()
    assert fmt.grid().tolist() == sorted({-v for v in positive} | set(positive))
    assert (fmt.max_value, fmt.min_value, fmt.smallest_subnormal) == (maximum, -maximum, min_sub)
    assert torch.isfinite(fmt.dequantize(torch.arange(2 * half))).all()  # "none": no inf, no NaN
    assert fmt.round(torch.tensor([1e9, -math.inf])).tolist() == [maximum, -maximum]


def test_ties_go_to_even_mantissa_in_every_format():
    for fmt in ALL[1:]:
        grid = fmt.grid()
        lo, hi = grid[:-1], grid[1:]
        mids = (lo + hi) / 2
        got = fmt.round(mids).double()
        # exactly one neighbour of a midpoint has an even code (mantissa LSB 0); half to even picks it
        lo_even = (fmt.encode(lo.abs()).to(torch.int64) % 2) == 0
        hi_even = (fmt.encode(hi.abs()).to(torch.int64) % 2) == 0
        assert torch.equal(lo_even, ~hi_even), fmt.name
        assert torch.equal(got + 0.0, torch.where(lo_even, lo, hi) + 0.0), fmt.name


def test_round_saturates_keeps_signed_zero_and_nan():
    x = torch.tensor([1e6, -1e6, math.inf, -math.inf, -0.0, 0.0, -1e-30, math.nan])
    got = FP16.round(x)
    assert got[:4].tolist() == [65504.0, -65504.0, 65504.0, -65504.0]
    assert torch.signbit(got[4:7]).tolist() == [True, False, True] and (got[4:7] == 0).all()
    assert torch.isnan(got[7])
    assert got.dtype == x.dtype
    assert FP16.round(x.double()).dtype == torch.float64


def test_stochastic_rounding_is_unbiased_and_hits_neighbours():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 0.3)  # between fp8_e4m3 0.28125 and 0.3125 (gap 1/32)
    q = FP8_E4M3.round(x, "stochastic", gen)
    assert set(q.unique().tolist()) == {0.28125, 0.3125}
    p_up = (0.3 - 0.28125) / 0.03125
    sigma = math.sqrt(p_up * (1 - p_up) / x.numel()) * 0.03125
    assert abs(float(q.double().mean()) - 0.3) < 5 * sigma
    # same generator seed, same result
    q2 = FP8_E4M3.round(x, "stochastic", torch.Generator().manual_seed(0))
    assert torch.equal(q, q2)


def test_names_parse_and_protocol():
    for fmt in ALL:
        assert isinstance(fmt, NumberFormat)
        assert parse(fmt.name) == fmt and fmt.is_integer is False
    assert parse("fp8_e4m3fn") is FP8_E4M3 and parse("BF16") is BF16 and parse("half") is FP16
    assert [FP32.bits, FP16.bits, BF16.bits, FP8_E5M2.bits, FP6_E3M2.bits, FP4_E2M1.bits] == [32, 16, 16, 8, 6, 4]
    assert FP8_E5M2.max_value == 57344.0 and BF16.max_value == float(torch.finfo(torch.bfloat16).max)
    assert FP16.max_value == 65504.0 and FP32.max_value == float(torch.finfo(torch.float32).max)
    assert FP16.smallest_subnormal == 2.0**-24 and FP16.smallest_normal == float(torch.finfo(torch.float16).tiny)
    custom = parse("fp_e4m3")  # IEEE-style e4m3: top exponent reserved, max 1.875 * 2^7
    assert custom == MinifloatFormat(4, 3, 7, "ieee") and custom.max_value == 240.0 and custom.name == "fp_e4m3"
    biased = parse("fp_e4m3_b8_fn")
    assert biased.max_value == 224.0 and biased.smallest_subnormal == 2.0**-10 and parse(biased.name) == biased
    assert MinifloatFormat(3, 2, special="none") == FP6_E3M2 and MinifloatFormat(3, 2, special="none").name == "fp6_e3m2"


@pytest.mark.parametrize(
    "kwargs",
    [dict(exp_bits=0, man_bits=3), dict(exp_bits=9, man_bits=3), dict(exp_bits=4, man_bits=24),
     dict(exp_bits=4, man_bits=3, special="ieee-ish"), dict(exp_bits=1, man_bits=3),
     dict(exp_bits=8, man_bits=7, bias=-10), dict(exp_bits=5, man_bits=2, bias=200)],
)
def test_invalid_minifloats_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        MinifloatFormat(**kwargs)


def test_encode_rejects_values_off_grid_and_unstorable_specials():
    with pytest.raises(ConfigError, match="round"):
        FP8_E4M3.encode(torch.tensor([0.3]))
    with pytest.raises(ConfigError):
        FP8_E4M3.encode(torch.tensor([480.0]))
    with pytest.raises(NonFiniteError):
        FP4_E2M1.quantize(torch.tensor([math.nan]))
    with pytest.raises(NonFiniteError):
        FP8_E4M3.encode(torch.tensor([math.inf]))
    with pytest.raises(ConfigError):
        FP16.cast(torch.tensor([1.0]), overflow="wrap")


def test_fake_quantize_fp8_scale_one_equals_torch_cast():
    from lowbit.ops import dequantize, fake_quantize, quantize
    from lowbit.spec import QuantSpec

    g = torch.manual_seed(0)
    spec = QuantSpec("fp8_e4m3")
    x = torch.cat([torch.randn(4000, generator=g) * 50, ((FP8_E4M3.grid()[1:] + FP8_E4M3.grid()[:-1]) / 2).float()])
    one = torch.tensor(1.0)
    expected = x.to(torch.float8_e4m3fn)
    assert_same_floats(fake_quantize(x, one, None, spec), expected.float())
    codes = quantize(x, one, None, spec)
    assert torch.equal(codes, expected.view(torch.uint8))
    assert_same_floats(dequantize(codes, one, None, spec), expected.float())


def _ort_fp8_roundtrip(x: torch.Tensor, onnx_type: int) -> torch.Tensor:
    """ONNX Runtime QuantizeLinear(saturate=1) -> DequantizeLinear at scale 1 (opset 19)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    zp = helper.make_tensor("zp", onnx_type, [], [0.0])
    sc = helper.make_tensor("sc", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["q"], saturate=1),
        helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], initializer=[zp, sc],
    )
    # IR 9 (ONNX 1.14): older ONNX Runtime releases refuse the newest IR version that onnx writes by default
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("fmt,onnx_name", [(FP8_E4M3, "FLOAT8E4M3FN"), (FP8_E5M2, "FLOAT8E5M2")],
                         ids=["e4m3fn", "e5m2"])
def test_round_equals_onnxruntime_quantize_linear_saturate(fmt, onnx_name):
    from onnx import TensorProto

    x = _probe_inputs(fmt, seed=2)
    assert_same_floats(fmt.round(x), _ort_fp8_roundtrip(x, getattr(TensorProto, onnx_name)))


def _field_value(code: int, e: int, m: int, bias: int, special: str) -> float:
    """IEEE754 section 3.4 decoding of one bit pattern in plain Python (independent of MinifloatFormat)."""
    sign, field, mant = code >> (e + m), (code >> m) & (2**e - 1), code & (2**m - 1)
    if field == 2**e - 1 and special == "ieee":
        return math.inf * (-1) ** sign if mant == 0 else math.nan
    if field == 2**e - 1 and special == "fn" and mant == 2**m - 1:
        return math.nan
    v = math.ldexp(mant, 1 - bias - m) if field == 0 else math.ldexp(2**m + mant, field - bias - m)
    return -v if sign else v


CUSTOM = ["fp_e5m0", "fp_e4m0_fn", "fp_e3m3_b2_fn", "fp_e4m3", "fp_e2m2_none", "fp_e3m4_b5", "fp_e5m3_fn",
          "fp6_e3m2", "fp4_e2m1"]


@pytest.mark.parametrize("name", CUSTOM)
def test_custom_minifloats_decode_encode_and_round_like_the_closed_form(name):
    fmt = parse(name)
    e, m, bias = fmt.exp_bits, fmt.man_bits, fmt.bias
    codes = list(range(2**fmt.bits))
    want = torch.tensor([_field_value(c, e, m, bias, fmt.special) for c in codes], dtype=torch.float32)
    assert_same_floats(fmt.dequantize(torch.tensor(codes)), want)
    finite = torch.isfinite(want)
    assert fmt.max_value == float(want[finite].max()) and fmt.min_value == float(want[finite].min())
    assert torch.equal(fmt.encode(want[finite]), torch.tensor(codes)[finite].to(fmt.code_dtype))
    if bool(torch.isnan(want).any()):
        assert torch.isnan(fmt.dequantize(fmt.encode(torch.tensor([math.nan])))).all()
    else:
        with pytest.raises(NonFiniteError):
            fmt.encode(torch.tensor([math.nan]))
    # round(): brute-force nearest finite value, ties to the even code, saturating at +-max. Without mantissa
    # bits the significand is 1 for every non-zero value, so a tie goes to the larger magnitude (the even
    # significand 2 * 2^k; torch.float8_e8m0fnu and ml_dtypes do this), except between 0 and the smallest value.
    vals = want[finite].double()
    even = torch.tensor(codes)[finite] % 2 == 0
    pos = torch.unique(vals.abs())
    g = torch.Generator().manual_seed(0)
    x = torch.cat([(pos[1:] + pos[:-1]) / 2, pos, torch.rand(2000, generator=g, dtype=torch.float64) * 1.2 * fmt.max_value,
                   torch.tensor([fmt.max_value * 4, math.inf, fmt.smallest_subnormal / 2])])
    x = torch.cat([x, x.nextafter(torch.tensor(math.inf, dtype=torch.float64)), -x])
    dist = (x[:, None].clamp(fmt.min_value, fmt.max_value) - vals[None, :]).abs()
    best = dist == dist.min(1, keepdim=True).values
    if m == 0:  # among tied candidates: 0 if it is one, else the larger magnitude
        key = torch.where(vals == 0, math.inf, vals.abs())[None, :].expand_as(best)
        pick = torch.where(best, key, -1.0).argmax(1)
    else:
        pick = torch.where((best & even).any(1, keepdim=True), best & even, best).double().argmax(1)
    expected = torch.copysign(vals[pick].abs(), x)  # the sign of zero follows x
    assert_same_floats(fmt.round(x), expected)


@pytest.mark.parametrize(
    "fmt,ml_name,overflow",
    [(FP4_E2M1, "float4_e2m1fn", "saturate"), (FP6_E2M3, "float6_e2m3fn", "saturate"),
     (FP6_E3M2, "float6_e3m2fn", "saturate"), (parse("fp_e3m4"), "float8_e3m4", "inf"),
     (parse("fp_e4m3"), "float8_e4m3", "inf")],
    ids=["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp_e3m4", "fp_e4m3"],
)
def test_cast_matches_ml_dtypes_bit_for_bit(fmt, ml_name, overflow):
    """ml_dtypes (an onnx dependency) as an independent implementation of the OCP MX fp4/fp6 (saturating)
    and IEEE-style fp8 e3m4 / e4m3 (overflow to inf) conversions; torch cannot cast to these."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    dtype = getattr(ml_dtypes, ml_name)
    x = _probe_inputs(fmt, seed=3)
    if fmt.special == "none":
        x = x[~torch.isnan(x)]  # no NaN code (ml_dtypes turns NaN into an arbitrary value)
    ref = x.numpy().astype(dtype)
    assert_same_floats(fmt.cast(x, overflow), torch.from_numpy(ref.astype(np.float32)))
    ok = torch.from_numpy(np.isfinite(ref.astype(np.float32)))
    want = torch.from_numpy(ref.view(np.uint8).astype(np.int64))[ok]
    assert torch.equal(fmt.encode(fmt.cast(x, overflow)[ok]).to(torch.int64), want)
