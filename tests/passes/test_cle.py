"""Cross-layer equalization invariants (AIMET style): float output unchanged, channel ranges equalized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.passes import ChannelClip, equalize, equalize_pair, fold_bn
from lowbit.passes._layer import in_channel_absmax, out_channel_absmax

from .conftest import mobile_block, randomize_bn, spread_channels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _assert_equalized(first: nn.Module, second: nn.Module, tol: float = 1e-3) -> None:
    r1, r2 = out_channel_absmax(first), in_channel_absmax(second)
    assert torch.allclose(r1 / r1.max(), r2 / r2.max(), atol=tol), (r1 / r1.max(), r2 / r2.max())


def test_pair_closed_form():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 8, 0], [0, 0, 0.5], [2, 0, 0]]))
        b.weight.copy_(torch.tensor([[2.0, 1, 4, 1], [0, 2, 0, 0.5]]))
    s = equalize_pair(a, b)
    # s_i = sqrt(r1 r2) / r2 with r1 = (1, 8, 0.5, 2), r2 = (2, 2, 4, 1)
    assert torch.allclose(s, torch.tensor([0.5 ** 0.5, 2.0, 2 ** 0.5 / 4, 2 ** 0.5]))
    assert torch.allclose(out_channel_absmax(a), in_channel_absmax(b))


def test_mobile_block_output_unchanged_and_ranges_equal():
    torch.manual_seed(0)
    m = mobile_block()
    randomize_bn(m)
    spread_channels(m)
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    folded, _ = fold_bn(m)
    ref = folded(x)
    eq, log = equalize(folded, tol=1e-7, max_iter=500)
    assert _rel(eq(x), ref) < 1e-5
    assert {r.layers for r in log.applied} == {("0", "3"), ("3", "6")}
    assert isinstance(eq[2], ChannelClip) and isinstance(eq[5], ChannelClip)
    _assert_equalized(eq[0], eq[3])
    _assert_equalized(eq[3], eq[6])
    # the pointwise conv feeds a Flatten, so it cannot pair with the Linear: logged, not silent
    assert any(r.layers == ("6",) and "Flatten" in r.detail for r in log.skipped)
    # equalization made the ranges closer: worst channel range / tensor range grew for the first conv
    r0 = out_channel_absmax(folded[0])
    r1 = out_channel_absmax(eq[0])
    assert (r1.min() / r1.max()) > 2 * (r0.min() / r0.max())


def test_relu6_modes():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU6(), nn.Linear(6, 3))
    spread_channels(m)
    x = torch.randn(16, 4) * 3
    eq, log = equalize(m, relu6="skip")
    assert not log.applied and "ReLU6" in log.skipped[0].detail and torch.equal(eq(x), m(x))
    eq, log = equalize(m, relu6="to_relu")
    assert isinstance(eq[1], nn.ReLU) and len(log.applied) == 1
    assert _rel(eq(x), torch.relu(m[0](x)) @ m[2].weight.T + m[2].bias) < 1e-5
    eq, _ = equalize(m)  # channel_clip keeps the exact function, clip included
    assert (m[0](x) > 6).any(), "the test needs inputs that hit the ReLU6 clip"
    assert _rel(eq(x), m(x)) < 1e-5
    # running equalize again on an equalized model finds the ChannelClip and keeps it exact
    eq2, log2 = equalize(eq)
    assert len(log2.applied) == 1 and _rel(eq2(x), m(x)) < 1e-5
    with pytest.raises(ConfigError):
        equalize(m, relu6="clip")


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        return self.conv3(torch.relu(self.conv2(y)) + y)


def test_residual_skipped_with_reason():
    torch.manual_seed(2)
    m = Residual()
    spread_channels(m)
    x = torch.randn(2, 4, 5, 5)
    eq, log = equalize(m)
    assert not log.applied
    reasons = {r.layers[0]: r.detail for r in log.skipped}
    assert "residual" in reasons["conv1"] and "add" in reasons["conv2"]
    assert torch.equal(eq(x), m(x))


class SharedAct(nn.Module):
    """One nn.ReLU6 reused after two layers (as EfficientNet-Lite's blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


def test_shared_relu6_split_per_call_site():
    torch.manual_seed(3)
    m = SharedAct()
    spread_channels(m, 1.0)
    x = torch.randn(32, 3) * 4
    eq, log = equalize(m, tol=1e-7, max_iter=300)
    assert isinstance(eq, torch.fx.GraphModule) and "split 1" in log.applied[0].detail
    assert {r.layers for r in log.applied[1:]} == {("a", "b"), ("b", "c")}
    clips = [mod for mod in eq.modules() if isinstance(mod, ChannelClip)]
    assert len(clips) == 2 and not torch.equal(clips[0].upper, clips[1].upper)
    assert _rel(eq(x), m(x)) < 1e-5
    _assert_equalized(eq.a, eq.b)
    _assert_equalized(eq.b, eq.c)


@pytest.mark.parametrize("first,second,shape", [
    (nn.Conv1d(3, 5, 1), nn.Linear(5, 2), (4, 3, 5)),  # the Linear reads the length dim, not the 5 channels
    (nn.Linear(4, 5), nn.Conv1d(5, 3, 1), (4, 5, 4)),  # the conv reads dim 1, not the 5 Linear features
])
def test_conv_and_linear_without_flatten_refused(first, second, shape):
    torch.manual_seed(4)
    m = nn.Sequential(first, nn.ReLU(), second)
    spread_channels(m)
    x = torch.randn(shape)
    eq, log = equalize(m)
    assert not log.applied and "flatten" in log.skipped[0].detail
    assert torch.equal(eq(x), m(x))


def test_grouped_chain_through_leaky_relu_and_pools():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                      nn.Conv2d(8, 6, 3, padding=1, groups=2), nn.ReLU6(), nn.AvgPool2d(2),
                      nn.Conv2d(6, 4, 1, groups=2))
    spread_channels(m)
    x = torch.randn(3, 4, 8, 8) * 3
    eq, log = equalize(m, tol=1e-7, max_iter=500)
    assert {r.layers for r in log.applied} == {("0", "3"), ("3", "6")}
    assert _rel(eq(x), m(x)) < 1e-5
    _assert_equalized(eq[0], eq[3])
    _assert_equalized(eq[3], eq[6])


@pytest.mark.parametrize("groups", [2, 8])
def test_one_step_makes_grouped_ranges_equal(groups):
    """After one equalize_pair both ranges are sqrt(r1 r2) per channel (grouped and depthwise second layer)."""
    torch.manual_seed(6)
    a, b = nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=groups)
    spread_channels(nn.Sequential(a, b))

    def ranges(a, b):  # input channel c of b: group c // (8 / g), slot c % (8 / g) of that group's filters
        per = 8 // groups
        r2 = [b.weight[(c // per) * (8 // groups):(c // per + 1) * (8 // groups), c % per].abs().max() for c in range(8)]
        return a.weight.detach().abs().amax((1, 2, 3)).double(), torch.stack(r2).detach().double()

    r1, r2 = ranges(a, b)
    ref = (r1 * r2).sqrt()
    assert not torch.allclose(r1, ref, rtol=1e-2), "the ranges must start unequal"
    equalize_pair(a, b)
    r1, r2 = ranges(a, b)
    assert torch.allclose(r1, ref, rtol=1e-6) and torch.allclose(r2, ref, rtol=1e-6)
