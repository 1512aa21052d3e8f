"""Fixed-point requantization against a float64 reference, closed-form ties, and properties."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import ConfigError
from lowbit.runtime.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    FixedPointMultiplier,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantize_fixed_point,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _tflite_quantize_multiplier(m: float) -> tuple[int, int]:
    """Scalar transcription of TFLite's QuantizeMultiplier (std::frexp + std::round)."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    q_fixed = int(math.floor(q * (1 << 31) + 0.5))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def test_quantize_multiplier_matches_scalar_reference_and_is_accurate():
    gen = torch.Generator().manual_seed(0)
    m = torch.exp(torch.empty(4000, dtype=torch.float64).uniform_(-20, 8, generator=gen))
    fp = quantize_multiplier(m)
    ref = [_tflite_quantize_multiplier(float(v)) for v in m]
    assert fp.multiplier.tolist() == [r[0] for r in ref]
    assert fp.shift.tolist() == [r[1] for r in ref]
    assert bool(((fp.multiplier >= 2**30) & (fp.multiplier < 2**31)).all())
    rel = (fp.to_float() - m).abs() / m
    assert float(rel.max()) <= 2.0**-31  # half a Q31 step relative to M0 >= 0.5


def test_quantize_multiplier_carry_and_special_values():
    # 1 - 2^-40 rounds up to 2^31 in Q31: halved, shift incremented -> exactly 1.0.
    fp = quantize_multiplier(torch.tensor([1.0 - 2.0**-40, 0.0, 2.0**-40, 1.0]))
    assert fp.multiplier.tolist() == [2**30, 0, 0, 2**30]
    assert fp.shift.tolist() == [1, 0, 0, 1]
    # q * 2^31 = 2^30 + 1/2 and 2^30 + 3/2: std::round goes away from zero (2^30 + 1), not to even (2^30)
    tie = quantize_multiplier(torch.tensor([0.5 + 2.0**-32, 0.5 + 3 * 2.0**-32], dtype=torch.float64))
    assert tie.multiplier.tolist() == [2**30 + 1, 2**30 + 2] and tie.shift.tolist() == [0, 0]
    with pytest.raises(ConfigError, match="finite"):
        quantize_multiplier(torch.tensor([-0.5]))
    with pytest.raises(ConfigError, match="left shift"):
        quantize_multiplier(torch.tensor([2.0**40]))


def test_srdhm_closed_form_and_saturation():
    a = torch.tensor([3, -3, 1 << 30, INT32_MIN, INT32_MIN, INT32_MAX])
    b = torch.tensor([1 << 30, 1 << 30, 1 << 30, INT32_MIN, INT32_MAX, INT32_MAX])
    out = saturating_rounding_doubling_high_mul(a, b).tolist()
    # 3 * 0.5 = 1.5 -> 2; -1.5 -> -1 (nudge ties toward +inf); 2^30 * 0.5 = 2^29; -2^31 * -2^31 saturates.
    assert out[:4] == [2, -1, 1 << 29, INT32_MAX]
    assert out[4] == -(INT32_MAX)  # -2^31 * (2^31 - 1) / 2^31 = -(2^31 - 1) exactly
    assert out[5] == INT32_MAX - 1  # (2^31-1)^2 / 2^31 = 2^31 - 2 + 2^-31 -> 2^31 - 2


def test_rounding_divide_by_pot_ties_away_from_zero():
    x = torch.tensor([5, -5, 6, -6, 7, -7, 12, -12, 0, INT32_MAX, INT32_MIN])
    assert rounding_divide_by_pot(x, 1).tolist() == [3, -3, 3, -3, 4, -4, 6, -6, 0, 2**30, -(2**30)]
    assert rounding_divide_by_pot(torch.tensor([6, -6, 5, -5]), 2).tolist() == [2, -2, 1, -1]
    # per-element exponents broadcast
    assert rounding_divide_by_pot(torch.tensor([10, 10, 10]), torch.tensor([0, 1, 2])).tolist() == [10, 5, 3]


def test_documented_ties_of_the_full_requantization():
    """Exact ties: with a right shift they round half away from zero; M in [0.5, 1) has no right shift,
    so a tie rounds toward +inf inside SRDHM (gemmlowp)."""
    quarter = quantize_multiplier(torch.tensor(0.25))
    assert multiply_by_quantized_multiplier(torch.tensor([2, -2, 6, -6, 10, -10]), quarter).tolist() == [
        1, -1, 2, -2, 3, -3]
    half = quantize_multiplier(torch.tensor(0.5))
    assert multiply_by_quantized_multiplier(torch.tensor([1, -1, 3, -3]), half).tolist() == [1, 0, 2, -1]
    three = quantize_multiplier(torch.tensor(3.0))  # M > 1: left shift 2, then * 0.75
    assert multiply_by_quantized_multiplier(torch.tensor([5, -5, 1000]), three).tolist() == [15, -15, 3000]


def test_millions_of_accumulators_within_one_step_of_float64():
    gen = torch.Generator().manual_seed(1)
    n = 2_000_000
    acc = torch.randint(-(2**24), 2**24, (n,), generator=gen, dtype=torch.int64)
    acc[:1000] = torch.randint(INT32_MIN, INT32_MAX, (1000,), generator=gen, dtype=torch.int64)
    # per-element multipliers spanning (2^-20, 1) and a few > 1
    m = torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(-20, 0, generator=gen))
    m[-1000:] = torch.empty(1000, dtype=torch.float64).uniform_(1.0, 8.0, generator=gen)
    acc[-1000:] = torch.randint(-(2**20), 2**20, (1000,), generator=gen, dtype=torch.int64)
    fp = quantize_multiplier(m)
    got = multiply_by_quantized_multiplier(acc, fp).numpy()
    ref = _round_half_away(acc.double().numpy() * m.numpy())
    diff = np.abs(got - ref)
    assert diff.max() <= 1
    # gemmlowp rounds twice (SRDHM, then the right shift): about 2.5% of results land one step off.
    assert (diff > 0).mean() < 0.05
    # against the represented multiplier the integer path is exact except at near-ties
    ref_rep = _round_half_away(acc.double().numpy() * fp.to_float().numpy())
    assert np.abs(got - ref_rep).max() <= 1


def _gemmlowp_exact(x: int, m0: int, shift: int) -> int:
    """TFLite ``MultiplyByQuantizedMultiplier(x, m0, shift)`` in closed form with Python integers and
    fractions (not the nudge / mask code): ``a = sat_int32(x 2^left)``; ``SRDHM = floor(a m0 / 2^31 + 1/2)``
    (the nudge-and-truncate rounds every tie toward +inf), ``2^31 - 1`` for ``a = m0 = -2^31``; then
    ``SRDHM / 2^right`` rounded half away from zero."""
    left, right = max(shift, 0), max(-shift, 0)
    a = min(max(x * 2**left, INT32_MIN), INT32_MAX)
    high = INT32_MAX if a == m0 == INT32_MIN else math.floor(Fraction(a * m0, 2**31) + Fraction(1, 2))
    r = math.floor(Fraction(abs(high), 2**right) + Fraction(1, 2))
    return r if high >= 0 else -r


def test_bit_exact_with_gemmlowp_closed_form():
    """Every result equal to the closed form (a rounding or saturation slip is one step, which the
    float64 comparisons above allow): int32 extremes, both signs, exact ties at both stages, multipliers
    from 2^-33 (rounded to zero) to 2^30 (left shift 31), the carry case, and per-element shifts."""
    rng = np.random.default_rng(0)
    n = 6000
    m = np.exp2(rng.uniform(-33, 31, n))
    e = np.arange(64) % 32
    m[:64] = np.exp2(-e.astype(np.float64))  # M = 2^-e: exact ties below
    m[64:72] = [2.0**-32, 2.0**-31, 2.0**-32 * 0.99, 1.0 - 2.0**-40, 0.5, 1.0, 2.0**30, 2.0**31 - 1.0]
    x = rng.integers(INT32_MIN, INT32_MAX, n, endpoint=True)
    # odd * 2^(e-1): x M = odd / 2, a tie after the shift (and a tie inside SRDHM for e = 1)
    x[:64] = [(2 * int(r) % 2 ** (32 - max(k - 1, 0)) - 2 ** (31 - max(k - 1, 0)) + 1) * 2 ** max(k - 1, 0)
              for r, k in zip(rng.integers(0, 2**31, 64), e)]
    x[72:400] = rng.integers(-600, 601, 328)
    x[400:410] = [INT32_MIN, INT32_MAX, INT32_MIN + 1, -1, 1, 0, INT32_MIN, INT32_MAX, 3, -3]
    fp = quantize_multiplier(torch.from_numpy(m))
    got = multiply_by_quantized_multiplier(torch.from_numpy(x), fp).tolist()
    ref = [_gemmlowp_exact(int(a), int(q), int(e)) for a, q, e in zip(x, fp.multiplier, fp.shift)]
    assert got == ref
    assert set(fp.shift.tolist()) >= {-31, 0, 1, 31} and (fp.multiplier == 0).any()
    # requantization: saturation at both ends of int8 and uint8 with zero points at the edges
    acc = torch.from_numpy(x[72:400])
    m_out = quantize_multiplier(torch.tensor(0.7))
    exact = np.array([_gemmlowp_exact(int(a), int(m_out.multiplier), int(m_out.shift)) for a in acc])
    for qmin, qmax in ((-128, 127), (0, 255)):
        for z in (qmin, qmax, (qmin + qmax) // 2):
            out = requantize_fixed_point(acc, m_out, z, qmin, qmax).numpy()
            np.testing.assert_array_equal(out, np.clip(exact + z, qmin, qmax))
            assert out.min() == qmin and out.max() == qmax


def test_user_errors_raise_config_error():
    with pytest.raises(ConfigError, match=r"\[0, 31\]"):
        rounding_divide_by_pot(torch.tensor([5, -5]), -1)
    with pytest.raises(ConfigError, match=r"\[0, 31\]"):
        rounding_divide_by_pot(torch.tensor([5, -5]), torch.tensor([3, 32]))
    fp = quantize_multiplier(torch.tensor(0.5))
    with pytest.raises(ConfigError, match="integer accumulators"):
        multiply_by_quantized_multiplier(torch.tensor([2.7, -2.7]), fp)
    with pytest.raises(ConfigError, match="int32 values"):
        multiply_by_quantized_multiplier(torch.tensor([2**40]), fp)
    with pytest.raises(ConfigError, match=r"\[-31, 31\]"):
        multiply_by_quantized_multiplier(torch.tensor([3]), FixedPointMultiplier(fp.multiplier, torch.tensor(40)))
    with pytest.raises(ConfigError, match="zero point 300"):
        requantize_fixed_point(torch.tensor([100]), fp, 300, -128, 127)
    with pytest.raises(ConfigError, match="left shift"):  # rounds up to 2^31 in Q31: shift 32
        quantize_multiplier(torch.tensor(2.0**31 - 2.0**-22, dtype=torch.float64))


def test_per_channel_broadcast_equals_per_channel_loop():
    gen = torch.Generator().manual_seed(2)
    acc = torch.randint(-(2**20), 2**20, (4, 6, 5), generator=gen)
    m = torch.rand(6, generator=gen, dtype=torch.float64) * 0.01 + 1e-4
    fp = quantize_multiplier(m.reshape(1, 6, 1))
    full = requantize_fixed_point(acc, fp, zero_point=3, qmin=-128, qmax=127)
    for c in range(6):
        one = requantize_fixed_point(acc[:, c], quantize_multiplier(m[c]), 3, -128, 127)
        assert torch.equal(full[:, c], one)
    assert int(full.min()) >= -128 and int(full.max()) <= 127


@given(
    x=st.integers(-(2**24), 2**24),
    m=st.floats(min_value=2.0**-24, max_value=0.999, allow_nan=False),
)
def test_property_within_one_step_and_odd_symmetry_away_from_ties(x, m):
    fp = quantize_multiplier(torch.tensor(m, dtype=torch.float64))
    got = int(multiply_by_quantized_multiplier(torch.tensor([x]), fp)[0])
    exact = x * float(fp.to_float())
    assert abs(got - exact) <= 1.0
    # gemmlowp rounds twice: the doubling high multiply rounds x * M0 / 2^31 (a tie there goes up for
    # x > 0 and toward zero for x < 0), then the shift rounds again. Away from ties at both stages the
    # result is odd-symmetric: f(-x) = -f(x). (x=1, M=0.25 is a first-stage tie: f(1)=1, f(-1)=0.)
    stage1 = Fraction(x * int(fp.multiplier), 2**31)
    if abs(abs(exact) % 1.0 - 0.5) > 1e-6 and stage1.denominator != 2:
        assert int(multiply_by_quantized_multiplier(torch.tensor([-x]), fp)[0]) == -got


def test_first_stage_tie_is_asymmetric_as_in_gemmlowp():
    fp = quantize_multiplier(torch.tensor(0.25, dtype=torch.float64))
    assert int(multiply_by_quantized_multiplier(torch.tensor([1]), fp)[0]) == 1
    assert int(multiply_by_quantized_multiplier(torch.tensor([-1]), fp)[0]) == 0


@given(x=st.integers(-(2**20), 2**20), y=st.integers(-(2**20), 2**20),
       m=st.floats(min_value=2.0**-16, max_value=4.0, allow_nan=False))
def test_property_monotone(x, y, m):
    fp = quantize_multiplier(torch.tensor(m, dtype=torch.float64))
    lo, hi = min(x, y), max(x, y)
    out = multiply_by_quantized_multiplier(torch.tensor([lo, hi]), fp)
    assert int(out[0]) <= int(out[1])


@given(e=st.integers(0, 30), x=st.integers(INT32_MIN, INT32_MAX))
def test_property_rounding_divide_matches_exact_rational(e, x):
    got = int(rounding_divide_by_pot(torch.tensor([x]), e)[0])
    q, r = divmod(abs(x), 1 << e)
    expect = q + (1 if 2 * r >= (1 << e) else 0)
    assert got == (expect if x >= 0 else -expect)
