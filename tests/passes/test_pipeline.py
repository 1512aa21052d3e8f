"""DFQ and AdaRound as options of ``lowbit.quantize``: the glue composes the passes exactly as the
passes do on their own, AdaRounded weights survive re-quantization bit for bit, data rules are enforced."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.errors import ConfigError, EmptyCalibrationError
from lowbit.passes import (
    DFQ,
    AdaRoundConfig,
    ChannelClip,
    absorb_high_bias,
    adaround,
    correct_bias,
    equalize,
    fold_bn,
    weight_specs,
)
from lowbit.passes._layer import forward_with, quantize_weight
from lowbit.passes.pipeline import PassPlan, plan_passes, run_passes
from lowbit.recipes import W8A8, Custom, LayerSpec

from .conftest import mobile_block, randomize_bn, spread_channels

W8PT = QuantSpec("int8", symmetric=True)  # per tensor
U8 = QuantSpec("uint8", symmetric=False)
FAST = AdaRoundConfig(iters=40, lr=1e-2, batch_size=16)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = mobile_block().eval()
    randomize_bn(m)
    spread_channels(m)
    return m


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b**2).mean())


def _quant_layers(qmodel):
    return [(n, m) for n, m in qmodel.named_modules() if getattr(m, "weight_quantizer", None) is not None]


@torch.no_grad()
def test_dfq_weight_only_is_data_free_and_equals_the_passes_composed_by_hand():
    m = _model()
    x = torch.randn(16, 3, 8, 8)
    qm = lowbit.quantize(m, Custom(weight=W8PT), dfq=True, progress=False)  # no calib_data at all
    # the same steps by hand: fold -> CLE -> HBA -> analytic bias correction -> nearest per-tensor weights
    ref = fold_bn(m)[0]
    ref = equalize(ref)[0]
    ref = absorb_high_bias(ref)[0]
    ref = correct_bias(ref, W8PT)[0]
    for mod in ref.modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            mod.weight.copy_(quantize_weight(mod.weight, W8PT))
    torch.testing.assert_close(qm(x), ref(x), rtol=1e-5, atol=1e-5)
    passes = qm.lowbit_passes
    assert {r.pass_name for r in passes.applied} == {"fold_bn", "cle", "hba", "bias_correction"}
    assert len([r for r in passes.applied if r.pass_name == "bias_correction"]) == 2  # layers after a BN
    assert any("passes before capture" in n for n in lowbit.decision_log(qm).notes)


@torch.no_grad()
def test_empirical_bias_correction_uses_the_calibration_data():
    m = _model(1)
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    qm = lowbit.quantize(m, Custom(weight=W8PT), data, dfq=DFQ(bias_correction="empirical"), progress=False)
    ref = absorb_high_bias(equalize(fold_bn(m)[0])[0])[0]
    ref = correct_bias(ref, W8PT, data)[0]
    for mod in ref.modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            mod.weight.copy_(quantize_weight(mod.weight, W8PT))
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(qm(x), ref(x), rtol=1e-5, atol=1e-5)
    assert all("empirical" in r.detail for r in qm.lowbit_passes.applied if r.pass_name == "bias_correction")


@torch.no_grad()
def test_cle_only_keeps_the_float_function():
    m = _model(2)
    x = torch.randn(8, 3, 8, 8)
    ref = m(x)
    out, qparams, plog = run_passes(copy.deepcopy(m), W8A8(), PassPlan(DFQ(high_bias_absorption=False,
                                                                           bias_correction=None)))
    assert qparams == {} and len([r for r in plog.applied if r.pass_name == "cle"]) == 2
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@torch.no_grad()
def test_dfq_recovers_per_tensor_w8a8_and_fuses_the_equalized_relu6():
    m = _model(0)
    data = [torch.randn(32, 3, 8, 8) for _ in range(2)]
    x = torch.randn(64, 3, 8, 8)
    ref = m(x)
    plain = lowbit.quantize(m, W8A8(per_channel=False), data, progress=False)
    dfq = lowbit.quantize(m, W8A8(per_channel=False), data, dfq=True, progress=False)
    e_plain, e_dfq = _rel_err(plain(x), ref), _rel_err(dfq(x), ref)
    assert e_dfq < 0.2 * e_plain, (e_plain, e_dfq)
    # the ReLU6 became a per-channel clip, fused into its conv: one uint8 quantizer after the clip
    assert isinstance(dfq.get_submodule("0").activation, ChannelClip)
    assert lowbit.decision_log(dfq).path == "graph"
    assert float(dfq.get_submodule("0").output_quantizer.zero_point) == 0  # range starts at 0 (post-clip)


def test_adaround_weights_requantize_exactly_and_match_the_pass():
    m = _model(4)
    torch.manual_seed(5)
    data = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    # affine: the rounded weights' own min/max would give other qparams, so exactness needs the recorded ones
    w4 = QuantSpec("uint4", symmetric=False, granularity="channel")
    recipe = Custom(weight=w4, activation=U8, keep_first_last_8bit=True)
    qm = lowbit.quantize(m, recipe, data, adaround=FAST, progress=False)
    # the same pass run directly, with the per-layer specs and the recipe's activation spec
    specs = weight_specs(fold_bn(m)[0], recipe, ((data[0],), {}))
    assert specs["0"].format.name == "int8" and specs["11"].format.name == "int8"
    assert specs["3"].format.name == "uint4" and specs["6"].format.name == "uint4"
    ref, results, _ = adaround(fold_bn(m)[0], data, specs, AdaRoundConfig(**{**FAST.__dict__, "act_spec": U8}),
                               progress=False)
    layers = _quant_layers(qm)
    assert [n for n, _ in layers] == ["0", "3", "6", "11"]
    with torch.no_grad():
        for name, layer in layers:
            wq = layer.weight_quantizer
            assert torch.equal(layer.weight, ref.get_submodule(name).weight), name
            assert torch.equal(wq(layer.weight), layer.weight), name  # re-quantizing changes nothing
            torch.testing.assert_close(wq.scale, results[name].scale, rtol=0, atol=0)
            shape = (-1, *([1] * (layer.weight.dim() - 1)))
            q = layer.weight / wq.scale.reshape(shape) + wq.zero_point.reshape(shape)
            assert torch.allclose(q, q.round(), atol=1e-4)
            assert specs[name].qmin <= float(q.round().min()) and float(q.round().max()) <= specs[name].qmax
            assert results[name].error <= results[name].error_nearest
    assert any(r.used == "adaround" for r in results.values())


def test_adaround_with_a_one_shot_iterator_still_calibrates_activations():
    m = _model(6)
    torch.manual_seed(6)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    qm = lowbit.quantize(m, Custom(weight=QuantSpec("int4", symmetric=True, granularity="channel"), activation=U8),
                         iter(batches), adaround=AdaRoundConfig(iters=5, batch_size=8), progress=False)
    qs = [q for _, q in lowbit.nn.quantizer.quantizers(qm)]
    assert qs and all(q.is_calibrated for q in qs)
    assert any("calibrated on 2 batch" in n for n in lowbit.decision_log(qm).notes)


def test_adaround_and_bias_correction_are_not_combined():
    m = _model(7)
    data = [torch.randn(8, 3, 8, 8)]
    qm = lowbit.quantize(m, Custom(weight=W8PT), data, dfq=True, adaround=AdaRoundConfig(iters=3, batch_size=8),
                         progress=False)
    bc = [r for r in qm.lowbit_passes if r.pass_name == "bias_correction"]
    assert len(bc) == 1 and not bc[0].applied and "AdaRound" in bc[0].detail


def test_data_rules():
    m = _model(8)
    # static activations without data: DFQ derives the ranges from BatchNorm statistics, which needs an
    # example input (to place the quantizers) and the input's range
    with pytest.raises(EmptyCalibrationError, match="example_inputs"):
        lowbit.quantize(m, W8A8(per_channel=False), dfq=True, progress=False)
    with pytest.raises(EmptyCalibrationError, match="input_range"):
        lowbit.quantize(m, W8A8(per_channel=False), None, torch.zeros(1, 3, 8, 8), dfq=True, progress=False)
    with pytest.raises(EmptyCalibrationError, match="AdaRound needs calibration data"):
        lowbit.quantize(m, Custom(weight=W8PT), adaround=True, progress=False)
    with pytest.raises(EmptyCalibrationError, match="empirical bias correction needs calibration data"):
        lowbit.quantize(m, Custom(weight=W8PT), dfq=DFQ(bias_correction="empirical"), progress=False)
    with pytest.raises(ConfigError, match="dfq= takes True/False or a DFQ"):
        lowbit.quantize(m, Custom(weight=W8PT), dfq="yes", progress=False)
    with pytest.raises(ConfigError, match="bias_correction"):
        DFQ(bias_correction="exact")
    assert plan_passes(True, False) == PassPlan(DFQ(), None)
    assert plan_passes(False, True).adaround == AdaRoundConfig() and plan_passes().active is False


def test_overrides_reach_the_passes():
    m = _model(9)
    recipe = Custom(weight=W8PT, overrides={"6": None, "11": LayerSpec(QuantSpec("int6", symmetric=True), None)})
    specs = weight_specs(fold_bn(m)[0], recipe)
    assert set(specs) == {"0", "3", "11"} and specs["11"].format.name == "int6"
    qm = lowbit.quantize(m, recipe, dfq=DFQ(cle=False, high_bias_absorption=False), progress=False)
    bc = {r.layers[0]: r for r in qm.lowbit_passes if r.pass_name == "bias_correction"}
    assert not bc["6"].applied and "no weight spec" in bc["6"].detail


class _SamePadConv(nn.Conv2d):
    """A Conv2d that pads inside ``forward`` (TensorFlow "same" padding, as EfficientNet-Lite's stem)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_forward_with_runs_a_subclass_forward_with_the_new_weight():
    torch.manual_seed(10)
    conv = _SamePadConv(3, 4, 2, stride=2)
    x = torch.randn(2, 3, 7, 7)
    w, b = torch.randn_like(conv.weight), torch.randn_like(conv.bias)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, 2)
    torch.testing.assert_close(forward_with(conv, x, w, b), ref)
    torch.testing.assert_close(forward_with(conv, x, w, None), ref - b.reshape(1, -1, 1, 1))
    plain = nn.Conv2d(3, 4, 2, stride=2)
    torch.testing.assert_close(forward_with(plain, x, w, b), F.conv2d(x, w, b, 2))


@torch.no_grad()
def test_empirical_bias_correction_through_a_padding_subclass():
    """The hook that measures the shift calls the layer's own forward (with its padding), not itself."""
    torch.manual_seed(11)
    conv = _SamePadConv(3, 4, 2, stride=2)
    data = [torch.randn(4, 3, 7, 7) for _ in range(2)]
    b0 = conv.bias.clone()
    model = correct_bias(nn.Sequential(conv), W8PT, data)[0]
    dw = quantize_weight(conv.weight, W8PT) - conv.weight
    y = torch.cat([F.conv2d(F.pad(x, (0, 1, 0, 1)), dw, None, 2) for x in data])
    torch.testing.assert_close(model[0].bias, b0 - y.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_pass_log_summary_counts_records_and_distinct_layers():
    from lowbit.passes.log import PassLog

    log = PassLog()
    log.add("cle", ("a", "b"), True, "pair")
    log.add("cle", ("b", "c"), True, "pair")
    log.add("adaround", ("blk.0", "blk.1", "blk.2"), True, "block")
    log.add("hba", ("c",), False, "no ReLU after it")
    assert log.summary() == "cle x2 (3 layers), adaround x1 (3 layers); 1 skipped"
    assert PassLog().summary() == "none applied; 0 skipped"
