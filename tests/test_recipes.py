"""Recipes: the specs each preset gives, overrides / exclude resolution, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from lowbit.capture.plan import Planner
from lowbit.errors import ConfigError
from lowbit.recipes import (
    BF16,
    FP8,
    FP16,
    W4A8,
    W4A16,
    W8A8,
    W8A16,
    BinaryWeights,
    Custom,
    LayerSpec,
    PowerOfTwoWeights,
    TernaryWeights,
    W8A8Dynamic,
    WeightOnly,
)

LIN, CONV, EMB = nn.Linear(4, 4), nn.Conv2d(4, 4, 1), nn.Embedding(5, 4)


def test_w8a8_specs():
    r = W8A8(calibrator="kl")
    s = r.layer_spec(CONV)
    assert s.weight.format.name == "int8" and s.weight.symmetric and s.weight.granularity == PerChannel(0)
    assert s.activation.format.name == "uint8" and not s.activation.symmetric
    assert s.activation.calibrator.name == "kl" and s.activation.granularity == PerTensor()
    assert r.layer_spec(EMB).activation is None  # embeddings are weight-only
    assert r.layer_spec(join="add").activation == r.edge_spec()
    assert W8A8(per_channel=False).layer_spec(LIN).weight.granularity == PerTensor()
    sym = W8A8(act_dtype="int8", symmetric_act=True).activation_spec()
    assert sym.format.name == "int8" and sym.symmetric
    for cal in ("minmax", "moving_average", "kl", "percentile", "mse"):
        assert W8A8(calibrator=cal).activation_spec().calibrator.name == cal


def test_w8a8_bad_values():
    with pytest.raises(ConfigError, match="act_dtype"):
        W8A8(act_dtype="int4")
    with pytest.raises(ConfigError, match="signed"):
        W8A8(symmetric_act=True)
    with pytest.raises(ConfigError, match="unknown calibrator"):
        W8A8(calibrator="entropyy").activation_spec()


def test_dynamic_covers_linear_only():
    r = W8A8Dynamic()
    assert r.edge_spec() is None
    s = r.layer_spec(LIN)
    assert s.activation.dynamic and s.activation.granularity == PerTensor()
    assert r.layer_spec(CONV).is_float
    assert W8A8Dynamic(granularity="token").layer_spec(LIN).activation.granularity == PerToken()
    assert r.layer_spec(join="matmul").is_float


def test_weight_only_and_w4a16():
    s = W4A16().layer_spec(LIN)
    assert s.activation is None and s.weight.format.name == "uint4" and not s.weight.symmetric
    assert s.weight.granularity == PerGroup(128, -1)
    assert WeightOnly(bits=2, group_size=32, symmetric=True).layer_spec(LIN).weight.format.name == "int2"
    assert WeightOnly(bits=8).layer_spec(LIN).weight.granularity == PerChannel(0)
    with pytest.raises(ConfigError):
        WeightOnly(bits=1)
    with pytest.raises(ConfigError):
        W4A16(group_size=0)


def test_other_presets():
    assert W8A16().activation_spec().format.name == "int16"
    f8 = FP8().layer_spec(LIN)
    assert f8.weight.format.name == "fp8_e4m3" and f8.activation.format.name == "fp8_e4m3"
    assert FP16().layer_spec(LIN).weight.scaled is False and BF16().weight_spec(LIN).format.name == "bf16"
    assert FP16(activations=False).edge_spec() is None
    assert BinaryWeights().weight_spec(LIN).format.name == "binary" and BinaryWeights().edge_spec() is None
    assert TernaryWeights().weight_spec(LIN).format.name == "ternary"
    assert PowerOfTwoWeights(bits=4).weight_spec(LIN).format.name.startswith("log2")
    c = Custom(weight=QuantSpec("int4", granularity="channel"), activation=None, layer_types=(nn.Linear,))
    assert c.layer_spec(LIN).weight.format.name == "int4" and c.layer_spec(CONV).is_float
    with pytest.raises(ConfigError, match="no quantized layer"):
        Custom(layer_types=(nn.LSTM,))


def test_recipes_are_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        W8A8().calibrator = "kl"  # type: ignore[misc]


NAMES = ["features.0", "features.1", "features.2.conv", "classifier", "add_1"]


def test_planner_override_order_and_exclude():
    int4 = QuantSpec("int4", granularity="channel")
    r = W8A8(
        exclude=("features.0",),
        overrides={"classifier": None, r"features\.2\..*": int4, nn.Conv2d: LayerSpec(None, None), "add_1": W8A16()},
    )
    p = Planner(r, NAMES)
    assert p.resolve("features.0", CONV).spec.is_float and "exclude" in p.resolve("features.0", CONV).source
    assert p.resolve("classifier", LIN).spec.is_float
    res = p.resolve("features.2.conv", CONV)  # regex beats type
    assert res.spec.weight == int4 and res.spec.activation == r.activation_spec() and res.explicit
    assert p.resolve("features.1", CONV).spec.is_float  # type override
    assert p.resolve("add_1", join="add").spec.activation.format.name == "int16"
    assert not p.resolve("features.1", LIN).explicit


def test_a_key_that_names_a_layer_is_that_name_not_a_regex():
    """"layer1.0" names a layer: it must not also catch "layer1x0" (which its regex reading fullmatches),
    while a key that names nothing is still a regex and a name still covers the layers under it."""
    names = ["layer1.0", "layer1.0.conv", "layer1x0", "fc"]
    p = Planner(W8A8(exclude=("layer1.0",)), names)
    assert p.resolve("layer1.0", CONV).spec.is_float and p.resolve("layer1.0.conv", CONV).spec.is_float
    assert not p.resolve("layer1x0", CONV).spec.is_float
    p = Planner(W8A8(exclude=(r"layer1.0\.conv|fc",)), names)
    assert p.resolve("layer1.0.conv", CONV).spec.is_float and p.resolve("fc", LIN).spec.is_float
    assert not p.resolve("layer1x0", CONV).spec.is_float
    p = Planner(W8A8(overrides={"layer1.0": QuantSpec("int4", granularity="channel")}), names)
    assert p.resolve("layer1x0", CONV).source == "W8A8"
    # an exact name wins over a regex listed before it (the documented order: name, regex, type)
    p = Planner(W8A8(overrides={r"layer1.*": QuantSpec("int4", granularity="channel"), "layer1.0.conv": None}), names)
    assert p.resolve("layer1.0.conv", CONV).spec.is_float and p.resolve("layer1x0", CONV).spec.weight.format.name == "int4"
    # the layer's own name wins over its container's, whatever the dict's order
    p = Planner(W8A8(overrides={"layer1.0": None, "layer1.0.conv": QuantSpec("int4", granularity="channel")}), names)
    assert p.resolve("layer1.0.conv", CONV).spec.weight.format.name == "int4" and p.resolve("layer1.0", CONV).spec.is_float


def test_unknown_override_lists_close_matches():
    with pytest.raises(ConfigError, match=r"'clasifier'.*Did you mean: 'classifier'"):
        Planner(W8A8(overrides={"clasifier": None}), NAMES)
    with pytest.raises(ConfigError, match="features.9"):
        Planner(W8A8(exclude=("features.9",)), NAMES)
    with pytest.raises(ConfigError, match="must be a QuantSpec"):
        W8A8(overrides={"classifier": "int4"})


def test_keep_first_last_8bit():
    r = W4A16(group_size=2, keep_first_last_8bit=True)
    p = Planner(r, NAMES, ["features.0", "features.1", "classifier"])
    first = p.resolve("features.0", CONV).spec.weight
    assert first.format.name == "int8" and first.granularity == PerChannel(0)
    assert p.resolve("features.1", CONV).spec.weight.format.name == "uint4"
    assert p.resolve("classifier", LIN).spec.weight.format.name == "int8"


def test_w4a8_specs_and_its_grid_in_closed_form():
    """W4A8: uint4 per channel with a zero point, uint8 activations, first/last layer int8 weights; after
    quantize, each channel's 16 codes span [min(w, 0), max(w, 0)]: code 0 at the channel's minimum and code
    15 at its maximum (scale = (max - min) / 15, zero point round(-min / scale))."""
    r = W4A8()
    mid = r.layer_spec(CONV)
    assert str(mid.weight) == "uint4 affine per-channel(axis=0) minmax"
    assert str(mid.activation) == "uint8 affine per-tensor minmax"
    assert str(W4A8(symmetric=True, calibrator="kl").layer_spec(CONV).activation) == "uint8 affine per-tensor kl"
    assert W4A8(symmetric=True).layer_spec(CONV).weight.format.name == "int4"
    p = Planner(r, NAMES, ["features.0", "features.1", "classifier"])
    assert p.resolve("features.0", CONV).spec.weight.format.name == "int8"
    assert p.resolve("features.1", CONV).spec.weight.format.name == "uint4"
    assert p.resolve("classifier", LIN).spec.weight.format.name == "int8"

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    q = lowbit.quantize(model, r, [torch.randn(4, 3, 8, 8)])
    layer, w = q.get_submodule("2"), model[2].weight.detach()
    wq = layer.weight_quantizer
    lo, hi = w.amin((1, 2, 3)).clamp(max=0), w.amax((1, 2, 3)).clamp(min=0)
    scale = (hi - lo) / 15
    torch.testing.assert_close(wq.scale.flatten(), scale, rtol=1e-6, atol=0)
    assert torch.equal(wq.zero_point.flatten().float(), torch.round(-lo / scale))
    codes = torch.round(layer.quantized_weight() / scale.view(-1, 1, 1, 1)) + wq.zero_point.view(-1, 1, 1, 1)
    assert codes.amin((1, 2, 3)).eq(0).all() and codes.amax((1, 2, 3)).eq(15).all()
    assert q.get_submodule("0").weight_quantizer.spec.format.name == "int8"


def test_layer_spec_for_unknown_module_is_float():
    assert W8A8().layer_spec(nn.LSTM(2, 2)).is_float


@pytest.mark.parametrize("make,needle", [
    (lambda: FP8(format="int8"), "FP8 format must be"),  # would silently give int8 weights and activations
    (lambda: W8A8Dynamic(act_dtype="int4"), "act_dtype must be"),
    (lambda: W8A8Dynamic(granularity="row"), "granularity must be"),
    (lambda: W8A8(exclude=("fc", 3)), "exclude must be"),
    (lambda: WeightOnly(bits="4"), "got '4'"),
    (lambda: W4A16(group_size=2.5), "positive integer"),
])
def test_bad_values_are_refused_when_the_recipe_is_made(make, needle):
    with pytest.raises(ConfigError, match=needle):
        make()
