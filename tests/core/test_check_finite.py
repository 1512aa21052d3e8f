"""``lowbit.errors.check_finite`` (one aminmax pass) against ``torch.isfinite(x).all()``, and the clipped
straight-through estimator of ``fake_quantize`` against the expression it replaced."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import NonFiniteError, PerChannel, QuantSpec
from lowbit.errors import check_finite
from lowbit.ops import fake_quantize, quantization_bounds

_FLOATS = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                    st.sampled_from([3.4e38, -3.4e38, 1e-45, -0.0, math.inf, -math.inf, math.nan]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_FLOATS, min_size=1, max_size=12), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_check_finite_agrees_with_isfinite(values, dtype):
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    finite = bool(torch.isfinite(x).all())
    if finite:
        check_finite(x, "x")  # no false positive, also for +-3.4e38 side by side (no overflow)
    else:
        with pytest.raises(NonFiniteError, match=r"x contains \d+ NaN and \d+ Inf values"):
            check_finite(x, "x")


def test_check_finite_counts_and_skips_what_has_no_nan():
    with pytest.raises(NonFiniteError, match="2 NaN and 1 Inf values out of 5"):
        check_finite(torch.tensor([1.0, math.nan, -math.inf, math.nan, 0.0]), "t")
    check_finite(torch.empty(0), "empty")
    check_finite(torch.tensor([1, 2, 3]), "ints")


def _old_ste(x, scale, zp, spec):
    """The expression ``fake_quantize`` used before ``_ClippedSTE`` (value y, gradient 1 inside the range)."""
    with torch.no_grad():
        y = fake_quantize(x.detach(), scale, zp, spec)
    from lowbit.ops import _blocks, _codes_and_mask

    xb, s, z = _blocks(x.float(), scale, zp, spec.granularity)
    with torch.no_grad():
        _, inside = _codes_and_mask(xb / s, z, spec.format, spec.rounding, None, want_mask=True)
    if inside is None:
        lo, hi = quantization_bounds(s, z, spec.format)
        inside = (xb >= lo) & (xb <= hi)
    yb = y.reshape(xb.shape)
    return (yb + torch.where(inside, -(xb.detach() - xb), -0.0)).reshape(x.shape)


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("uint8", symmetric=False),
                                  QuantSpec("int4", granularity=PerChannel(0)), QuantSpec("fp8_e4m3")],
                         ids=["int8", "uint8-affine", "int4-channel", "fp8"])
def test_clipped_ste_same_value_and_gradient_as_before(spec):
    torch.manual_seed(0)
    x0 = torch.randn(8, 16) * 4
    x0[0, 0], x0[1, 1], x0[2, 2], x0[3, 3] = math.inf, 1e30, -1e30, math.nan
    per_channel = isinstance(spec.granularity, PerChannel)
    scale = torch.full((8, 1), 0.05) if per_channel else torch.tensor(0.05)
    zp = torch.zeros_like(scale, dtype=torch.int32) if spec.symmetric else torch.full_like(scale, 100, dtype=torch.int32)
    g = torch.randn(8, 16)
    got, ref = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    y_got, y_ref = fake_quantize(got, scale, zp, spec), _old_ste(ref, scale, zp, spec)
    y_got.backward(g)
    y_ref.backward(g)
    assert torch.equal(y_got.detach().nan_to_num(7.0), y_ref.detach().nan_to_num(7.0))
    assert torch.equal(got.grad.nan_to_num(7.0), ref.grad.nan_to_num(7.0))
    assert torch.equal(got.grad.signbit(), ref.grad.signbit())
    assert 0 < int((got.grad == 0).sum()) < got.numel()  # some clipped, some not: the mask matters
