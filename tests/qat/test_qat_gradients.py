"""QAT gradients against independent references: torch's own fake-quantize ops (and their autograd)
for STE and LSQ, closed forms for LSQ+, and torch's BatchNorm for the Conv-BN training-time fold.

torch decides "clipped" on the rounded code ``round(x / s) + z`` while LSQ (Esser et al. 2020, eq. 3)
clips ``x / s`` before rounding, so the two disagree on ``x / s`` within half a step outside the grid;
:func:`_off_band` moves such values to 0 before comparing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.qat import QuantConvBn2d, prepare_qat
from lowbit.recipes import W8A8, WeightOnly


def _off_band(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, axis=None) -> torch.Tensor:
    """``x`` with the values whose code ``x / s + z`` lies in ``(qmax, qmax + 0.5]`` or ``[qmin - 0.5, qmin)``
    set to 0. ``s``, ``z``: scalars, or ``(C,)`` along ``axis``."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    c = x / s + z
    band = ((c > qmax) & (c <= qmax + 0.5)) | ((c < qmin) & (c >= qmin - 0.5))
    return torch.where(band, torch.zeros_like(x), x)


def _same_ste_grad(got: torch.Tensor, exp: torch.Tensor) -> None:
    """Same pass-through mask, same values: LSQ computes ``round_ste(x / s) * s``, whose derivative
    ``s * (1 / s)`` is 1 only up to one float rounding."""
    assert torch.equal(got == 0, exp == 0)
    assert torch.allclose(got, exp, rtol=1e-6, atol=0)


def _lsq_qat(recipe, learnable="lsq"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 6))
    return prepare_qat(net, recipe, calib_data=[torch.randn(32, 16)], learnable=learnable)


# -------------------------------------------------------------------------------------- STE
def test_ste_activation_matches_torch_fake_quantize_per_tensor_affine():
    """Affine uint8 activation during STE training (observer on): forward and clipped-STE backward
    equal ``torch.fake_quantize_per_tensor_affine`` with the scale/zero point the step used."""
    torch.manual_seed(0)
    qat = prepare_qat(nn.Sequential(nn.Linear(6, 4)), W8A8(), calib_data=[torch.randn(16, 6)])
    q = qat.get_submodule("0").output_quantizer
    x = (torch.randn(32, 4) * 4).requires_grad_(True)  # well beyond the calibrated range: both sides clip
    up = torch.randn(32, 4)
    y = q(x)  # one training step: the observer moves the range, then the step quantizes with it
    (y * up).sum().backward()
    s, z = q.scale.detach().clone(), int(q.zero_point)
    assert 0 < z < 255
    xr = x.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(xr, float(s), z, 0, 255)
    (ref * up).sum().backward()
    assert torch.allclose(y, ref, atol=1e-6)
    codes = torch.round(x.detach() / s) + z
    assert ((codes < 0).any() and (codes > 255).any()), "the test needs clipping on both sides"
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(x.grad, up * ((codes >= 0) & (codes <= 255)))


# -------------------------------------------------------------------------------------- LSQ
def test_lsq_weight_gradients_match_torch_learnable_per_channel():
    """Per-channel symmetric int8 weight scale (an ``nn.Parameter``): gradients of ``x``, ``s`` equal
    ``torch._fake_quantize_learnable_per_channel_affine`` with LSQ's ``g = 1 / sqrt(N * qmax)``, ``N`` the
    weight elements per scale (16 inputs), ``qmax = 127``."""
    qat = _lsq_qat(W8A8())
    wq = qat.get_submodule("0").weight_quantizer
    assert isinstance(wq.scale, nn.Parameter) and wq.scale.shape == (6,)
    with torch.no_grad():
        wq.scale.mul_(0.6)  # the largest weights of every row now clip
    s0 = wq.scale.detach().clone()
    w = _off_band(torch.randn(6, 16) * 0.3, s0, torch.zeros(6), -128, 127, axis=0)
    w.requires_grad_(True)
    up = torch.randn(6, 16)
    (wq(w) * up).sum().backward()
    sr = s0.clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    ref = torch._fake_quantize_learnable_per_channel_affine(wr, sr, torch.zeros(6), 0, -128, 127,
                                                             1.0 / (16 * 127) ** 0.5)
    (ref * up).sum().backward()
    assert (w.detach().abs() > 127 * s0[:, None]).any()
    assert torch.allclose(wq(w.detach()), ref.detach(), atol=1e-6)
    _same_ste_grad(w.grad, wr.grad)
    assert torch.allclose(wq.scale.grad, sr.grad, rtol=1e-5, atol=1e-7)


def test_lsq_symmetric_activation_gradients_match_torch_learnable_per_tensor():
    """Per-tensor symmetric int8 activation: ``g = 1 / sqrt(N * qmax)`` with ``N`` the elements of one
    batch element (6 features), independent of the batch size."""
    qat = _lsq_qat(W8A8(act_dtype="int8", symmetric_act=True))
    q = qat.get_submodule("0").output_quantizer
    assert q.learnable and q.lsq_offset is None and int(q.zero_point) == 0
    for batch in (8, 64):
        q.scale.grad = None
        s0 = q.scale.detach().clone()
        x = _off_band(torch.randn(batch, 6, generator=torch.Generator().manual_seed(batch)) * 3 * float(s0) * 127 / 4,
                      s0, torch.zeros(()), -128, 127).requires_grad_(True)
        up = torch.randn(batch, 6)
        (q(x) * up).sum().backward()
        sr = s0.reshape(1).clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        ref = torch._fake_quantize_learnable_per_tensor_affine(xr, sr, torch.zeros(1), -128, 127,
                                                                1.0 / (6 * 127) ** 0.5)
        (ref * up).sum().backward()
        assert (x.detach().abs() > 128 * s0).any()
        assert torch.allclose(q(x.detach()), ref.detach(), atol=1e-6)
        _same_ste_grad(x.grad, xr.grad)
        assert torch.allclose(q.scale.grad.reshape(1), sr.grad, rtol=1e-5, atol=1e-7)


def test_lsq_affine_activation_scale_gradient_matches_torch_learnable_per_tensor():
    """``learnable="lsq"`` on the default W8A8 activation (uint8, zero point ``z`` fixed): the function
    trained is ``(clamp(round(x / s) + z, 0, 255) - z) s``, whose scale derivative is ``round(x/s) - x/s``
    inside and ``qmin - z`` / ``qmax - z`` where clipped: exactly torch's learnable fake-quant."""
    qat = _lsq_qat(W8A8())
    q = qat.get_submodule("0").output_quantizer
    assert q.learnable and q.lsq_offset is None
    with torch.no_grad():
        q.scale.mul_(0.5)
    s0, z = q.scale.detach().clone(), q.zero_point.float().clone()
    assert 0 < int(z) < 255
    x = _off_band(torch.randn(16, 6) * 3, s0, z, 0, 255).requires_grad_(True)
    up = torch.randn(16, 6)
    (q(x) * up).sum().backward()
    sr = s0.reshape(1).clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xr, sr, z.reshape(1), 0, 255, 1.0 / (6 * 255) ** 0.5)
    (ref * up).sum().backward()
    codes = torch.round(x.detach() / s0) + z
    assert ((codes < 0).any() and (codes > 255).any()), "the test needs clipping on both sides"
    assert torch.allclose(q(x.detach()), ref.detach(), atol=1e-6)
    _same_ste_grad(x.grad, xr.grad)
    assert torch.allclose(q.scale.grad.reshape(1), sr.grad, rtol=1e-5, atol=1e-7)


def test_lsq_plus_gradients_closed_form():
    """LSQ+ (Bhalgat et al. 2020) with ``v = (x - o) / s``: ``dx = up`` where ``qmin <= v <= qmax``
    else 0; ``ds = g * sum(up * (round(v) - v | qmin | qmax))``; ``do = sum(up where clipped)``
    (``o`` is independent of ``s``, so nothing of ``z`` enters ``ds``). The unclipped and the clipped
    values are checked with separate backward passes: the clipped terms (``qmax = 255``) would drown
    ``round(v) - v`` in one sum."""
    qat = _lsq_qat(W8A8(), learnable="lsq+")
    q = qat.get_submodule("0").output_quantizer
    assert q.lsq_offset is not None and float(q.lsq_offset.detach()) != 0.0
    with torch.no_grad():
        q.scale.mul_(0.5)
    s, o = float(q.scale.detach()), float(q.lsq_offset.detach())
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3)) * 1.5
    v = (x.double() - o) / s
    below, above = v < 0, v > 255
    inside = ~(below | above)
    assert below.any() and above.any() and inside.sum() > 100
    g = 1.0 / (6 * 255) ** 0.5
    up = torch.randn(64, 6)
    for part in (inside, ~inside):
        q.scale.grad = q.lsq_offset.grad = None
        xg = x.clone().requires_grad_(True)
        (q(xg) * up * part).sum().backward()
        ds = g * (up.double() * part * torch.where(inside, torch.round(v) - v, torch.where(below, 0.0, 255.0))).sum()
        assert abs(float(ds)) > 1e-3
        _same_ste_grad(xg.grad, up * part * inside)
        assert float(q.scale.grad) == pytest.approx(float(ds), rel=1e-4)
        assert float(q.lsq_offset.grad) == pytest.approx(float((up * part)[~inside].sum()), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------- BatchNorm training fold
def test_conv_bn_training_step_with_quantization_matches_reference():
    """Training forward with live statistics and weight quantization on:
    ``y = BN_batch(conv(x, fq(W t)) / t + b)``, ``t = gamma / sqrt(running_var + eps)``, with ``fq`` torch's
    per-channel fake quantization at the weight scales of the step. Output, running statistics and the
    gradients of ``W``, ``b``, ``gamma``, ``beta`` equal torch's autograd through that formula."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    net = nn.Sequential(conv, bn)
    qat = prepare_qat(net, WeightOnly(bits=4, symmetric=True), example_inputs=torch.randn(4, 3, 8, 8))
    unit = next(m for m in qat.modules() if isinstance(m, QuantConvBn2d))
    ref_w = conv.weight.detach().clone().requires_grad_(True)
    ref_b = conv.bias.detach().clone().requires_grad_(True)
    ref_bn = copy.deepcopy(bn).train()
    x = torch.randn(8, 3, 8, 8)
    up = torch.randn(8, 6, 8, 8)
    y = qat(x)
    (y * up).sum().backward()
    wq = unit.weight_quantizer
    t = ref_bn.weight / torch.sqrt(ref_bn.running_var + ref_bn.eps)
    folded = ref_w * t.reshape(-1, 1, 1, 1)
    # the step's weight scales are min/max of the folded weight (symmetric int4: amax / 7)
    assert torch.allclose(wq.scale, folded.detach().abs().amax((1, 2, 3)) / 7, rtol=1e-6)
    fq = torch.fake_quantize_per_channel_affine(folded, wq.scale, wq.zero_point, 0, -8, 7)
    ref = ref_bn(F.conv2d(x, fq, None, padding=1) / t.reshape(1, -1, 1, 1) + ref_b.reshape(1, -1, 1, 1))
    (ref * up).sum().backward()
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(unit.bn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert torch.allclose(unit.bn.running_var, ref_bn.running_var, atol=1e-6)
    for got, exp in ((unit.weight.grad, ref_w.grad), (unit.bias.grad, ref_b.grad),
                     (unit.bn.weight.grad, ref_bn.weight.grad), (unit.bn.bias.grad, ref_bn.bias.grad)):
        assert got is not None and got.abs().sum() > 0
        assert torch.allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_repr_of_a_learnable_quantizer_warns_nothing():
    """``repr`` of an LSQ quantizer reads its scale Parameter without the "requires_grad to scalar" warning."""
    import warnings

    q = _lsq_qat(W8A8()).get_submodule("0").output_quantizer
    assert q.scale.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "scale=" in repr(q)


def test_a_learned_scale_pushed_below_zero_is_clamped_to_eps_at_the_next_forward():
    """An SGD step can take an LSQ scale to <= 0 (seen on a 3-output Linear at lr 5e-3); the next forward
    clamps it to float32 eps, as torch's learnable FakeQuantize does, instead of quantizing with a negative
    or zero scale (a sign-flipped or NaN output)."""
    from lowbit.spec import SCALE_EPS

    qat = _lsq_qat(W8A8(act_dtype="int8", symmetric_act=True))
    q = qat.get_submodule("0").output_quantizer
    with torch.no_grad():
        q.scale.fill_(-0.01)
    x = torch.randn(8, 6) * 1e-5
    y = q(x)
    assert float(q.scale.detach()) == SCALE_EPS
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, SCALE_EPS, 0, -128, 127))
