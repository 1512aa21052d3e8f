"""AdaRound: never worse than nearest rounding on its data, h ends binary, weights on the grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import QuantSpec, fake_quantize
from lowbit.errors import ConfigError, UnsupportedLayerError
from lowbit.passes import AdaRoundConfig, adaround, adaround_layer
from lowbit.passes._layer import weight_qparams

INT3 = QuantSpec("int3", symmetric=True)
FAST = AdaRoundConfig(iters=1500, lr=1e-2, batch_size=64, reg_weight=0.2)


def _on_grid(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> bool:
    s = scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.dim() else scale
    q = w / s
    return bool(torch.allclose(q, torch.round(q), atol=1e-4)) and bool((q.round().abs() <= spec.qmax + 1).all())


def test_layer_beats_nearest_and_h_binary():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs: rounding errors interact
    res = adaround_layer(layer, x, INT3, FAST)
    # nearest-rounding error computed independently with lowbit.fake_quantize
    s, z = weight_qparams(layer.weight, INT3)
    w_near = fake_quantize(layer.weight.detach(), s, z, INT3)
    ref = layer(x).detach()
    err_near = float(((x @ w_near.T + layer.bias.detach() - ref) ** 2).sum(-1).mean())
    assert res.error_nearest == pytest.approx(err_near, rel=1e-4)
    assert res.used == "adaround" and res.error < 0.8 * res.error_nearest
    err = float(((x @ res.weight.T + layer.bias.detach() - ref) ** 2).sum(-1).mean())
    assert err == pytest.approx(res.error, rel=1e-4)
    undecided = ((res.h > 0.01) & (res.h < 0.99)).float().mean()
    assert undecided < 0.05, f"{float(undecided):.2%} of h not binary"
    assert _on_grid(res.weight, INT3, s)
    # each weight moved at most one step from W / s (it rounds up or down, never further)
    assert ((res.weight - layer.weight).abs() <= s + 1e-6).all()


def test_per_channel_conv_with_qdrop_and_act_quant_never_worse():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(32, 4, 6, 6)
    spec = QuantSpec("int4", symmetric=False, granularity="channel")
    cfg = AdaRoundConfig(iters=150, lr=1e-2, batch_size=8, qdrop_prob=0.5,
                         act_spec=QuantSpec("uint8", symmetric=False))
    res = adaround_layer(conv, x, spec, cfg)
    assert res.error <= res.error_nearest
    q = res.weight / res.scale.reshape(-1, 1, 1, 1) + res.zero_point.reshape(-1, 1, 1, 1)
    assert torch.allclose(q, q.round(), atol=1e-4) and (q.round() >= spec.qmin).all() and (q.round() <= spec.qmax).all()


def test_model_level_sequential_order_and_qparams():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    data = [(torch.randn(16, 3, 6, 6), None) for _ in range(2)]
    out, results, log = adaround(m, data, INT3, AdaRoundConfig(iters=60, lr=1e-2, batch_size=16), progress=False)
    assert list(results) == ["0", "3"] and len(log.applied) == 2
    for name in ("0", "3"):
        r = results[name]
        assert r.error <= r.error_nearest
        layer = out.get_submodule(name)
        scale, _ = layer.lowbit_weight_qparams
        assert _on_grid(layer.weight, INT3, scale)
        assert torch.equal(layer.weight, r.weight)
    assert not torch.equal(m[0].weight, out[0].weight), "the input model must stay float"


def test_errors():
    with pytest.raises(ConfigError):
        AdaRoundConfig(qdrop_prob=1.5)
    with pytest.raises(UnsupportedLayerError):
        adaround_layer(nn.ConvTranspose2d(2, 2, 2), torch.randn(2, 2, 3, 3), INT3)
    with pytest.raises(ConfigError):
        adaround_layer(nn.Linear(2, 2), torch.randn(2, 2), QuantSpec("fp8_e4m3"))
