"""Fixed-point requantization: a real multiplier as a 32-bit integer multiplier and a power-of-two shift.

An integer kernel accumulates ``acc = sum((x - z_x) * (w - z_w)) + bias`` in int32; the output code is
``y = z_y + round(acc * M)`` with the real multiplier ``M = s_x * s_w / s_y``. Integer-only hardware
(gemmlowp, TFLite, the Arm/Qualcomm DSP kernels) cannot multiply by a float, so ``M`` is stored as::

    M ~= M0 * 2^(shift - 31),   M0 in [2^30, 2^31) an int32 (a Q31 number in [0.5, 1)),

and ``acc * M`` is computed with two integer steps (gemmlowp ``fixedpoint.h``):

1. ``SaturatingRoundingDoublingHighMul(a, M0) = (a * M0 + nudge) / 2^31`` truncated toward zero, with
   ``nudge = 2^30`` for ``a * M0 >= 0`` and ``1 - 2^30`` otherwise; the single overflow case
   ``a = M0 = -2^31`` saturates to ``2^31 - 1``. A tie here rounds toward +inf.
2. ``RoundingDivideByPOT(v, e)``: ``v / 2^e`` rounded half away from zero.

For ``shift > 0`` (``M >= 1``) the accumulator is first multiplied by ``2^shift`` (saturated to int32),
as TFLite's ``MultiplyByQuantizedMultiplier`` does. Every function here is vectorized over torch int64
tensors (int32 values held in int64 so the products are exact), so per-channel multipliers broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = [
    "FixedPointMultiplier",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "multiply_by_quantized_multiplier",
    "requantize_fixed_point",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class FixedPointMultiplier:
    """``M ~= multiplier * 2^(shift - 31)``; ``multiplier`` int64 tensor of Q31 values in [2^30, 2^31)
    (0 for ``M == 0``), ``shift`` int64 tensor of the same shape (positive means left shift)."""

    multiplier: torch.Tensor
    shift: torch.Tensor

    def to_float(self) -> torch.Tensor:
        """The real multiplier this pair represents, float64: ``multiplier * 2^(shift - 31)``."""
        return self.multiplier.double() * torch.pow(2.0, (self.shift - 31).double())


def quantize_multiplier(real_multiplier: torch.Tensor | float) -> FixedPointMultiplier:
    """Q31 multiplier and shift of each real multiplier (TFLite ``QuantizeMultiplier``), vectorized.

    ``M = q * 2^shift`` with ``q in [0.5, 1)`` (``frexp``); ``M0 = round_half_away(q * 2^31)``; when the
    rounding reaches ``2^31`` it is halved and ``shift`` incremented. Multipliers below ``2^-32`` become
    ``(0, 0)`` (they round every int32 to zero). Accepts any shape; returns int64 tensors of that shape.

    >>> fp = quantize_multiplier(torch.tensor([0.5, 0.75, 3.0]))
    >>> fp.multiplier.tolist(), fp.shift.tolist()
    ([1073741824, 1610612736, 1610612736], [0, 0, 2])
    """
    m = torch.as_tensor(real_multiplier, dtype=torch.float64)
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ConfigError(
            f"requantization multipliers must be finite and >= 0, got {m.flatten()[:8].tolist()}; "
            "check that the scales s_x, s_w, s_y are positive and finite."
        )
    q, exp = torch.frexp(m)
    # q * 2^31 is exact in float64 (q has 53 bits); floor(v + 0.5) is round half away from zero for v >= 0.
    q_fixed = torch.floor(q * 2.0**31 + 0.5).to(torch.int64)
    shift = exp.to(torch.int64)
    carry = q_fixed == 2**31
    q_fixed = torch.where(carry, q_fixed // 2, q_fixed)
    shift = torch.where(carry, shift + 1, shift)
    if bool((shift > 31).any()):  # M >= 2^31 - 2^-22 (the carry of a multiplier just below 2^31 included)
        raise ConfigError(
            f"a requantization multiplier of {float(m.max()):g} needs a left shift beyond 31 bits; "
            "the output scale is far too small for the inputs' scales - recalibrate the output range."
        )
    tiny = (shift < -31) | (m == 0)
    q_fixed = torch.where(tiny, torch.zeros_like(q_fixed), q_fixed)
    shift = torch.where(tiny, torch.zeros_like(shift), shift)
    return FixedPointMultiplier(q_fixed, shift)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2^31)`` for int32 values in int64.

    Ties round toward +inf (the nudge is ``2^30`` or ``1 - 2^30`` before a truncating division);
    ``a = b = -2^31`` saturates to ``2^31 - 1``. Broadcasts; returns int64 holding int32 values.
    """
    a = a.to(torch.int64)
    b = torch.as_tensor(b, dtype=torch.int64, device=a.device)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30, device=a.device), torch.tensor(1 - (1 << 30), device=a.device))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    return torch.where(overflow, torch.full_like(high, INT32_MAX), high)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away from zero.

    ``exponent`` in [0, 31] (else :class:`ConfigError`), scalar or broadcastable to ``x``. int64 in, int64 out.

    >>> rounding_divide_by_pot(torch.tensor([5, -5, 6, -6, 7]), 1).tolist()
    [3, -3, 3, -3, 4]
    """
    x = x.to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    if e.numel() and (int(e.min()) < 0 or int(e.max()) > 31):
        raise ConfigError(
            f"rounding_divide_by_pot exponents must lie in [0, 31], got [{int(e.min())}, {int(e.max())}]; "
            "a multiplier's shift comes from quantize_multiplier, which keeps it in [-31, 31]."
        )
    mask = torch.bitwise_left_shift(torch.ones_like(e), e) - 1
    remainder = torch.bitwise_and(x, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).to(torch.int64)
    return torch.bitwise_right_shift(x, e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, fp: FixedPointMultiplier) -> torch.Tensor:
    """``round(x * M)`` in integer arithmetic (TFLite ``MultiplyByQuantizedMultiplier``).

    ``x``: int32 values (any int dtype; floats or values beyond int32 raise :class:`ConfigError`); ``fp``
    broadcastable to ``x`` (per-channel multipliers: shape them ``(C, 1, ...)`` against ``x``'s channel
    axis), ``shift`` in [-31, 31]. For ``shift > 0`` ``x * 2^shift`` is saturated to int32 first (TFLite), so
    the result is within one step of ``round(x * fp.to_float())`` whenever ``x * 2^max(shift, 0)`` fits in
    int32. Returns int64.

    >>> fp = quantize_multiplier(torch.tensor(0.25))
    >>> multiply_by_quantized_multiplier(torch.tensor([2, -2, 6, -6]), fp).tolist()
    [1, -1, 2, -2]
    """
    if x.is_floating_point() or x.is_complex():
        raise ConfigError(
            f"multiply_by_quantized_multiplier takes integer accumulators, got a {x.dtype} tensor; round or "
            "convert them to an integer dtype first (a float input would be truncated silently)."
        )
    x = x.to(torch.int64)
    if x.numel() and (int(x.min()) < INT32_MIN or int(x.max()) > INT32_MAX):
        raise ConfigError(
            f"accumulators must be int32 values, got the range [{int(x.min())}, {int(x.max())}]; an int32 kernel "
            "would overflow there - wrap or clamp them as the target kernel does, or use smaller scales/codes."
        )
    shift = fp.shift.to(x.device)
    if fp.shift.numel() and (int(fp.shift.min()) < -31 or int(fp.shift.max()) > 31):
        raise ConfigError(
            f"fixed-point shifts must lie in [-31, 31], got [{int(fp.shift.min())}, {int(fp.shift.max())}]; "
            "build the multiplier with quantize_multiplier."
        )
    left = torch.clamp(shift, min=0)
    right = torch.clamp(-shift, min=0)
    shifted = torch.clamp(x * torch.bitwise_left_shift(torch.ones_like(left), left), INT32_MIN, INT32_MAX)
    high = saturating_rounding_doubling_high_mul(shifted, fp.multiplier.to(x.device))
    return rounding_divide_by_pot(high, right)


def requantize_fixed_point(
    acc: torch.Tensor, fp: FixedPointMultiplier, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """Output codes ``clamp(z + round(acc * M), qmin, qmax)`` with integer-only rounding. int64 out.

    ``acc``: int32 values; ``qmin <= zero_point <= qmax`` (else :class:`ConfigError`)."""
    if not int(qmin) <= int(zero_point) <= int(qmax):
        raise ConfigError(
            f"zero point {int(zero_point)} is outside the output range [{int(qmin)}, {int(qmax)}]; the zero point "
            "must be a code of the output type (e.g. -128..127 for int8, 0..255 for uint8)."
        )
    return torch.clamp(multiply_by_quantized_multiplier(acc, fp) + int(zero_point), qmin, qmax)
