"""Data-free activation ranges from BatchNorm statistics: closed forms on synthetic BN layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.errors import ConfigError, EmptyCalibrationError
from lowbit.nn.quantizer import quantizers
from lowbit.passes import DFQ, ChannelClip, clipped_normal_moments
from lowbit.recipes import Custom

from .conftest import randomize_bn

U8 = QuantSpec("uint8", symmetric=False)
W8 = Custom(weight=QuantSpec("int8", symmetric=True), activation=U8)
OFF = dict(cle=False, high_bias_absorption=False, bias_correction=None)


def _numeric_moments(mean: float, std: float, lo: float, hi: float) -> tuple[float, float]:
    """E[Y], sd[Y] of Y = clip(N(mean, std^2), lo, hi) by quadrature on a fine grid (float64)."""
    z = torch.linspace(-12, 12, 400_001, dtype=torch.float64)
    pdf = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    y = torch.clamp(mean + std * z, lo, hi)
    e1 = torch.trapezoid(y * pdf, z)
    e2 = torch.trapezoid(y * y * pdf, z)
    return float(e1), float(torch.sqrt(e2 - e1**2))


@pytest.mark.parametrize("mean,std,lo,hi", [(0.0, 1.0, 0.0, math.inf), (1.5, 2.0, 0.0, 6.0), (-3.0, 1.0, 0.0, 6.0),
                                            (7.0, 0.5, 0.0, 6.0), (0.3, 1.7, -math.inf, 1.0), (2.0, 3.0, -1.0, 4.0)])
def test_clipped_normal_moments_match_quadrature(mean, std, lo, hi):
    m, s = clipped_normal_moments(torch.tensor([mean], dtype=torch.float64), torch.tensor([std], dtype=torch.float64), lo, hi)
    m_ref, s_ref = _numeric_moments(mean, std, lo, hi)
    assert float(m) == pytest.approx(m_ref, abs=1e-7)
    assert float(s) == pytest.approx(s_ref, abs=1e-6)
    m0, s0 = clipped_normal_moments(torch.tensor([mean], dtype=torch.float64), torch.tensor([0.0]), lo, hi)
    assert float(m0) == min(max(mean, lo), hi) and float(s0) == 0.0


def _conv_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6(),
                      nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()
    randomize_bn(m)
    return m


def _ranges(q: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(t.chosen_range[0]), float(t.chosen_range[1])) for n, t in quantizers(q)
            if not t.is_weight and t.chosen_range is not None}


def test_ranges_from_bn_closed_form():
    m = _conv_bn_model()
    n = 4.0
    q = lowbit.quantize(m, W8, None, torch.zeros(1, 3, 8, 8), dfq=DFQ(**OFF, act_num_std=n, input_range=(-1.0, 2.0)))
    r = _ranges(q)
    bn1, bn2 = m[1], m[4]
    b1, g1 = bn1.bias.detach().double(), bn1.weight.detach().double().abs()
    b2, g2 = bn2.bias.detach().double(), bn2.weight.detach().double().abs()
    # layer 0 -> ReLU6: beta +- n gamma clipped to [0, 6], united over channels
    lo0 = float(torch.clamp(b1 - n * g1, 0, 6).min())
    hi0 = float(torch.clamp(b1 + n * g1, 0, 6).max())
    assert r["0.output_quantizer"] == pytest.approx((lo0, hi0), abs=1e-5)
    # layer 3 (no activation): beta +- n gamma
    assert r["3.output_quantizer"] == pytest.approx((float((b2 - n * g2).min()), float((b2 + n * g2).max())), abs=1e-5)
    # the model input: exactly the given range
    assert r["input_1_quant"] == pytest.approx((-1.0, 2.0))
    assert r["5_output_quant"] == pytest.approx(r["3.output_quantizer"])  # global pooling keeps the moments
    # the Linear after pooling: mean W mu + b, variance W^2 sigma^2 (independent inputs), moments of the
    # pooled conv output = BN moments of layer 3 (no activation, pooling keeps them)
    w, b = m[7].weight.detach().double(), m[7].bias.detach().double()
    mu, var = w @ b2 + b, (w * w) @ (g2 * g2)
    lo7, hi7 = float((mu - n * var.sqrt()).min()), float((mu + n * var.sqrt()).max())
    assert r["7.output_quantizer"] == pytest.approx((lo7, hi7), abs=1e-5)
    # qparams follow from the ranges (uint8 affine)
    oq = q.get_submodule("0").output_quantizer
    assert float(oq.scale) == pytest.approx((hi0 - min(lo0, 0.0)) / 255, rel=1e-6)
    assert q.lowbit_passes and all(rec.applied for rec in q.lowbit_passes if rec.pass_name == "bn_ranges")


def test_ranges_follow_cle_clip_and_scaling():
    m = _conv_bn_model(1)
    n = 3.0
    q = lowbit.quantize(m, W8, None, torch.zeros(1, 3, 8, 8),
                        dfq=DFQ(high_bias_absorption=False, bias_correction=None, act_num_std=n, input_range=(-1.0, 1.0)))
    clip = q.get_submodule("0").activation
    assert isinstance(clip, ChannelClip)
    s = 6.0 / clip.upper.double()  # CLE divided channel c of layer 0 by s_c, its ReLU6 now clips at 6 / s_c
    bn1 = m[1]
    b1, g1 = bn1.bias.detach().double() / s, bn1.weight.detach().double().abs() / s
    hi = float(torch.minimum(b1 + n * g1, clip.upper.double()).max())
    lo = float(torch.clamp(torch.minimum(b1 - n * g1, clip.upper.double()), min=0).min())
    assert _ranges(q)["0.output_quantizer"] == pytest.approx((lo, hi), rel=1e-5, abs=1e-6)
    assert not torch.allclose(s, torch.ones_like(s)), "CLE should have rescaled the channels"


def test_mse_estimator_on_modelled_distribution_and_data_check():
    """act_range='mse': the range lies inside the std rule's and the model still tracks its float output."""
    m = _conv_bn_model(2)
    ex = torch.zeros(1, 3, 8, 8)
    q_std = lowbit.quantize(m, W8, None, ex, dfq=DFQ(**OFF, input_range=(-1.0, 1.0)))
    q_mse = lowbit.quantize(m, W8, None, ex, dfq=DFQ(**OFF, input_range=(-1.0, 1.0), act_range="mse"))
    r_std, r_mse = _ranges(q_std), _ranges(q_mse)
    for k in ("0.output_quantizer", "3.output_quantizer"):
        assert r_std[k][0] - 1e-6 <= r_mse[k][0] and r_mse[k][1] <= r_std[k][1] + 1e-6
        assert r_mse[k][1] - r_mse[k][0] < r_std[k][1] - r_std[k][0]


def test_errors_name_what_is_missing():
    m = _conv_bn_model()
    with pytest.raises(EmptyCalibrationError, match="input_range"):
        lowbit.quantize(m, W8, None, torch.zeros(1, 3, 8, 8), dfq=DFQ(**OFF))
    with pytest.raises(EmptyCalibrationError, match="example_inputs"):
        lowbit.quantize(m, W8, None, dfq=DFQ(**OFF, input_range=(0.0, 1.0)))
    with pytest.raises(EmptyCalibrationError, match="calib_data"):
        lowbit.quantize(m, W8, None, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError):
        DFQ(input_range=(1.0, -1.0))
    with pytest.raises(ConfigError):
        DFQ(act_range="kl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_data_free_dfq_on_cuda_matches_cpu():
    m = _conv_bn_model(3)
    kw = dict(dfq=DFQ(input_range=(-1.0, 1.0)))
    q_cpu = lowbit.quantize(m, W8, None, torch.zeros(1, 3, 8, 8), **kw)
    q_gpu = lowbit.quantize(m.cuda(), W8, None, torch.zeros(1, 3, 8, 8, device="cuda"), **kw)
    r_cpu, r_gpu = _ranges(q_cpu), _ranges(q_gpu)
    assert r_cpu.keys() == r_gpu.keys()
    for k in r_cpu:
        assert r_gpu[k] == pytest.approx(r_cpu[k], rel=1e-4, abs=1e-5), k
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(q_gpu(x.cuda()).cpu(), q_cpu(x), atol=0.05)


@pytest.mark.parametrize("beta,act,expected", [(-10.0, nn.ReLU(), (0.0, 0.0)), (30.0, nn.ReLU6(), (6.0, 6.0)),
                                               (30.0, nn.ReLU(), (27.0, 33.0))])
def test_range_of_a_dead_or_saturated_layer_is_what_the_clip_outputs(beta, act, expected):
    """Every channel below 0 before a ReLU (or above 6 before a ReLU6): the output is the constant bound,
    not an inverted range such as (0, -7) or (27, 6)."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act, nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[1].weight.fill_(1.0)
        m[1].bias.fill_(beta)
    q = lowbit.quantize(m, W8, None, torch.zeros(1, 3, 8, 8), dfq=DFQ(**OFF, act_num_std=3.0, input_range=(-1.0, 1.0)))
    assert _ranges(q)["0.output_quantizer"] == pytest.approx(expected)
