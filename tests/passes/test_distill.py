"""Distilled calibration data (ZeroQ): BatchNorm-statistics matching and the data-free quantize path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.errors import ConfigError, NoBatchNormError, QuantizationError
from lowbit.nn.quantizer import quantizers
from lowbit.passes import DFQ
from lowbit.passes.distill import DistillConfig, bn_statistics_loss, distill_inputs
from lowbit.recipes import Custom

from .conftest import mobile_block

W8 = Custom(weight=QuantSpec("int8", symmetric=True), activation=QuantSpec("uint8", symmetric=False))
SHAPE = (1, 3, 12, 12)


def _trained_block(seed: int = 0) -> nn.Module:
    """:func:`mobile_block` whose BatchNorm running statistics come from data (so a batch can match
    them), like a trained network's: cumulative averages over 10 batches of a non-standard input."""
    torch.manual_seed(seed)
    m = mobile_block()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    m.train()
    with torch.no_grad():
        for _ in range(10):
            m(torch.rand(16, 3, 12, 12) * 1.5 - 0.5 + 0.3 * torch.randn(16, 3, 1, 1))
    return m.eval()


def _bn_input_stats(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    seen = []
    hooks = [bn.register_forward_pre_hook(lambda b, a: seen.append((b, a[0].mean((0, 2, 3)), a[0].std((0, 2, 3), unbiased=False))))
             for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _ranges(q: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(t.chosen_range[0]), float(t.chosen_range[1])) for n, t in quantizers(q)
            if not t.is_weight and t.chosen_range is not None}


def test_distillation_reduces_bn_statistics_loss_by_a_large_factor():
    m = _trained_block()
    res = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=32, iters=150, lr=0.2), progress=False)
    assert res.num_bn == 3 and res.inputs.shape == (32, *SHAPE[1:])
    # the loss the function reports is the module-level loss of its inputs
    assert float(bn_statistics_loss(m, res.inputs).detach()) == pytest.approx(res.final_loss, rel=1e-4)
    assert res.final_loss < res.initial_loss / 100, (res.initial_loss, res.final_loss)
    # and far below what real-looking data from a different distribution (standard normal) gives
    assert res.final_loss < float(bn_statistics_loss(m, torch.randn(32, *SHAPE[1:])).detach()) / 100


def test_distilled_batch_matches_running_statistics_per_channel():
    m = _trained_block(1)
    x = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=32, iters=150), progress=False).inputs
    stats = _bn_input_stats(m, x)
    assert len(stats) == 3
    for bn, mean, std in stats:
        target_std = (bn.running_var + bn.eps).sqrt()
        scale = float(target_std.max())
        assert float((mean - bn.running_mean).abs().max()) < 0.02 * scale
        assert float((std - target_std).abs().max()) < 0.02 * scale


def test_distillation_leaves_the_model_alone_and_respects_input_range():
    m = _trained_block(2)
    m.train()  # distill_inputs must run in eval mode (train mode would update the running stats) and restore it
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=8, iters=20), input_range=(-0.5, 1.0),
                         progress=False)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())
    assert float(res.inputs.min()) >= -0.5 and float(res.inputs.max()) <= 1.0
    # seeded: the same config gives the same inputs; another seed different ones
    m.eval()
    again = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=8, iters=20), input_range=(-0.5, 1.0),
                           progress=False)
    other = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=8, iters=20, seed=1),
                           input_range=(-0.5, 1.0), progress=False)
    assert torch.equal(res.inputs, again.inputs) and not torch.equal(res.inputs, other.inputs)


def test_batches_of_batch_size():
    m = _trained_block(3)
    res = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=10, batch_size=4, iters=5), progress=False)
    assert res.inputs.shape[0] == 10 and torch.isfinite(res.inputs).all()


def test_label_loss_makes_confident_inputs():
    m = _trained_block(6)
    with torch.no_grad():
        m[-1].weight.mul_(20)  # a head that can be confident (a trained classifier's logits are large)
    plain = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=16, iters=80), progress=False)
    labelled = distill_inputs(m, torch.zeros(SHAPE), DistillConfig(num_samples=16, iters=80, label_weight=1.0),
                              progress=False)
    with torch.no_grad():
        conf = [float(m(r.inputs).softmax(1).max(1).values.mean()) for r in (plain, labelled)]
    assert conf[1] > 0.85 and conf[1] > conf[0] + 0.2, conf
    assert labelled.final_loss < labelled.initial_loss / 10  # the statistics are still matched
    with pytest.raises(ConfigError, match="classifier"):
        distill_inputs(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval(), torch.zeros(SHAPE),
                       DistillConfig(num_samples=4, iters=2, label_weight=1.0), progress=False)


def test_quantize_data_free_with_distilled_ranges_end_to_end():
    m = _trained_block(4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = DistillConfig(num_samples=16, iters=60)
    q = lowbit.quantize(m, W8, None, torch.zeros(SHAPE), progress=False,
                        dfq=DFQ(act_range="distilled", distill=cfg, input_range=(-1.0, 1.5)))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the user's model is untouched
    assert any("distilled" in n for n in lowbit.decision_log(q).notes)
    r = _ranges(q)
    assert r and all(math.isfinite(lo) and math.isfinite(hi) and lo < hi for lo, hi in r.values())
    # calibrated on the distilled inputs: exactly what calibrating on them by hand gives
    x = distill_inputs(m, torch.zeros(SHAPE), cfg, input_range=(-1.0, 1.5), progress=False).inputs
    by_hand = _ranges(lowbit.quantize(m, W8, [x], dfq=DFQ(), progress=False))
    assert r.keys() == by_hand.keys()
    assert all(r[k] == pytest.approx(by_hand[k], rel=1e-5, abs=1e-6) for k in r)
    # not the BatchNorm-rule ranges
    std_rule = _ranges(lowbit.quantize(m, W8, None, torch.zeros(SHAPE), progress=False, dfq=DFQ(input_range=(-1.0, 1.5))))
    assert r.keys() == std_rule.keys()
    assert any(abs(r[k][1] - std_rule[k][1]) > 1e-3 * max(1.0, abs(std_rule[k][1])) for k in r)
    y = q(torch.rand(4, *SHAPE[1:]) * 2.5 - 1.0)
    assert torch.isfinite(y).all()


def test_real_calibration_data_wins_over_distillation():
    m = _trained_block(5)
    data = [torch.rand(8, *SHAPE[1:])]
    q = lowbit.quantize(m, W8, data, progress=False, dfq=DFQ(act_range="distilled", distill=DistillConfig(iters=1)))
    assert not any("distilled" in n for n in lowbit.decision_log(q).notes)
    assert _ranges(q) == _ranges(lowbit.quantize(m, W8, data, progress=False, dfq=DFQ()))


def test_model_without_batchnorm_raises_a_clear_error():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 2)).eval()
    with pytest.raises(NoBatchNormError, match="no BatchNorm.*calib_data=") as e:
        lowbit.quantize(m, W8, None, torch.zeros(SHAPE), progress=False, dfq=DFQ(act_range="distilled"))
    assert isinstance(e.value, QuantizationError)
    with pytest.raises(NoBatchNormError):
        bn_statistics_loss(m, torch.zeros(SHAPE))


@pytest.mark.parametrize("kwargs", [dict(num_samples=0), dict(batch_size=-1), dict(iters=1.5), dict(iters=True),
                                    dict(lr=0.0), dict(lr="fast"), dict(seed=None),
                                    dict(label_weight=-1.0)])
def test_distill_config_validation(kwargs):
    with pytest.raises(ConfigError, match="DistillConfig"):
        DistillConfig(**kwargs)


def test_dfq_distill_option_validation():
    assert DFQ(act_range="distilled").distill == DistillConfig()
    assert DFQ(act_range="distilled", distill=DistillConfig(iters=7)).distill.iters == 7
    with pytest.raises(ConfigError, match="act_range='distilled'"):
        DFQ(distill=DistillConfig())
    with pytest.raises(ConfigError, match="DistillConfig"):
        DFQ(act_range="distilled", distill={"iters": 10})
    with pytest.raises(ConfigError, match="'distilled'"):
        DFQ(act_range="zeroq")
    with pytest.raises(ConfigError, match="one example input tensor"):
        distill_inputs(_trained_block(), [torch.zeros(SHAPE)], progress=False)
