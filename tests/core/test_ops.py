"""fake_quantize / quantize / dequantize against torch's own fake-quant ops and closed forms."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lowbit import ConfigError, PerChannel, PerGroup, PerTensor, QuantSpec, ShapeMismatchError
from lowbit.granularity import reduce_blocks
from lowbit.ops import dequantize, fake_quantize, fake_quantize_lsq, quantize
from lowbit.spec import compute_qparams

INT_CASES = [("int8", -128, 127), ("uint8", 0, 255)]
# every integer width and range variant, with qmin / qmax written out (not taken from IntFormat)
ALL_INT_CASES = INT_CASES + [
    ("int1", -1, 0), ("uint1", 0, 1), ("int2", -2, 1), ("uint2", 0, 3), ("int3", -4, 3), ("int4", -8, 7),
    ("uint4", 0, 15), ("uint4_narrow", 0, 14), ("int4_narrow", -7, 7), ("int8_narrow", -127, 127),
    ("int16", -32768, 32767), ("uint16", 0, 65535),
]


def adversarial(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    # exact ties at power-of-two scale 2^-4, huge values that saturate, signed zeros, denormals
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) / 16
    extra = torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-40, -1e-40, 7.96875, -8.0, 8.03125])
    return torch.cat([x, ties, extra])


@pytest.mark.parametrize("fmt,qmin,qmax", ALL_INT_CASES)
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
            # |x / s| <= 2^8, so x * (1 / s) and x / s differ by a few float32 ulps of 256: under 1e-4
            assert torch.allclose(frac, torch.full_like(frac, 0.5), atol=1e-4, rtol=0)


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


@pytest.mark.parametrize("shape,axis", [((6, 32), -1), ((6, 32), 1), ((32, 6), 0), ((3, 16, 5), 1)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_matches_reshaped_per_channel(shape, axis, symmetric):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g) * 3
    spec = QuantSpec("int4" if symmetric else "uint4", symmetric=symmetric, granularity=PerGroup(8, axis))
    lo, hi = reduce_blocks(w, spec.granularity, "amin"), reduce_blocks(w, spec.granularity, "amax")
    ax = axis % w.dim()
    assert lo.shape == tuple(n // 8 if d == ax else n for d, n in enumerate(shape))
    # closed form per group, from an independent reshape: the groups are runs of 8 along ``axis``
    groups = w.movedim(ax, -1).reshape(-1, 8)
    if symmetric:
        want = groups.abs().amax(-1) / 7  # max |w| of each group maps to 7
    else:
        want = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15
    s, z = compute_qparams(spec, lo, hi)
    assert torch.allclose(s.movedim(ax, -1).reshape(-1), want, rtol=1e-6, atol=0)
    # power-of-two scales: torch's x * (1 / s) equals lowbit's x / s, so the comparison is bit for bit
    s = torch.exp2(torch.round(torch.log2(s)))
    ours = fake_quantize(w, s, z, spec)
    # reference: each group is its own row, quantized per row by torch
    ref = torch.fake_quantize_per_channel_affine(groups, s.movedim(ax, -1).reshape(-1),
                                                 z.movedim(ax, -1).reshape(-1), 0, spec.qmin, spec.qmax)
    moved = list(w.movedim(ax, -1).shape)
    assert torch.equal(ours, ref.reshape(moved).movedim(-1, ax))
    codes = quantize(w, s, z, spec)
    assert torch.equal(dequantize(codes, s, z, spec), ours)


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
    # half a step, plus the float32 rounding of x / s and q * s (no absolute slack: tiny ranges count too)
    eps = torch.finfo(torch.float32).eps
    assert ((x - y).abs()[inside] <= s / 2 + 2 * eps * (x.abs() + y.abs())[inside]).all()
    assert torch.equal(fake_quantize(y, s, z, spec), y)
    xs, _ = torch.sort(x)
    ys = fake_quantize(xs, s, z, spec)
    assert (ys[1:] >= ys[:-1]).all()


def test_stochastic_rounding_is_unbiased():
    spec = QuantSpec("int8", rounding="stochastic")
    x = torch.full((200000,), 0.337)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), spec, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.unique(y), torch.tensor([0.3, 0.4]))
    sigma = (0.37 * 0.63 / x.numel()) ** 0.5 * 0.1  # Bernoulli(0.37) steps of 0.1
    assert abs(float(y.double().mean()) - 0.337) < 5 * sigma


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


def test_group_scales_of_a_transposed_grid_are_refused():
    """A (16, 1) grid has as many scales as the (8, 2) grid of PerGroup(16) on an (8, 32) weight but maps them
    to other blocks: refused, while the grid itself and its flattened values are taken."""
    x = torch.randn(8, 32)
    spec = QuantSpec("int8", symmetric=True, granularity=PerGroup(16))
    scale = reduce_blocks(x, PerGroup(16), "absmax") / 127
    zp = torch.zeros(8, 2, dtype=torch.int32)
    ref = fake_quantize(x, scale, zp, spec)
    torch.testing.assert_close(fake_quantize(x, scale.reshape(-1), zp.reshape(-1), spec), ref, rtol=0, atol=0)
    with pytest.raises(ShapeMismatchError, match="transposed"):
        fake_quantize(x, scale.reshape(16, 1), zp.reshape(16, 1), spec)


@pytest.mark.parametrize("fmt,qmin,qmax", [("int8", -128, 127), ("uint8", 0, 255), ("int4", -8, 7)])
def test_fake_quantize_value_does_not_depend_on_requires_grad(fmt, qmin, qmax):
    """With ``requires_grad`` the forward value is still exactly the fake-quantized value, also for outliers
    far beyond the range and ``±inf`` (torch's fake-quant op, the reference, saturates them to qmin / qmax)."""
    x = torch.cat([adversarial(), torch.tensor([1e9, -3e8, 1e20, float("inf"), float("-inf")])])
    spec = QuantSpec(fmt, symmetric=False)
    s, z = torch.tensor(2.0**-4), torch.tensor((qmin + qmax) // 2, dtype=torch.int32)
    ref = torch.fake_quantize_per_tensor_affine(x.clone().requires_grad_(), float(s), int(z), qmin, qmax)
    plain = fake_quantize(x, s, z, spec)
    graded = fake_quantize(x.clone().requires_grad_(), s, z, spec)
    assert torch.equal(plain, ref.detach()) and torch.equal(graded.detach(), ref.detach())
    assert torch.equal(torch.signbit(graded.detach()), torch.signbit(plain))
    # any scale (not only powers of two), per channel, and a non-integer format
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=g) * 4
    w[:, 0] = torch.tensor([1e30, -1e30, 1e6, -1e6, 50.0, -50.0, float("inf"), float("-inf")])
    for spec in [QuantSpec(fmt, symmetric=fmt != "uint8", granularity="channel"), QuantSpec("fp8_e4m3", granularity="channel")]:
        s = torch.rand(8, generator=g) * 0.05 + 0.01
        z = torch.zeros(8, dtype=torch.int32)
        assert torch.equal(fake_quantize(w.clone().requires_grad_(), s, z, spec).detach(), fake_quantize(w, s, z, spec))


@pytest.mark.parametrize("fmt,qmin,qmax,qdtype", [("uint8", 0, 255, torch.quint8), ("int8", -128, 127, torch.qint8),
                                                   ("int4", -8, 7, torch.qint8), ("uint4", 0, 15, torch.quint8)])
@settings(max_examples=200, deadline=None)
@given(a=st.floats(-1e4, 1e4, width=32), b=st.floats(-1e4, 1e4, width=32), same=st.booleans(),
       tiny=st.integers(0, 30))
# exact ties lo / scale = -3.5 (scale 1 for 255 and for 15 steps): the zero point rounds half to even
@example(a=-3.5, b=251.5, same=False, tiny=0)
@example(a=-3.5, b=11.5, same=False, tiny=0)
@example(a=2.0, b=2.0, same=True, tiny=0)
def test_affine_qparams_equal_torch_minmax_observer(fmt, qmin, qmax, qdtype, a, b, same, tiny):
    """Affine scale and zero point bit for bit as torch's MinMaxObserver (same formula, independent code),
    for ranges that do not contain 0, ``lo == hi``, and ranges down to ``2^-30`` (scale floor eps)."""
    from torch.ao.quantization import MinMaxObserver

    lo, hi = sorted([a * 2.0**-tiny, (a if same else b) * 2.0**-tiny])
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    obs = MinMaxObserver(dtype=qdtype, qscheme=torch.per_tensor_affine, quant_min=qmin, quant_max=qmax)
    obs(torch.stack([lo_t, hi_t]))
    s_ref, z_ref = obs.calculate_qparams()
    s, z = compute_qparams(QuantSpec(fmt, symmetric=False), lo_t, hi_t)
    assert torch.equal(s, s_ref.reshape(())) and int(z) == int(z_ref) and z.dtype == torch.int32
    assert qmin <= int(z) <= qmax
    # 0.0 is exactly representable: it quantizes to the zero point and back to 0
    zero = torch.zeros(1)
    assert torch.equal(fake_quantize(zero, s, z, QuantSpec(fmt, symmetric=False)), zero)


def test_non_finite_and_nonsense_inputs_raise_quantization_errors():
    import math

    from lowbit import NonFiniteError
    from lowbit.formats import parse

    spec = QuantSpec("int8")
    with pytest.raises(NonFiniteError, match="NaN"):  # a cast would store an arbitrary integer
        quantize(torch.tensor([1.0, math.nan]), torch.tensor(0.1), torch.tensor(0), spec)
    with pytest.raises(NonFiniteError, match="NaN"):  # 0 / 0
        quantize(torch.tensor([0.0]), torch.tensor(0.0), torch.tensor(0), spec)
    # inf saturates, as in fake_quantize
    assert quantize(torch.tensor([math.inf, -math.inf]), torch.tensor(0.1), None, spec).tolist() == [127, -128]
    for lo, hi in [(math.nan, 1.0), (-1.0, math.inf), (-math.inf, 0.0)]:
        for sp in [spec, QuantSpec("uint8", symmetric=False), QuantSpec("fp8_e4m3")]:
            with pytest.raises(NonFiniteError, match="compute_qparams"):
                compute_qparams(sp, torch.tensor(lo), torch.tensor(hi))
    with pytest.raises(ConfigError, match="no positive value"):  # int1 is {-1, 0}: max|x| / 0
        QuantSpec("int1", symmetric=True)
    s, z = compute_qparams(QuantSpec("int1", symmetric=False), torch.tensor(-1.0), torch.tensor(0.5))
    assert torch.isfinite(s) and int(z) in (-1, 0)
    for bad in [8, None, 8.0]:
        with pytest.raises(ConfigError, match="number format"):
            parse(bad)
        with pytest.raises(ConfigError, match="number format"):
            QuantSpec(bad)
    for bad in ["32", 32.0, True]:
        with pytest.raises(ConfigError, match="group_size must be an integer"):
            PerGroup(bad)
    with pytest.raises(ConfigError, match="axis must be an integer"):
        PerChannel(1.0)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1", "log2_4", "ternary"])
def test_non_integer_formats_ignore_a_zero_point_in_every_op(fmt):
    """Formats without a zero point: quantize, fake_quantize and dequantize all ignore one that is passed
    (a zero-point tensor comes with every quantizer), so the three ops stay consistent."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 16, generator=g)
    spec = QuantSpec(fmt, granularity="channel")
    s, z = torch.rand(4, generator=g) * 0.5 + 0.1, torch.tensor([3, -2, 1, 7], dtype=torch.int32)
    y = fake_quantize(x, s, z, spec)
    assert torch.equal(y, fake_quantize(x, s, None, spec))
    assert torch.equal(dequantize(quantize(x, s, z, spec), s, z, spec), y)
    # the closed form: format.round(x / s) * s, per row
    assert torch.equal(y, spec.format.round(x / s[:, None]) * s[:, None])
