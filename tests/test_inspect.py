"""inspect_model: FLOPs/MACs from FlopCounterMode against closed forms and thop's published figures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.inspect import bytes_at_bits, format_summary, inspect_model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.pw(self.bn(self.dw(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.block(x).mean(dim=(2, 3))
        return self.fc(y) + self.fc(y)  # fc called twice: its FLOPs count twice


def test_small_net_closed_form():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.block.dw.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 8.0]).view(4, 1, 1, 1).expand(4, 1, 3, 3))
        net.block.dw.weight[0, 0, 0, 0] = -1.0
    s = inspect_model(net, torch.randn(2, 4, 5, 5))
    assert [la.name for la in s.layers] == ["block.dw", "block.bn", "block.pw", "fc"]
    dw, bn, pw, fc = s.layers
    # depthwise 3x3 'same': N * C * H * W * k * k MACs
    assert dw.macs == 2 * 4 * 5 * 5 * 9 and dw.flops == 2 * dw.macs
    assert dw.params == 36 and dw.is_depthwise and not pw.is_depthwise
    # pointwise 4 -> 6 with bias: MACs = N * H * W * Cin * Cout (bias adds are not counted)
    assert pw.macs == 2 * 5 * 5 * 4 * 6 and pw.params == 30
    assert fc.macs == 2 * (2 * 6 * 3) and fc.params == 21
    assert bn.macs == 0 and bn.params == 8
    assert s.total_flops == 2 * (dw.macs + pw.macs + fc.macs)
    assert s.total_macs == dw.macs + pw.macs + fc.macs
    assert s.total_params == 36 + 8 + 30 + 21
    # weight statistics of the depthwise conv: per-channel absmax [1, 2, 0.5, 8] -> ratio 16
    assert (dw.weight_min, dw.weight_max, dw.weight_absmax) == (-2.0, 8.0, 8.0)
    assert dw.channel_range_ratio == 16.0 and dw.weight_shape == (4, 1, 3, 3)
    assert math.isnan(bn.channel_range_ratio)  # 1-D weight: no channel axis to compare
    assert dw.bytes == {"fp32": 144, "fp16": 72, "int8": 36, "int4": 18}
    assert s.bytes["int4"] == bytes_at_bits(95, 4) == 48
    assert s.input_shapes == ((2, 4, 5, 5),)


def test_meta_model_counts_like_a_real_one():
    torch.manual_seed(0)
    real = inspect_model(Net(), torch.randn(2, 4, 5, 5))
    with torch.device("meta"):
        meta_net = Net()
    meta = inspect_model(meta_net, torch.empty(2, 4, 5, 5, device="meta"))
    assert [(la.name, la.params, la.flops, la.weight_shape) for la in meta.layers] == [
        (la.name, la.params, la.flops, la.weight_shape) for la in real.layers
    ]
    assert meta.total_flops == real.total_flops and meta.bytes == real.bytes
    assert all(math.isnan(la.weight_max) for la in meta.layers)


def test_model_state_is_left_alone():
    torch.manual_seed(0)
    net = Net().train()
    net.fc.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inspect_model(net, (torch.randn(2, 4, 5, 5),))
    assert net.training and net.block.bn.training and not net.fc.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats untouched


def test_zero_channel_gives_inf_ratio_and_kwargs_inputs():
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2, bias=False)

        def forward(self, *, x):
            return self.lin(x)

    m = KW()
    with torch.no_grad():
        m.lin.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, -3.0, 2.0]]))
    layer = inspect_model(m, {"x": torch.randn(5, 3)}).layer("lin")
    assert layer.channel_range_ratio == math.inf and layer.macs == 5 * 3 * 2


def test_bad_arguments():
    with pytest.raises(ConfigError, match="nn.Module"):
        inspect_model(lambda x: x, torch.randn(1))
    with pytest.raises(ConfigError, match="example_inputs"):
        inspect_model(nn.Linear(2, 2), 3.0)
    s = inspect_model(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))
    with pytest.raises(KeyError, match="no layer 'nope'"):
        s.layer("nope")


@pytest.mark.parametrize(
    "arch, mparams, gmacs",
    [("resnet18", 11.7, 1.8), ("resnet50", 25.6, 4.1)],  # thop's published figures at 1x3x224x224
)
def test_torchvision_resnets_match_thop(arch, mparams, gmacs):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    with torch.device("meta"):  # shapes only: FlopCounterMode needs no values, so nothing is computed
        model = getattr(tv.models, arch)(weights=None)
    s = inspect_model(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert round(s.total_params / 1e6, 1) == mparams
    # thop adds BN/ReLU/pooling MACs (~0.5 %) that PyTorch's counter leaves out
    assert s.total_macs / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert sum(la.macs for la in s.layers) == s.total_macs  # every MAC sits in a leaf layer here
    assert s.layer("conv1").macs == 64 * 112 * 112 * 3 * 7 * 7
    assert s.layer("fc").macs == (2048 if arch == "resnet50" else 512) * 1000
    assert s.layer("fc").weight_shape == (1000, 2048 if arch == "resnet50" else 512)
    assert math.isnan(s.layer("fc").weight_absmax)
    table = format_summary(s, max_rows=5)
    assert "conv1" in table and table.splitlines()[-1].startswith("ResNet on [(1, 3, 224, 224)]: ")
    assert f"... {len(s.layers) - 5} more layers with fewer MACs not shown" in table
    assert f"{s.total_params / 1e6:.2f} M params" in table and f"{s.total_macs / 1e9:.2f} GMACs" in table


def test_grouped_strided_and_transposed_conv_closed_form():
    # conv MACs = N * Cout * (Cin / groups) * kh * kw * Hout * Wout; Hout = floor((9 + 2 - 3) / 2) + 1 = 5
    # transposed conv: every input pixel scatters into Cout / groups outputs: N * Cin * (Cout / groups) * k^2 * Hin * Win
    m = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4),
                      nn.ConvTranspose2d(12, 6, 4, stride=2, padding=1, groups=3),
                      nn.Conv2d(6, 12, 3, groups=6))  # depthwise with channel multiplier 2, on 10x10 -> 8x8
    s = inspect_model(m, torch.randn(2, 8, 9, 9))
    conv, convt, dw = s.layers
    assert conv.macs == 2 * 12 * (8 // 4) * 3 * 3 * 5 * 5
    assert convt.macs == 2 * 12 * (6 // 3) * 4 * 4 * 5 * 5
    assert dw.macs == 2 * 12 * 1 * 3 * 3 * 8 * 8
    assert [la.groups for la in s.layers] == [4, 3, 6]
    assert not conv.is_depthwise and dw.is_depthwise
    assert s.total_macs == conv.macs + convt.macs + dw.macs


def test_single_input_channel_conv_is_not_depthwise():
    # a grayscale stem has weight (Cout, 1, k, k) like a depthwise conv, but groups == 1
    stem = inspect_model(nn.Sequential(nn.Conv2d(1, 8, 3)), torch.randn(1, 1, 5, 5)).layers[0]
    assert stem.weight_shape == (8, 1, 3, 3) and stem.groups == 1 and not stem.is_depthwise


def test_model_that_is_one_layer():
    s = inspect_model(nn.Linear(4, 3), torch.randn(2, 4))
    assert [(la.name, la.type, la.params, la.macs) for la in s.layers] == [("", "Linear", 15, 2 * 4 * 3)]
    assert s.total_macs == 24 and s.total_params == 15


class PaddedConv(nn.Conv2d):
    """A conv that owns its weight and a padding child (EfficientNet's Conv2dStaticSamePadding)."""

    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, bias=False)
        self.pad = nn.ZeroPad2d(k // 2)

    def forward(self, x):
        return super().forward(self.pad(x))


class WithHead(nn.Module):
    """Own parameter plus a child with FLOPs: the row counts only the module's own work."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) @ torch.diag(self.scale)


def test_modules_with_own_weights_and_children_get_a_row():
    net = nn.Sequential(PaddedConv(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    s = inspect_model(net, torch.randn(1, 3, 6, 6))
    assert [la.name for la in s.layers] == ["0", "3"]
    conv = s.layers[0]
    assert conv.type == "PaddedConv" and conv.params == 8 * 3 * 9 and conv.macs == 6 * 6 * 8 * 3 * 9
    assert s.total_macs == conv.macs + 8 * 6 * 6 * 2
    h = inspect_model(WithHead(), torch.randn(5, 4))
    rows = {la.name: la for la in h.layers}
    assert set(rows) == {"", "fc"} and rows["fc"].macs == 5 * 4 * 3
    assert rows[""].params == 3 and rows[""].macs == 5 * 3 * 3  # the (5, 3) @ (3, 3) product only
    assert sum(la.macs for la in h.layers) == h.total_macs
