"""CUDA against CPU, tensor level: quantize / dequantize / fake_quantize for integer formats at every
granularity, minifloat rounding and codes (fp8 e4m3 / e5m2, fp6, fp4), LSQ forward and gradients, and
every observer's range. The CPU result is the reference; elementwise arithmetic must agree bit for bit.

Run on a GPU machine with ``pytest -m gpu`` (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from lowbit import PerChannel, PerGroup, PerTensor, QuantSpec, TensorQuantizer, compute_qparams
from lowbit.calibration import ADMM, KL, MSE, MinMax, MovingAverageMinMax, Percentile, make_observer
from lowbit.formats import FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2
from lowbit.granularity import reduce_blocks
from lowbit.ops import dequantize, fake_quantize, fake_quantize_lsq, quantize

from ._device import DEVICE, ON_GPU, assert_ulp_close, bits_equal

pytestmark = pytest.mark.gpu

INT_SPECS = {
    "int8-tensor-sym": QuantSpec("int8", symmetric=True),
    "uint8-tensor-affine": QuantSpec("uint8", symmetric=False),
    "int8-channel-sym": QuantSpec("int8", symmetric=True, granularity=PerChannel(0)),
    "int8-channel1-affine": QuantSpec("int8", symmetric=False, granularity=PerChannel(1)),
    "int4-channel-sym": QuantSpec("int4", symmetric=True, granularity=PerChannel(0)),
    "int4-group32-sym": QuantSpec("int4", symmetric=True, granularity=PerGroup(32)),
    "uint4-group32-affine": QuantSpec("uint4", symmetric=False, granularity=PerGroup(32)),
}


def _data(seed: int = 0) -> torch.Tensor:
    """(64, 128) float32 with outliers per row, plus exact rounding ties (odd multiples of half a step
    of row 0's per-tensor int8 scale are hard to hit at random, so the test puts some in)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=g) * torch.linspace(0.1, 4.0, 64)[:, None]
    x[:, 0] = torch.linspace(-9.0, 9.0, 64)
    return x


def _qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    g = spec.granularity
    return compute_qparams(spec, reduce_blocks(x, g, "amin"), reduce_blocks(x, g, "amax"))


@pytest.mark.parametrize("name", list(INT_SPECS))
def test_integer_quantize_dequantize_fake_quantize_bit_exact(name):
    spec = INT_SPECS[name]
    x = _data()
    s, z = _qparams(x, spec)
    # add exact ties: x = (k + 0.5) * s for the first block's scale (round half to even must agree)
    s0 = float(s.reshape(-1)[0])
    x[0, 1:9] = (torch.arange(-4, 4, dtype=torch.float32) + 0.5) * s0
    xd, sd, zd = x.to(DEVICE), s.to(DEVICE), z.to(DEVICE)

    codes_cpu, codes_dev = quantize(x, s, z, spec), quantize(xd, sd, zd, spec)
    assert codes_dev.device.type == DEVICE.type and codes_dev.dtype == spec.format.code_dtype
    assert bits_equal(codes_cpu, codes_dev)
    assert int(codes_cpu.min()) >= spec.qmin and int(codes_cpu.max()) <= spec.qmax
    assert bits_equal(dequantize(codes_cpu, s, z, spec), dequantize(codes_dev, sd, zd, spec))
    fq_cpu, fq_dev = fake_quantize(x, s, z, spec), fake_quantize(xd, sd, zd, spec)
    assert bits_equal(fq_cpu, fq_dev)
    # fake_quantize == dequantize(quantize(x)) on both devices
    assert bits_equal(fq_dev, dequantize(codes_dev, sd, zd, spec))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["int8-channel-sym", "int4-group32-sym"])
def test_fake_quantize_half_inputs_and_ste_gradient_bit_exact(name, dtype):
    spec = INT_SPECS[name]
    x = _data(1)
    s, z = _qparams(x, spec)
    s = s * 0.7  # clip the largest values so the straight-through mask has zeros to get right
    x = x.to(dtype)
    grads, outs = [], []
    for dev in ("cpu", DEVICE):
        xi = x.detach().to(dev).clone().requires_grad_(True)  # a leaf on each device
        y = fake_quantize(xi, s.to(dev), z.to(dev), spec)
        (y.float() * torch.arange(y.numel(), dtype=torch.float32, device=dev).reshape(y.shape)).sum().backward()
        outs.append(y)
        grads.append(xi.grad)
    assert outs[0].dtype == dtype and bits_equal(outs[0], outs[1])
    assert bits_equal(grads[0], grads[1])
    assert 0 < int((grads[0] == 0).sum()) < grads[0].numel()  # some values were clipped, most were not


MINIFLOATS = [FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1]


def _minifloat_inputs(fmt) -> torch.Tensor:
    """Every grid value, every midpoint between neighbours (ties), values just either side of them,
    subnormals, overflow, signed zeros, inf and NaN; float32."""
    grid = fmt.grid().float()
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([torch.nextafter(mids, torch.full_like(mids, float("inf"))),
                      torch.nextafter(mids, torch.full_like(mids, float("-inf")))])
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(4096, generator=g) * float(fmt.max_value) / 3
    tiny = torch.randn(512, generator=g) * fmt.smallest_normal
    special = torch.tensor([0.0, -0.0, fmt.max_value * 1.5, -fmt.max_value * 7, float("inf"), float("-inf"), float("nan")])
    return torch.cat([grid, mids, near, rand, tiny, special])


@pytest.mark.parametrize("fmt", MINIFLOATS, ids=lambda f: f.name)
def test_minifloat_round_cast_and_codes_bit_exact(fmt):
    x = _minifloat_inputs(fmt)
    xd = x.to(DEVICE)
    assert bits_equal(fmt.round(x), fmt.round(xd))
    assert bits_equal(fmt.cast(x), fmt.cast(xd))
    assert bits_equal(fmt.round(x.double()), fmt.round(xd.double()))
    finite = x[torch.isfinite(x)]
    codes_cpu, codes_dev = fmt.quantize(finite), fmt.quantize(finite.to(DEVICE))
    assert codes_dev.dtype == torch.uint8 and bits_equal(codes_cpu, codes_dev)
    every_code = torch.arange(2**fmt.bits, dtype=torch.uint8)
    assert bits_equal(fmt.dequantize(every_code), fmt.dequantize(every_code.to(DEVICE)))


@pytest.mark.parametrize("fmt,native", [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)],
                         ids=["e4m3", "e5m2"])
def test_fp8_round_matches_torch_native_cast_on_device(fmt, native):
    """Independent reference: PyTorch's own float8 conversion on the device, inside the finite range
    (round to nearest even; beyond max torch's saturation rules differ between versions)."""
    x = _minifloat_inputs(fmt)
    x = x[torch.isfinite(x) & (x.abs() <= fmt.max_value)].to(DEVICE)
    assert bits_equal(fmt.round(x), x.to(native).float())


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP4_E2M1], ids=lambda f: f.name)
def test_minifloat_fake_quantize_per_channel_bit_exact(fmt):
    spec = QuantSpec(fmt, symmetric=True, granularity=PerChannel(0))
    x = _data(2)
    s, z = _qparams(x, spec)
    assert bits_equal(fake_quantize(x, s, z, spec), fake_quantize(x.to(DEVICE), s.to(DEVICE), z.to(DEVICE), spec))
    assert bits_equal(quantize(x, s, z, spec), quantize(x.to(DEVICE), s.to(DEVICE), z.to(DEVICE), spec))


@pytest.mark.parametrize("affine", [False, True], ids=["lsq", "lsq+"])
def test_lsq_forward_bit_exact_and_gradients_close(affine):
    spec = QuantSpec("uint8" if affine else "int8", symmetric=not affine, granularity=PerChannel(0))
    x = _data(4)[:16]
    s0, z0 = _qparams(x, spec)
    s0 = s0 * 0.8
    res = []
    for dev in ("cpu", DEVICE):
        xi = x.detach().to(dev).clone().requires_grad_(True)  # a leaf on each device
        s = s0.to(dev).clone().requires_grad_(True)
        o = (-z0.float() * s0).to(dev).clone().requires_grad_(True) if affine else None
        y = fake_quantize_lsq(xi, s, o, spec)
        w = torch.linspace(-1, 1, y.numel(), device=dev).reshape(y.shape)
        (y * w).sum().backward()
        res.append((y, xi.grad, s.grad, None if o is None else o.grad))
    (y_c, gx_c, gs_c, go_c), (y_d, gx_d, gs_d, go_d) = res
    assert bits_equal(y_c, y_d)
    assert bits_equal(gx_c, gx_d)  # elementwise: the straight-through mask times the upstream gradient
    # scale / offset gradients are sums over each channel (128 terms): CUDA reduces in another order,
    # so allow float32 summation error (a few ulp of the largest term times sqrt(n))
    torch.testing.assert_close(gs_d.cpu(), gs_c, rtol=1e-5, atol=1e-6)
    assert float(gs_c.abs().max()) > 0
    if affine:
        torch.testing.assert_close(go_d.cpu(), go_c, rtol=1e-5, atol=1e-6)


def _batches(n: int = 4, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, 6, 6, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


EXACT_CALIBRATORS = {
    "minmax": MinMax(),
    "moving_average": MovingAverageMinMax(c=0.1),
    "kl": KL(),
    "percentile": Percentile(99.9),
    "mse": MSE(),
}


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(1)], ids=str)
@pytest.mark.parametrize("cal", list(EXACT_CALIBRATORS))
def test_observers_same_range_on_device(cal, granularity):
    """MinMax / moving average: elementwise min/max and the same increment formula -> bit-exact.
    Histogram (KL, percentile, MSE): the counts are exact integers on both devices and the estimators
    run on the CPU copy of the statistics, so the ranges are bit-exact too."""
    spec = QuantSpec("uint8" if cal != "kl" else "int8", symmetric=cal == "kl",
                     granularity=granularity, calibrator=EXACT_CALIBRATORS[cal])
    obs_cpu, obs_dev = make_observer(spec), make_observer(spec)
    for xb in _batches():
        obs_cpu.update(xb)
        obs_dev.update(xb.to(DEVICE))
    lo_c, hi_c = obs_cpu.compute_range()
    lo_d, hi_d = obs_dev.compute_range()
    assert bits_equal(lo_c, lo_d) and bits_equal(hi_c, hi_d)
    assert float((hi_c - lo_c).min()) > 0
    if cal in ("kl", "percentile", "mse"):
        cand_c, cand_d = obs_cpu.candidate_ranges(), obs_dev.candidate_ranges()
        for k in cand_c:
            assert bits_equal(cand_c[k][0], cand_d[k][0]) and bits_equal(cand_c[k][1], cand_d[k][1]), k


def test_admm_observer_close_on_device():
    """ADMM's least-squares scale is a float64 sum per channel, reduced in another order on CUDA, so
    the scales agree to float64 summation error (the float32 result to ~1 ulp), not bit for bit."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(32, 64, generator=g) * torch.linspace(0.05, 1.0, 32)[:, None]
    spec = QuantSpec("int4", symmetric=True, granularity=PerChannel(0), calibrator=ADMM())
    obs_cpu, obs_dev = make_observer(spec), make_observer(spec)
    obs_cpu.update(w)
    obs_dev.update(w.to(DEVICE))
    lo_c, hi_c = obs_cpu.compute_range()
    lo_d, hi_d = obs_dev.compute_range()
    torch.testing.assert_close(hi_d.cpu(), hi_c, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(lo_d.cpu(), lo_c, rtol=2e-6, atol=0.0)
    # ADMM moved the range inside max|w| (a Gaussian's int4 optimum clips), on both devices
    assert bool((hi_c < w.abs().amax(1)).any())


@pytest.mark.parametrize("cal", ["minmax", "kl", "mse"])
def test_tensor_quantizer_calibrates_and_lives_on_device(cal):
    """A quantizer built on the CPU moves to the device of the data it observes; its qparams equal the
    CPU quantizer's and its output equals the CPU output."""
    spec = QuantSpec("int8" if cal == "kl" else "uint8", symmetric=cal == "kl", calibrator=cal)
    q_cpu, q_dev = TensorQuantizer(spec, "cpu"), TensorQuantizer(spec, "dev")
    batches = _batches()
    with q_cpu.observing(), q_dev.observing():
        for xb in batches:
            q_cpu(xb)
            q_dev(xb.to(DEVICE))
    assert all(b.device.type == DEVICE.type for b in q_dev.buffers())
    assert bits_equal(q_cpu.scale, q_dev.scale) and bits_equal(q_cpu.zero_point, q_dev.zero_point)
    x = batches[0] * 1.3
    assert bits_equal(q_cpu(x), q_dev(x.to(DEVICE)))


def test_dynamic_per_token_quantizer_bit_exact():
    from lowbit import PerToken

    spec = QuantSpec("int8", symmetric=True, granularity=PerToken(), dynamic=True)
    x = _data(7).reshape(8, 8, 128)
    q = TensorQuantizer(spec, "dyn")
    y_cpu = q(x)
    y_dev = TensorQuantizer(spec, "dyn")(x.to(DEVICE))
    # the per-token scale is amax / 127 on both devices; the dequantized output q * s may round once more
    # on the CPU than in CUDA's fused multiply-add (seen on an H100: same values to 4 digits, not bits)
    assert_ulp_close(y_dev, y_cpu)


def test_stochastic_rounding_runs_on_device_with_device_generator():
    """Stochastic rounding draws from a generator on the data's device; the draws differ from the CPU's
    (another RNG), so check the property instead: every code is floor or ceil of x / s, and the mean is
    unbiased."""
    spec = QuantSpec("int8", symmetric=True, rounding="stochastic")
    x = torch.full((200_000,), 0.3, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    codes = quantize(x, torch.tensor(1.0), torch.tensor(0), spec, generator=gen)
    assert codes.device.type == DEVICE.type
    assert set(codes.unique().cpu().tolist()) == {0, 1}
    assert abs(float(codes.float().mean()) - 0.3) < 0.005  # std of the mean: sqrt(.21 / 2e5) = 0.001


@pytest.mark.skipif(not ON_GPU, reason="checks CUDA placement")
def test_quantize_accepts_cpu_qparams_for_cuda_data():
    spec = INT_SPECS["int8-channel-sym"]
    x = _data(8)
    s, z = _qparams(x, spec)
    assert bits_equal(quantize(x.to(DEVICE), s, z, spec), quantize(x, s, z, spec))
