"""QAT single process: STE/LSQ gradients, BatchNorm training-time fold, schedules, convert parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import ConfigError, ShapeMismatchError
from lowbit.nn.layers import QuantLayerMixin
from lowbit.qat import (
    QuantConvBn2d,
    convert,
    distillation_loss,
    freeze_bn,
    freeze_observers,
    is_qat_model,
    prepare_qat,
    qat_step,
)
from lowbit.recipes import W8A8, Custom, WeightOnly
from lowbit.spec import QuantSpec, compute_qparams

W4A4 = Custom(weight=QuantSpec("int4", granularity="channel"), activation=QuantSpec("uint4", symmetric=False))


def conv_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
    )


def batches(n: int, shape=(8, 3, 8, 8), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def units(model: nn.Module) -> list[QuantConvBn2d]:
    return [m for m in model.modules() if isinstance(m, QuantConvBn2d)]


# ------------------------------------------------------------------------------------------- STE
def test_ste_weight_gradient_matches_torch_fake_quantize():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4))
    qat = prepare_qat(net, WeightOnly(bits=4, symmetric=True), example_inputs=torch.randn(2, 6))
    layer = next(m for m in qat.modules() if isinstance(m, QuantLayerMixin))
    x = torch.randn(5, 6)
    out = qat(x)
    out.pow(2).sum().backward()
    # Independent reference: torch's own per-channel fake quantization and its (clipped STE) autograd.
    wq = layer.weight_quantizer
    w = layer.weight.detach().clone().requires_grad_(True)
    ref_w = torch.fake_quantize_per_channel_affine(w, wq.scale, wq.zero_point, 0, -8, 7)
    ref = F.linear(x, ref_w, layer.bias.detach())
    ref.pow(2).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-6)
    assert net[0].weight.grad is None  # the float model is untouched


def test_ste_clipped_weights_get_no_gradient():
    torch.manual_seed(0)
    qat = prepare_qat(nn.Sequential(nn.Linear(6, 4)), WeightOnly(bits=4, symmetric=True),
                      example_inputs=torch.randn(2, 6), freeze_observers_after=0)
    layer = next(m for m in qat.modules() if isinstance(m, QuantLayerMixin))
    wq = layer.weight_quantizer
    wq.set_qparams(wq.scale * 0.5)  # half the range: the largest weights now clip
    x = torch.randn(5, 6)
    qat(x).sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    F.linear(x, torch.fake_quantize_per_channel_affine(w, wq.scale, wq.zero_point, 0, -8, 7), layer.bias).sum().backward()
    assert (w.grad == 0).any() and (w.grad != 0).any()
    assert torch.equal(layer.weight.grad == 0, w.grad == 0)
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-6)


def test_ste_weight_range_follows_the_weight_every_step():
    torch.manual_seed(0)
    qat = prepare_qat(nn.Sequential(nn.Linear(6, 4)), WeightOnly(bits=8, symmetric=True), example_inputs=torch.randn(2, 6))
    layer = next(m for m in qat.modules() if isinstance(m, QuantLayerMixin))
    with torch.no_grad():
        layer.weight.mul_(3.0)
    qat(torch.randn(2, 6))
    expected, _ = compute_qparams(layer.weight_quantizer.spec, layer.weight.amin(1), layer.weight.amax(1))
    assert torch.equal(layer.weight_quantizer.scale, expected)


# ------------------------------------------------------------------------------------------- LSQ
@pytest.mark.parametrize("learnable", ["ste", "lsq", "lsq+"])
def test_training_reduces_loss_and_lsq_learns_scales(learnable):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    xs = batches(8, (32, 8), seed=1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    qat = prepare_qat(student, W4A4, calib_data=xs[:2], learnable=learnable)
    init = {n: q.scale.detach().clone() for n, q in lowbit.quantizers(qat)}
    opt = torch.optim.Adam(qat.parameters(), lr=3e-3)

    def loss_on(x):
        with torch.no_grad():
            y = teacher(x)
        return F.mse_loss(qat(x), y)

    with torch.no_grad():
        qat.eval()
        start = sum(float(loss_on(x)) for x in xs)
        qat.train()
    for _ in range(10):
        for x in xs:
            opt.zero_grad()
            loss_on(x).backward()
            opt.step()
    qat.eval()
    with torch.no_grad():
        end = sum(float(loss_on(x)) for x in xs)
    assert end < 0.5 * start
    assert qat_step(qat) == 80
    if learnable != "ste":
        learned = [q for _, q in lowbit.quantizers(qat) if q.learnable]
        assert len(learned) == 5  # 2 weights + input + 2 outputs
        assert all(isinstance(q.scale, nn.Parameter) for q in learned)
        changed = [n for n, q in lowbit.quantizers(qat) if not torch.equal(q.scale.detach(), init[n])]
        assert len(changed) == 5
        offsets = [q for q in learned if q.lsq_offset is not None]
        assert len(offsets) == (3 if learnable == "lsq+" else 0)  # affine activations only, never weights


# ----------------------------------------------------------------------------- BatchNorm fold
def test_conv_bn_training_forward_equals_float_conv_then_batchnorm():
    """With quantization off the training-time fold is exact: conv -> BN(batch stats) in float."""
    torch.manual_seed(0)
    net = conv_bn_net()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    qat = prepare_qat(net, WeightOnly(bits=8, symmetric=True), example_inputs=batches(1)[0])
    freeze_observers(qat)  # else the weight's per-step recalibration switches quantization back on
    unit = units(qat)[0]
    unit.weight_quantizer.quant_enabled.fill_(False)
    ref_conv, ref_bn = copy.deepcopy(net[0]), copy.deepcopy(net[1])
    x = batches(1, seed=3)[0]
    y = unit(x)
    ref = ref_bn.train()(ref_conv(x))
    assert torch.allclose(y, ref, atol=1e-5)
    # running statistics updated exactly as torch's BatchNorm updates them
    assert torch.allclose(unit.bn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert torch.allclose(unit.bn.running_var, ref_bn.running_var, atol=1e-6)


def test_bn_freeze_switches_to_running_statistics():
    torch.manual_seed(0)
    qat = prepare_qat(conv_bn_net(), W8A8(), calib_data=batches(2), freeze_bn_after=2, freeze_observers_after=2)
    assert len(units(qat)) == 2
    unit = units(qat)[0]
    xs = batches(4, seed=5)
    stats = [unit.bn.running_mean.clone()]
    for x in xs[:2]:
        qat(x)
        stats.append(unit.bn.running_mean.clone())
    assert not torch.equal(stats[0], stats[1]) and not torch.equal(stats[1], stats[2])
    assert not bool(unit.bn_frozen)
    y_train = qat(xs[2])  # third step: frozen before it runs
    assert bool(unit.bn_frozen)
    assert torch.equal(unit.bn.running_mean, stats[2])
    # frozen = folded with running statistics: the training forward equals the eval forward ...
    qat.eval()
    with torch.no_grad():
        assert torch.equal(qat(xs[2]), y_train.detach())
    # ... and the unit's output equals conv(x, fq(W t), (b - mean) t + beta) computed by hand.
    x = torch.randn(2, 3, 8, 8)
    bn = unit.bn
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = unit.weight_quantizer(unit.weight * t.reshape(-1, 1, 1, 1))
    b = (unit.bias - bn.running_mean) * t + bn.bias
    ref = unit.output_quantizer(torch.relu(F.conv2d(x, w, b, padding=1)))
    with torch.no_grad():
        assert torch.equal(unit(x), ref)


def test_freeze_bn_by_hand_and_bn_gradients():
    torch.manual_seed(0)
    qat = prepare_qat(conv_bn_net(), W8A8(), calib_data=batches(2))
    qat(batches(1, seed=2)[0]).sum().backward()
    unit = units(qat)[0]
    assert unit.bn.weight.grad is not None and unit.bn.weight.grad.abs().sum() > 0
    assert freeze_bn(qat) == 2 and freeze_bn(qat) == 0


# ------------------------------------------------------------------------------------ observers
def test_activation_observer_is_a_moving_average_until_frozen():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    qat = prepare_qat(net, W8A8(), calib_data=batches(2, (16, 6)), freeze_observers_after=3, observer_momentum=0.25)
    q = qat.get_submodule("0").output_quantizer
    lo, hi = q.chosen_range
    lo, hi = lo.clone(), hi.clone()
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    for k, x in enumerate(batches(5, (16, 6), seed=7)):
        qat(x * (k + 1))  # growing range
        if k < 3:
            xx = seen[-1]
            lo = lo + 0.25 * (xx.min() - lo)
            hi = hi + 0.25 * (xx.max() - hi)
            s, z = compute_qparams(q.spec, lo, hi)
            assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)
        else:
            assert torch.equal(q.scale, s)
    h.remove()
    assert not bool(q.observer_enabled)
    layer = qat.get_submodule("0")
    frozen_w_scale = layer.weight_quantizer.scale.clone()
    with torch.no_grad():
        layer.weight.mul_(2.0)
    qat(batches(1, (16, 6))[0])
    assert torch.equal(layer.weight_quantizer.scale, frozen_w_scale)


# --------------------------------------------------------------------------------------- convert
def _train(qat: nn.Module, steps: int = 4) -> None:
    opt = torch.optim.SGD(qat.parameters(), lr=0.02)
    for x in batches(steps, seed=11):
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("learnable", ["ste", "lsq"])
def test_deepcopy_of_a_qat_model_trains_like_the_original(learnable):
    """A torch.fx GraphModule drops its root's attributes and forward hooks when deep-copied; the QAT
    configuration and the root hook (step counter, BatchNorm freeze, observers, LSQ clamp) must come back,
    so the copy and the original, trained alike, stay bit-identical (a copy without them would not count
    steps nor freeze its BatchNorms after 2 steps)."""
    torch.manual_seed(0)
    qat = prepare_qat(conv_bn_net(), W8A8(), calib_data=batches(2), learnable=learnable, freeze_bn_after=2)
    assert isinstance(qat, torch.fx.GraphModule)
    twin = copy.deepcopy(qat)
    assert is_qat_model(twin) and twin.lowbit_recipe == qat.lowbit_recipe
    assert len(twin._forward_pre_hooks) == len(qat._forward_pre_hooks) == 1
    again = copy.deepcopy(twin)  # a copy of a copy, and no hook twice
    assert len(again._forward_pre_hooks) == 1
    _train(qat)
    _train(twin)
    assert qat_step(twin) == qat_step(qat) == 4
    assert all(bool(u.bn_frozen) for u in units(twin))
    st, st_twin = qat.state_dict(), twin.state_dict()
    assert st.keys() == st_twin.keys()
    for k in st:
        assert torch.equal(st[k], st_twin[k]), k
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), qat.eval()(x))


@pytest.mark.parametrize("learnable", ["ste", "lsq"])
def test_convert_equals_qat_model_in_eval_mode(learnable):
    torch.manual_seed(0)
    qat = prepare_qat(conv_bn_net(), W8A8(), calib_data=batches(2), learnable=learnable, freeze_bn_after=2)
    _train(qat)
    qat.eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        ref = qat(x)
        dep = convert(qat)
        out = dep(x)
    assert torch.equal(out, ref)
    assert not is_qat_model(dep) and is_qat_model(qat)
    assert not units(dep) and not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    assert not any(q.learnable or isinstance(q.scale, nn.Parameter) or bool(q.observer_enabled)
                   for _, q in lowbit.quantizers(dep))
    assert "lowbit_qat_step" not in dict(dep.named_buffers())
    assert not dep.training
    # the QAT model keeps working after convert (convert copied it)
    with torch.no_grad():
        assert torch.equal(qat(x), ref)


def test_convert_lsq_plus_offsets_become_integer_zero_points():
    torch.manual_seed(0)
    qat = prepare_qat(conv_bn_net(), W8A8(), calib_data=batches(2), learnable="lsq+")
    _train(qat)
    qat.eval()
    qat(torch.randn(1, 3, 8, 8))  # clamps the scales as a forward does
    offsets = {q.name: (q.lsq_offset.detach().clone(), q.scale.detach().clone()) for _, q in lowbit.quantizers(qat)
               if q.lsq_offset is not None}
    assert offsets
    dep = convert(qat)
    for _, q in lowbit.quantizers(dep):
        if q.name in offsets:
            o, s = offsets[q.name]
            assert q.lsq_offset is None
            assert int(q.zero_point) == int(torch.clamp(torch.round(-o / s), 0, 255))
            assert torch.equal(q.scale, s)


@pytest.mark.parametrize("learnable", ["ste", "lsq"])
def test_prepare_from_ptq_model_starts_at_its_scales(learnable):
    torch.manual_seed(0)
    net = conv_bn_net()
    ptq = lowbit.quantize(net, W8A8(), batches(2), progress=False)
    before = {n: q.scale.clone() for n, q in lowbit.quantizers(ptq)}
    qat = prepare_qat(ptq, learnable=learnable)
    for n, q in lowbit.quantizers(qat):
        assert torch.equal(q.scale.detach(), before[n])
    assert all(not q.learnable for _, q in lowbit.quantizers(ptq))  # the PTQ model is untouched
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        if learnable == "ste":
            assert torch.equal(qat.eval()(x), ptq(x))
        else:  # LSQ computes round((x - o) / s) s + o: the same grid up to float rounding
            assert torch.allclose(qat.eval()(x), ptq(x), atol=1e-6, rtol=1e-5)


def test_prepare_errors():
    net = conv_bn_net()
    with pytest.raises(ConfigError, match="learnable"):
        prepare_qat(net, W8A8(), calib_data=batches(1), learnable="adaround")
    with pytest.raises(ConfigError, match="freeze_observers_after"):
        prepare_qat(net, W8A8(), calib_data=batches(1), learnable="lsq", freeze_observers_after=3)
    with pytest.raises(ConfigError, match="steps"):
        prepare_qat(net, W8A8(), calib_data=batches(1), freeze_bn_after=-1)
    with pytest.raises(ConfigError, match="recipe"):
        prepare_qat(net)
    qat = prepare_qat(net, W8A8(), calib_data=batches(1))
    with pytest.raises(ConfigError, match="already prepared"):
        prepare_qat(qat)
    with pytest.raises(ConfigError, match="no quantizers"):
        convert(net)
    with pytest.raises(ConfigError, match="observer_momentum"):
        prepare_qat(net, W8A8(), calib_data=batches(1), observer_momentum="0.1")
    # the schedule lives on the prepared root: a plain model or a submodule is refused, not ignored
    for fn in (qat_step, freeze_observers):
        with pytest.raises(ConfigError, match="prepare_qat"):
            fn(net)
        with pytest.raises(ConfigError, match="submodule"):
            fn(qat.get_submodule("0"))


# ---------------------------------------------------------------------------------- distillation
def test_distillation_loss_matches_torch_kl_div():
    torch.manual_seed(0)
    s = torch.randn(7, 10, requires_grad=True)
    t = torch.randn(7, 10, requires_grad=True)
    T = 3.0
    got = distillation_loss(s, t, T)
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    assert torch.allclose(got, ref, atol=1e-6)
    got.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert float(distillation_loss(t.detach(), t.detach(), T)) == pytest.approx(0.0, abs=1e-7)
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature"):
            distillation_loss(s, t, bad)
    with pytest.raises(ShapeMismatchError):
        distillation_loss(s, t[:, :5], T)


def test_lowbit_convert_routes_qat_models_and_export_takes_the_result(tmp_path):
    torch.manual_seed(0)
    qat = lowbit.prepare_qat(conv_bn_net(), W8A8(), calib_data=batches(2), freeze_bn_after=1)
    _train(qat, 2)
    dep = lowbit.convert(qat)
    assert not is_qat_model(dep) and not units(dep)
    x = batches(1, seed=4)[0]
    qat.eval()
    with torch.no_grad():
        assert torch.equal(dep(x), qat(x))
    path = tmp_path / "qat.onnx"
    lowbit.export_onnx(dep, x, str(path))
    assert path.stat().st_size > 0
