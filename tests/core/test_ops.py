"""fake_quantize / quantize / dequantize against torch's own fake-quant ops and closed forms."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit import ConfigError, PerChannel, PerGroup, PerTensor, QuantSpec, ShapeMismatchError
from lowbit.granularity import reduce_blocks
from lowbit.ops import dequantize, fake_quantize, fake_quantize_lsq, quantize
from lowbit.spec import compute_qparams

INT_CASES = [("int8", -128, 127), ("uint8", 0, 255)]


def adversarial(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    # exact ties at power-of-two scale 2^-4, huge values that saturate, signed zeros, denormals
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) / 16
    extra = torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-40, -1e-40, 7.96875, -8.0, 8.03125])
    return torch.cat([x, ties, extra])


@pytest.mark.parametrize("fmt,qmin,qmax", INT_CASES)
@pytest.mark.parametrize("scale", [2.0**-4, 2.0**-7, 1.0])
def test_per_tensor_bit_exact_with_torch_power_of_two_scales(fmt, qmin, qmax, scale):
    x = adversarial()
    for zp in (qmin, (qmin + qmax) // 2, qmax):
        spec = QuantSpec(fmt, symmetric=False)
        ours = fake_quantize(x, torch.tensor(scale), torch.tensor(zp, dtype=torch.int32), spec)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        assert torch.equal(ours, ref), (fmt, scale, zp)


@pytest.mark.parametrize("fmt,qmin,qmax", INT_CASES)
def test_per_tensor_random_scales_match_torch_except_reciprocal_ties(fmt, qmin, qmax):
    """torch multiplies by 1/s, ONNX divides by s: they may differ by exactly one step, only at ties."""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(20000, generator=g) * float(torch.rand(1, generator=g) * 10)
        spec = QuantSpec(fmt, symmetric=False)
        s, z = compute_qparams(spec, x.min(), x.max())
        ours = fake_quantize(x, s, z, spec)
        ref = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
        diff = (ours - ref).abs()
        assert float(diff.max()) <= float(s) * 1.0001
        mismatch = diff > 0
        if mismatch.any():  # only where x/s sits within float rounding of a .5 tie
            frac = (x[mismatch] / s) - torch.floor(x[mismatch] / s)
            assert torch.allclose(frac, torch.full_like(frac, 0.5), atol=1e-3)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("fmt,qmin,qmax", INT_CASES)
def test_per_channel_bit_exact_with_torch(axis, fmt, qmin, qmax):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.rand(16, 1, 1, 1, generator=g) * 4
    w[3] = 0.0  # an all-zero channel: scale floor, no NaN
    spec = QuantSpec(fmt, symmetric=(fmt == "int8"), granularity=PerChannel(axis))
    lo = reduce_blocks(w, spec.granularity, "amin")
    hi = reduce_blocks(w, spec.granularity, "amax")
    s, z = compute_qparams(spec, lo, hi)
    # power-of-two scales make 1/s exact, so torch's multiply and our divide agree bit for bit
    s = torch.exp2(torch.round(torch.log2(s)))
    ours = fake_quantize(w, s, z, spec)
    ref = torch.fake_quantize_per_channel_affine(w, s, z, axis, qmin, qmax)
    assert torch.equal(ours, ref)
    assert torch.isfinite(ours).all()


def test_per_group_matches_reshaped_per_channel():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 32, generator=g)
    spec = QuantSpec("int4", symmetric=True, granularity=PerGroup(8))
    lo, hi = reduce_blocks(w, spec.granularity, "amin"), reduce_blocks(w, spec.granularity, "amax")
    assert lo.shape == (6, 4)
    s, z = compute_qparams(spec, lo, hi)
    ours = fake_quantize(w, s, z, spec)
    # reference: each group is its own row, quantized per row by torch
    rows = w.reshape(24, 8)
    ref = torch.fake_quantize_per_channel_affine(rows, s.reshape(24), z.reshape(24), 0, -8, 7)
    assert torch.allclose(ours, ref.reshape(6, 32), atol=0, rtol=0) or (ours - ref.reshape(6, 32)).abs().max() <= s.max()
    # closed form per group: max |w| of each group maps to +-7 exactly
    amax = w.reshape(6, 4, 8).abs().amax(-1)
    assert torch.allclose(s, amax / 7)


def test_quantize_dequantize_roundtrip_and_codes():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 3.0])
    spec = QuantSpec("uint8", symmetric=False)
    s, z = compute_qparams(spec, x.min(), x.max())
    q = quantize(x, s, z, spec)
    assert q.dtype == torch.uint8
    assert int(q[2]) == int(z)  # zero is exactly representable
    assert float(dequantize(q, s, z, spec)[2]) == 0.0
    assert torch.equal(dequantize(q, s, z, spec), fake_quantize(x, s, z, spec))


def test_compute_qparams_closed_form():
    spec = QuantSpec("uint8", symmetric=False)
    s, z = compute_qparams(spec, torch.tensor(-1.0), torch.tensor(3.0))
    assert torch.isclose(s, torch.tensor(4.0 / 255)) and int(z) == 64
    s, z = compute_qparams(QuantSpec("int8"), torch.tensor(-2.54), torch.tensor(1.0))
    assert torch.isclose(s, torch.tensor(0.02)) and int(z) == 0
    # positive-only range still includes zero; constant and all-zero tensors give finite scales
    s, z = compute_qparams(spec, torch.tensor(2.0), torch.tensor(2.0))
    assert torch.isclose(s, torch.tensor(2.0 / 255)) and int(z) == 0
    s, z = compute_qparams(spec, torch.tensor(0.0), torch.tensor(0.0))
    assert torch.isfinite(s) and float(s) > 0


def test_ste_gradient_equals_torch_fake_quant_gradient():
    g = torch.Generator().manual_seed(4)
    x1 = (torch.randn(1000, generator=g) * 2).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    spec = QuantSpec("uint8", symmetric=False)
    s, z = torch.tensor(2.0**-5), torch.tensor(100, dtype=torch.int32)
    up = torch.randn(1000, generator=g)
    (fake_quantize(x1, s, z, spec) * up).sum().backward()
    (torch.fake_quantize_per_tensor_affine(x2, float(s), int(z), 0, 255) * up).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4"])
def test_ste_mask_at_the_range_ends_equals_torch_fake_quant(fmt):
    """On, just inside and just beyond both ends of the range: the gradient flows exactly where
    ``round(x / s) + z`` is in ``[qmin, qmax]``, as torch's fake-quant mask (power-of-two scale, so torch's
    ``x * (1 / s)`` equals lowbit's ``x / s``); ``x = (qmax - z + 0.25) s`` rounds onto qmax and keeps it."""
    spec = QuantSpec(fmt, symmetric=False)
    s, z = 2.0**-4, (spec.qmin + spec.qmax) // 2 + 1
    steps = torch.tensor([-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.49, 0.5, 0.51, 0.75, 1.0])
    x1 = torch.cat([(spec.qmin - z + steps) * s, (spec.qmax - z + steps) * s]).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    fake_quantize(x1, torch.tensor(s), torch.tensor(z), spec).sum().backward()
    torch.fake_quantize_per_tensor_affine(x2, s, z, spec.qmin, spec.qmax).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert x1.grad[len(steps) + 5] == 1 and x1.grad[len(steps) + 9] == 0  # qmax + 0.25 flows, + 0.75 does not


def test_ste_keeps_the_gradient_of_every_weight_under_min_max_scales():
    """Min/max per-channel scales clip nothing, so every weight gets gradient 1, including each channel's
    largest, which lands on qmax only up to float rounding (``127 * (m / 127)`` is not always ``m``)."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(256, 27, generator=g) * torch.rand(256, 1, generator=g)).requires_grad_()
    spec = QuantSpec("int8", symmetric=True, granularity="channel")
    s, z = compute_qparams(spec, reduce_blocks(w.detach(), spec.granularity, "amin"),
                           reduce_blocks(w.detach(), spec.granularity, "amax"))
    fake_quantize(w, s, z, spec).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_lsq_gradients_closed_form():
    # one element inside the range, one clipped above: d/ds of round(x/s)*s is round(x/s) - x/s inside, qmax above
    spec = QuantSpec("int8")
    s = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.234, 100.0], requires_grad=True)
    y = fake_quantize_lsq(x, s, None, spec, grad_scale=1.0)
    assert torch.allclose(y.detach(), torch.tensor([0.2, 12.7]))
    y.sum().backward()
    expected = (round(2.34) - 2.34) + 127
    assert s.grad is not None and abs(float(s.grad) - expected) < 1e-4
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0]))


@given(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=2, max_size=64),
       st.sampled_from(["int8", "uint8", "int4", "int2", "int16"]), st.booleans())
def test_properties_error_bound_idempotence_monotonicity(values, fmt, symmetric):
    x = torch.tensor(values, dtype=torch.float32)
    spec = QuantSpec(fmt, symmetric=symmetric)
    s, z = compute_qparams(spec, x.min(), x.max())
    y = fake_quantize(x, s, z, spec)
    lo = (spec.qmin - z.float()) * s
    hi = (spec.qmax - z.float()) * s
    inside = (x >= lo) & (x <= hi)
    assert ((x - y).abs()[inside] <= s / 2 * (1 + 1e-5) + 1e-6).all()
    assert torch.equal(fake_quantize(y, s, z, spec), y)
    xs, _ = torch.sort(x)
    ys = fake_quantize(xs, s, z, spec)
    assert (ys[1:] >= ys[:-1]).all()


def test_stochastic_rounding_is_unbiased():
    spec = QuantSpec("int8", rounding="stochastic")
    x = torch.full((200000,), 0.337)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), spec, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.unique(y), torch.tensor([0.3, 0.4]))
    assert abs(float(y.mean()) - 0.337) < 1e-3


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="1 to 16 bits"):
        QuantSpec("int17")
    with pytest.raises(ConfigError, match="axis 4 does not exist"):
        reduce_blocks(torch.zeros(2, 3), PerChannel(4), "amax")
    with pytest.raises(ConfigError, match="does not divide"):
        reduce_blocks(torch.zeros(2, 30), PerGroup(8), "amax")
    with pytest.raises(ConfigError, match="unknown rounding"):
        QuantSpec("int8", rounding="up")
    with pytest.raises(ShapeMismatchError):
        fake_quantize(torch.zeros(4, 3), torch.ones(5), torch.zeros(5, dtype=torch.int32), QuantSpec("int8", granularity="channel"))
    assert str(PerTensor()) == "per-tensor"
