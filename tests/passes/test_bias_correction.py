"""Bias correction: the corrected layer's expected output equals the float one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lowbit import QuantSpec
from lowbit.errors import EmptyCalibrationError
from lowbit.passes import BNStats, clipped_normal_mean, correct_bias, fold_bn
from lowbit.passes._layer import quantize_weight
from lowbit.passes.fold_bn import set_output_stats

from .conftest import randomize_bn

INT4 = QuantSpec("int4", symmetric=True)


@pytest.mark.parametrize("mean,std,lo,hi", [(0.0, 1.0, 0.0, math.inf), (1.5, 0.7, 0.0, 6.0),
                                            (-2.0, 3.0, 0.0, 6.0), (5.0, 2.0, 0.0, 6.0), (0.3, 0.0, 0.0, 6.0)])
def test_clipped_normal_mean_matches_numeric_integral(mean, std, lo, hi):
    if std == 0:
        expected = min(max(mean, lo), hi)
    else:
        z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
        pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        expected = float(torch.trapezoid(torch.clamp(mean + std * z, lo, hi) * pdf, z))
    got = float(clipped_normal_mean(torch.tensor(mean), torch.tensor(std), lo, hi))
    assert got == pytest.approx(expected, abs=1e-7)


def test_analytic_expected_output_restored():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -0.5, 2.0, 0.2, 3.0, -1.0])
    sd = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 0.3])
    first = nn.Linear(4, 6)
    set_output_stats(first, BNStats(mu, sd))
    m = nn.Sequential(first, nn.ReLU(), nn.Linear(6, 5))
    out, log = correct_bias(m, INT4)
    assert [r.layers for r in log.applied] == [("2",)]
    assert log.skipped[0].layers == ("0",), "the first layer's input statistics are unknown: logged"
    # Monte Carlo: inputs with exactly the recorded statistics
    h = torch.relu(mu + sd * torch.randn(400_000, 6, dtype=torch.float64))
    w, wq = m[2].weight.double(), quantize_weight(m[2].weight, INT4).double()
    e_float = (h @ w.T + m[2].bias.double()).mean(0)
    e_plain = (h @ wq.T + m[2].bias.double()).mean(0)
    e_corr = (h @ wq.T + out[2].bias.double()).mean(0)
    err_plain, err_corr = (e_plain - e_float).abs().max(), (e_corr - e_float).abs().max()
    assert err_plain > 0.02, "int4 rounding must shift the mean for the test to mean anything"
    assert err_corr < 0.1 * err_plain and err_corr < 5e-3


def test_analytic_through_fold_bn_and_relu6_conv():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 3, groups=2))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
        m[1].bias.copy_(torch.tensor([0.5, 4.0, -0.2, 1.0]))
    folded, _ = fold_bn(m.eval())
    out, log = correct_bias(folded, INT4)
    assert ("3",) in [r.layers for r in log.applied]
    expected_in = clipped_normal_mean(m[1].bias.detach(), m[1].weight.detach().abs(), 0.0, 6.0)
    dw = (quantize_weight(folded[3].weight, INT4) - folded[3].weight).double()
    shift = (dw.sum((2, 3)) * expected_in.reshape(2, 2)).sum(1)
    assert torch.allclose(folded[3].bias - out[3].bias, shift.float(), atol=1e-6)


def test_empirical_exact_on_its_data():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1))
    data = [(torch.rand(4, 3, 6, 6) + 0.5, 0) for _ in range(3)]
    out, log = correct_bias(m, INT4, data)
    assert len(log.applied) == 2 and out[0].bias is not None
    for i in (0, 2):  # layer by layer on the float inputs the pass saw
        xs = [b[0] for b in data] if i == 0 else [m[1](m[0](b[0])) for b in data]
        wq = quantize_weight(m[i].weight, INT4)
        bf = m[i].bias if m[i].bias is not None else torch.zeros(m[i].out_channels)
        e_float = torch.stack([m[i]._conv_forward(x, m[i].weight, bf) for x in xs]).mean((0, 1, 3, 4))
        e_corr = torch.stack([m[i]._conv_forward(x, wq, out[i].bias) for x in xs]).mean((0, 1, 3, 4))
        e_plain = torch.stack([m[i]._conv_forward(x, wq, bf) for x in xs]).mean((0, 1, 3, 4))
        assert (e_plain - e_float).abs().max() > 1e-3
        assert torch.allclose(e_corr, e_float, atol=1e-5)
    with pytest.raises(EmptyCalibrationError):
        correct_bias(m, INT4, [])


@torch.no_grad()
def test_analytic_removes_the_empirical_output_shift_through_fold_bn_and_relu6():
    """End to end against a Monte Carlo mean of the real network: a 1x1 conv of N(0, I) inputs is exactly
    normal per channel, so BatchNorm running statistics set to its true mean and variance make the folded
    statistics exact; the ReLU6 saturates often, so the clip matters."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 3, groups=2)).eval()
    bn = m[1]
    w, b = m[0].weight.reshape(4, 3), m[0].bias
    bn.running_mean.copy_(b)
    bn.running_var.copy_((w * w).sum(1) - bn.eps)  # BN output exactly N(beta, gamma^2)
    bn.weight.copy_(torch.tensor([3.0, 2.0, 1.0, 4.0]))
    bn.bias.copy_(torch.tensor([5.0, 1.0, -0.5, 4.0]))
    folded, _ = fold_bn(m)
    out, log = correct_bias(folded, INT4)
    assert ("3",) in [r.layers for r in log.applied]
    x = torch.randn(20_000, 3, 3, 3, dtype=torch.float64)  # one 3x3 window each: 20000 independent samples
    h = m[:3].double()(x)
    assert float((h == 6).double().mean()) > 0.1, "the test needs a ReLU6 that clips"
    conv = m[3].double()
    wq = quantize_weight(folded[3].weight, INT4).double()
    e_float = conv(h).mean((0, 2, 3))
    e_plain = conv._conv_forward(h, wq, conv.bias).mean((0, 2, 3))
    e_corr = conv._conv_forward(h, wq, out[3].bias.double()).mean((0, 2, 3))
    err_plain, err_corr = (e_plain - e_float).abs().max(), (e_corr - e_float).abs().max()
    assert err_plain > 0.05, "int4 rounding must shift the mean for the test to mean anything"
    assert err_corr < 0.03 * err_plain, (err_plain, err_corr)


def test_conv_into_linear_without_flatten_not_corrected_analytically():
    m = nn.Sequential(nn.Conv1d(3, 5, 1), nn.ReLU(), nn.Linear(5, 2))  # the Linear reads the length dim
    set_output_stats(m[0], BNStats(torch.ones(5), torch.ones(5)))
    out, log = correct_bias(m, INT4)
    assert not log.applied and any("flatten" in r.detail for r in log.skipped if r.layers == ("2",))
    assert torch.equal(out[2].bias, m[2].bias)


def test_empirical_measures_in_eval_mode_and_restores_train_mode():
    """A model left in train mode: no running statistic moves, dropout is off during the measurement."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))
    randomize_bn(m)
    data = [torch.randn(4, 3, 6, 6) + 1 for _ in range(2)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out, _ = correct_bias(m, INT4, data)  # m is in train mode
    ref, _ = correct_bias(copy.deepcopy(m).eval(), INT4, data)
    assert m.training and out.training and all(mod.training for mod in out.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    for k, v in out.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert not torch.equal(out[4].bias, m[4].bias)


def test_unfolded_model_says_to_fold_first():
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    _, log = correct_bias(m, INT4)
    assert not log.applied and any("fold_bn first" in r.detail for r in log.skipped)
    _, log = correct_bias(fold_bn(m)[0], INT4)
    assert [r.layers for r in log.applied] == [("3",)] and not any("fold_bn" in r.detail for r in log.skipped)
