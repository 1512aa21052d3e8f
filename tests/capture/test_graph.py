"""Graph capture: quantizer placement (one per tensor, none inside Conv-BN-ReLU), joins, exact numerics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import QuantAdd, QuantConv2d, QuantLinear, QuantMatMul, TensorQuantizer
from lowbit.recipes import W8A8


class ResBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        out = torch.relu(z + y)
        return self.fc(torch.flatten(self.pool(out), 1))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(123)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * t.reshape(-1, 1, 1, 1)
    b = (conv.bias if conv.bias is not None else torch.zeros_like(t)) - bn.running_mean
    return w.detach(), (b * t + bn.bias).detach()


def _wq(w):
    s = w.abs().amax(dim=tuple(range(1, w.dim()))) / 127
    return torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0, -128, 127)


def _aq(x, q: TensorQuantizer):
    return torch.fake_quantize_per_tensor_affine(x, float(q.scale), int(q.zero_point), 0, 255)


def test_resblock_placement_and_exact_numerics():
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    _randomize_bn(model)
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    q = lowbit.quantize(model, W8A8(), data, progress=False)
    log = lowbit.decision_log(q)
    assert log.path == "graph"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.conv1.activation, nn.ReLU)
    assert q.conv2.activation is None and isinstance(q.fc, QuantLinear)
    adds = [m for m in q.modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 1 and isinstance(adds[0].activation, nn.ReLU)
    assert all(isinstance(i, nn.Identity) for i in adds[0].input_quantizers)  # both inputs already quantized
    names = sorted(r.name for r in lowbit.quant_table(q) if r.role != "weight")
    assert names == ["add.output", "conv1.output", "conv2.output", "fc.output", "pool.output", "x.output"]

    # input quantizer: minmax over all calibration batches, uint8 affine
    xq = q.get_submodule("x_quant")
    lo, hi = min(float(d.min()) for d in data), max(float(d.max()) for d in data)
    s = (hi - lo) / 255
    torch.testing.assert_close(xq.scale, torch.tensor(s), rtol=1e-6, atol=0)
    assert int(xq.zero_point) == round(-lo / s)

    # the whole model equals an independent reference built from torch ops and the read-back scales
    w1, b1 = _fold(model.conv1, model.bn1)
    w2, b2 = _fold(model.conv2, model.bn2)
    x = torch.randn(2, 3, 8, 8)
    h = _aq(x, xq)
    y = _aq(F.relu(F.conv2d(h, _wq(w1), b1, padding=1)), q.conv1.output_quantizer)
    z = _aq(F.conv2d(y, _wq(w2), b2, padding=1), q.conv2.output_quantizer)
    out = _aq(F.relu(z + y), adds[0].output_quantizer)
    p = _aq(F.adaptive_avg_pool2d(out, 1), q.get_submodule("pool_output_quant"))
    ref = _aq(F.linear(torch.flatten(p, 1), _wq(model.fc.weight.detach()), model.fc.bias), q.fc.output_quantizer)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-5)
    # the float model itself is untouched
    assert isinstance(model.bn1, nn.BatchNorm2d) and type(model.conv1) is nn.Conv2d


class Attention(nn.Module):
    def __init__(self, d=8) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, mask):
        h = self.norm(x)
        scores = torch.matmul(self.q(h), self.k(h).transpose(-1, -2))  # 1/sqrt(d) folded into q
        scores = scores + mask
        return torch.bmm(scores.softmax(-1), self.v(h)) + x


def test_attention_matmuls_quantized_mask_add_kept_float():
    torch.manual_seed(1)
    model = Attention().eval()
    mask = torch.zeros(2, 5, 5)
    mask[:, :, -1] = torch.finfo(torch.float32).min
    data = [(torch.randn(2, 5, 8), mask) for _ in range(2)]
    q = lowbit.quantize(model, W8A8(), data, progress=False)
    log = lowbit.decision_log(q)
    assert log.path == "graph"
    mms = [m for m in q.modules() if isinstance(m, QuantMatMul)]
    assert len(mms) == 2
    skipped = {d.name: d.reason for d in log.skipped}
    assert any("mask-like" in r for r in skipped.values()), skipped
    # the LayerNorm output feeds q, k and v through ONE shared quantizer
    norm_q = [r for r in lowbit.quant_table(q) if r.name == "norm.output"]
    assert len(norm_q) == 1
    out = q(*data[0])
    assert torch.isfinite(out).all()
    ref = model(*data[0])
    assert float(((out.detach() - ref.detach()) ** 2).mean() / (ref ** 2).mean()) < 1e-2  # SQNR > 20 dB on this toy


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (TF "same" padding), as EfficientNet-Lite's."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_functional_conv_on_own_weights_becomes_a_layer_and_folds_bn():
    torch.manual_seed(2)
    model = nn.Sequential(SamePadConv(3, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU6()).eval()
    _randomize_bn(model)
    data = [torch.randn(1, 3, 7, 7)]
    q = lowbit.quantize(model, W8A8(), data, progress=False)
    log = lowbit.decision_log(q)
    assert log.path == "graph" and log.get("0").quantized
    layer = q.get_submodule("0")
    assert isinstance(layer, QuantConv2d) and isinstance(layer.activation, nn.ReLU6)
    w, b = _fold(model[0], model[1])
    torch.testing.assert_close(layer.weight.detach(), w, rtol=1e-6, atol=1e-6)
    edges = [m for _, m in q.named_children() if isinstance(m, TensorQuantizer)]
    assert len(edges) == 1  # the (padded) model input; zero padding keeps values on the grid
    x = data[0]
    ref = F.relu6(F.conv2d(_aq(F.pad(x, (0, 1, 0, 1)), edges[0]), _wq(w), b, stride=2))
    torch.testing.assert_close(q(x), _aq(ref, layer.output_quantizer), rtol=0, atol=1e-5)


class SharedFC(nn.Module):
    """One Linear called twice; the second call reads a LayerNorm output (a float tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        a = self.fc(x)
        return a, self.fc(self.norm(a))


def test_shared_layer_quantizes_the_input_of_every_call():
    torch.manual_seed(3)
    model = SharedFC().eval()
    data = [torch.randn(4, 8) for _ in range(3)]
    q = lowbit.quantize(model, W8A8(), data, progress=False)
    assert lowbit.decision_log(q).path == "graph"
    names = sorted(r.name for r in lowbit.quant_table(q) if r.role != "weight")
    assert names == ["fc.output", "norm.output", "x.output"]  # the LayerNorm output feeds an int8 Gemm
    # reference: the two calls share the weight and the output quantizer; their inputs come from two
    # different quantizers, so the bias stays float (no single s_x for the int32 bias)
    w = _wq(model.fc.weight.detach())
    x = torch.randn(4, 8)
    a = _aq(F.linear(_aq(x, q.get_submodule("x_quant")), w, model.fc.bias), q.fc.output_quantizer)
    h = _aq(model.norm(a), q.get_submodule("norm_quant"))
    b = _aq(F.linear(h, w, model.fc.bias), q.fc.output_quantizer)
    ya, yb = q(x)
    torch.testing.assert_close(ya, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(yb, b, rtol=0, atol=1e-5)


class InPlaceAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.b = nn.Conv2d(3, 4, 1, bias=False)

    def forward(self, x):
        h = self.a(x)
        h.add_(self.b(x))  # the result is read through h, not through the add_ node
        return h


def test_in_place_add_quantized_join_feeds_later_uses():
    torch.manual_seed(4)
    model = InPlaceAdd().eval()
    data = [torch.randn(2, 3, 4, 4) for _ in range(2)]
    q = lowbit.quantize(model, W8A8(), data, progress=False)
    adds = [m for m in q.modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 1
    x = data[0]
    xq = _aq(x, q.get_submodule("x_quant"))
    ya = _aq(F.conv2d(xq, _wq(model.a.weight.detach())), q.a.output_quantizer)
    yb = _aq(F.conv2d(xq, _wq(model.b.weight.detach())), q.b.output_quantizer)
    torch.testing.assert_close(q(x), _aq(ya + yb, adds[0].output_quantizer), rtol=0, atol=1e-5)
