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


class _Residual(nn.Module):
    """conv -> relu -> conv (+ skip) -> conv -> pool -> linear: a branch the stepwise capture must keep alive."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = torch.relu(self.c2(y)) + y
        return self.fc(self.c3(z).mean((2, 3)))


def test_stepwise_capture_gives_the_rerun_results_exactly():
    """The O(L) stepwise capture feeds each layer exactly the inputs the O(L^2) re-run gives."""
    torch.manual_seed(3)
    m = _Residual().eval()
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    cfg = AdaRoundConfig(iters=40, lr=1e-2, batch_size=8, qdrop_prob=0.3, act_spec=QuantSpec("uint8", symmetric=False))
    spec = QuantSpec("int4", symmetric=True, granularity="channel")
    out_a, res_a, _ = adaround(m, data, spec, cfg, progress=False)
    out_b, res_b, _ = adaround(m, data, spec, cfg, progress=False, capture="rerun")
    assert list(res_a) == list(res_b) == ["c1", "c2", "c3", "fc"]
    for k in res_a:
        assert torch.equal(res_a[k].weight, res_b[k].weight), k
        assert res_a[k].error == res_b[k].error and res_a[k].error_nearest == res_b[k].error_nearest
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(out_a(x), out_b(x))


def test_stepwise_capture_inputs_match_hooks():
    """The stepper's captured inputs equal forward-hook captures on the model rounded so far."""
    from lowbit.passes.adaround import _capture, _Stepper

    torch.manual_seed(4)
    m = _Residual().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    st = _Stepper.create(m, data)
    assert st is not None
    for name in ("c1", "c2", "c3", "fc"):
        got = st.inputs_of(name)
        assert torch.equal(got, _capture(m, name, data)), name
        with torch.no_grad():  # change the layer as AdaRound would: later captures must see it
            m.get_submodule(name).weight.mul_(0.5)
    assert st.inputs_of("c1") is None  # already passed: the caller re-runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adaround_on_cuda_matches_cpu():
    torch.manual_seed(5)
    m = _Residual().eval()
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    cfg = AdaRoundConfig(iters=30, lr=1e-2, batch_size=8)
    _, res_cpu, _ = adaround(m, data, INT3, cfg, progress=False)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # TF32 flips many near-ties
    try:
        out, res_gpu, _ = adaround(m.cuda(), data, INT3, cfg, progress=False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for k in res_cpu:
        assert res_gpu[k].weight.device.type == "cuda"
        scale = res_gpu[k].scale.reshape(()) if res_gpu[k].scale.numel() == 1 else res_gpu[k].scale
        assert _on_grid(res_gpu[k].weight.cpu(), INT3, scale.cpu())
        assert res_gpu[k].error <= res_gpu[k].error_nearest
        # Adam's normalized steps turn float noise in tiny gradients into different near-tie decisions,
        # so only the quality is compared, not each rounding decision
        assert res_gpu[k].error <= 2 * res_cpu[k].error + 1e-9, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qdrop_and_act_quant_run_on_cuda():
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 6, 3, padding=1).cuda()
    cfg = AdaRoundConfig(iters=20, lr=1e-2, batch_size=8, qdrop_prob=0.5, act_spec=QuantSpec("uint8", symmetric=False))
    res = adaround_layer(conv, torch.randn(16, 4, 6, 6, device="cuda"), QuantSpec("int4", symmetric=True), cfg)
    assert res.weight.device.type == "cuda" and res.error <= res.error_nearest


def test_grid_follows_the_weight_calibrator():
    """With an MSE weight spec, AdaRound rounds to the grid the layer's weight quantizer will use."""
    from lowbit.nn.quantizer import TensorQuantizer

    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 3.0  # an outlier: the MSE range clips it, min/max does not
    spec = QuantSpec("int4", symmetric=True, granularity="channel", calibrator="mse")
    wq = TensorQuantizer(spec, is_weight=True)
    wq.calibrate_now(conv.weight.detach())
    s, z = weight_qparams(conv.weight, spec)
    assert torch.equal(s, wq.scale) and torch.equal(z, wq.zero_point)
    s_mm, _ = weight_qparams(conv.weight, spec.replace(calibrator="minmax"))
    assert float(s[0]) < float(s_mm[0])
    res = adaround_layer(conv, torch.randn(16, 4, 6, 6), spec, AdaRoundConfig(iters=20, lr=1e-2, batch_size=8))
    assert torch.equal(res.scale, wq.scale)
    # AdaRound's weight re-quantized by the layer's quantizer is unchanged
    assert torch.allclose(wq(res.weight), res.weight, atol=1e-6)


def test_post_activation_reconstruction_ignores_what_the_clip_removes():
    """With ``activation=relu6`` the objective is ``|| relu6(W x + b) - relu6(W~ x~ + b) ||^2``: the errors are
    the post-activation ones (checked independently), an output channel that the clip always zeroes
    costs nothing, and the result is never worse than nearest rounding on that objective."""
    torch.manual_seed(2)
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.bias[0] = -1e3  # channel 0 is below the clip for every input
    x = torch.randn(256, 16) @ torch.randn(16, 16)
    act = nn.ReLU6()
    res = adaround_layer(layer, x, INT3, FAST, activation=act)
    ref = act(layer(x)).detach()

    def post_err(w: torch.Tensor) -> float:
        return float(((act(x @ w.T + layer.bias.detach()) - ref) ** 2).sum(-1).mean())

    s, z = weight_qparams(layer.weight, INT3)
    assert res.error_nearest == pytest.approx(post_err(fake_quantize(layer.weight.detach(), s, z, INT3)), rel=1e-4)
    assert res.error == pytest.approx(post_err(res.weight), rel=1e-4) and res.error <= res.error_nearest
    pre = adaround_layer(layer, x, INT3, FAST)
    assert res.error_nearest < pre.error_nearest, "the clip removes part of the pre-activation error"
    assert not torch.equal(res.weight, pre.weight), "a different objective rounds differently"


def test_post_activation_finds_the_clip_after_each_layer():
    from lowbit.passes import fold_bn
    from lowbit.passes._graph import activation_after, trace

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6()
            self.b, self.c, self.fc = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            y = self.act(self.bn(self.a(x)))  # a -> (folded BN) -> ReLU6
            z = self.b(y)
            y = torch.relu(z) + z  # b's output is used twice: no post-activation
            return self.fc(torch.relu(self.c(y)).mean((2, 3)))  # c -> relu function; fc: nothing after

    net, _ = fold_bn(Net().eval())
    gm = trace(net)
    assert isinstance(activation_after(gm, "a"), nn.ReLU6)
    assert activation_after(gm, "b") is None and activation_after(gm, "fc") is None
    assert activation_after(gm, "c") is torch.relu
    data = [torch.randn(8, 3, 5, 5)]
    cfg = AdaRoundConfig(iters=20, post_activation=True)
    _, res, plog = adaround(net, data, INT3, cfg, progress=False)
    assert any("2 of 4 layer(s)" in r.detail for r in plog.applied)
    _, res_pre, _ = adaround(net, data, INT3, AdaRoundConfig(iters=20), progress=False)
    assert res["a"].error_nearest < res_pre["a"].error_nearest  # the first layer sees the same input


def test_targets_stored_only_when_no_larger_than_the_inputs_and_equal_either_way():
    from lowbit.passes.adaround import _Targets

    torch.manual_seed(5)
    x = torch.randn(70, 4, 5, 5)
    for conv, stored in ((nn.Conv2d(4, 2, 3), True), (nn.Conv2d(4, 16, 1), False)):
        t = _Targets(conv, x, bs=16)
        assert (t.stored is not None) == stored
        ref = conv(x).detach()
        idx = torch.tensor([3, 69, 3, 0])
        torch.testing.assert_close(t[idx], ref[idx])
        torch.testing.assert_close(t[10:50], ref[10:50])
        assert not t[idx].requires_grad


def test_recomputed_targets_give_the_stored_targets_result(store_every_target):
    """A conv whose output is 4x its input recomputes its target each step; keeping it instead (the
    memory-hungry way) gives the same rounding and the same errors."""
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 16, 1)
    x = torch.randn(48, 4, 6, 6) * torch.rand(1, 4, 1, 1) * 3
    spec = QuantSpec("int4", symmetric=False, granularity="channel")
    cfg = AdaRoundConfig(iters=60, lr=1e-2, batch_size=8, qdrop_prob=0.3, act_spec=QuantSpec("uint8", symmetric=False))
    lean = adaround_layer(conv, x, spec, cfg)
    store_every_target()
    kept = adaround_layer(conv, x, spec, cfg)
    assert torch.equal(lean.weight, kept.weight) and lean.used == kept.used
    assert lean.error == pytest.approx(kept.error, rel=1e-5)
    assert lean.error_nearest == pytest.approx(kept.error_nearest, rel=1e-5)


def test_act_quant_rows_equal_torch_fake_quant_and_a_prequantized_input():
    """``act_spec`` quantizes the rows each step uses with one range over all stored inputs: the same
    values as torch's own per-tensor fake-quant of the whole tensor, and the same AdaRound result as
    handing AdaRound inputs quantized beforehand (with the float ones for the target and QDrop)."""
    from lowbit.passes.adaround import _ActQuantRows

    torch.manual_seed(8)
    x = torch.randn(40, 4, 6, 6) * 2 + 0.5
    u8 = QuantSpec("uint8", symmetric=False)
    rows = _ActQuantRows(x, u8)
    s = (x.max() - x.min()) / 255
    z = int(torch.clamp(torch.round(-x.min() / s), 0, 255))
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), z, 0, 255)
    idx = torch.tensor([39, 0, 7, 7])
    torch.testing.assert_close(rows[idx], ref[idx], atol=1e-6, rtol=0)
    assert rows.shape == x.shape
    conv = nn.Conv2d(4, 16, 1)
    spec = QuantSpec("int4", symmetric=False, granularity="channel")
    cfg = AdaRoundConfig(iters=60, lr=1e-2, batch_size=8, qdrop_prob=0.3)
    inside = adaround_layer(conv, x, spec, AdaRoundConfig(**{**cfg.__dict__, "act_spec": u8}))
    before = adaround_layer(conv, rows[:], spec, cfg, float_inputs=x)
    assert torch.equal(inside.weight, before.weight)
    assert inside.error == pytest.approx(before.error, rel=1e-6)


def test_chunked_errors_weight_a_short_last_chunk_by_its_rows():
    """70 rows in chunks of 32, 32, 6: the per-chunk means, weighted by rows, give the mean over all rows,
    for every candidate the chunk function returns."""
    from lowbit.passes.adaround import _chunked_errors

    x = torch.arange(70, dtype=torch.float64) ** 1.5
    means = _chunked_errors(70, lambda rows: (x[rows].mean(), (x[rows] ** 2).mean()), bs=32)
    assert means == pytest.approx([float(x.mean()), float((x**2).mean())], rel=1e-12)
