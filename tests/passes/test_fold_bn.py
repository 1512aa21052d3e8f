"""fold_bn: eval outputs unchanged, the right pairs found through fx and through nn.Sequential order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import UnsupportedLayerError
from lowbit.passes import fold_bn, fold_bn_into, output_stats

from .conftest import randomize_bn


class Branchy(nn.Module):
    """conv1 -> bn1 folds; conv2's output also feeds a residual add, so bn2 must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.tconv = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn4 = nn.BatchNorm1d(5, affine=False)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        y = self.bn2(z) + z
        y = self.bn3(self.tconv(y)).mean((2, 3))
        return self.bn4(self.fc(y))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)),
            nn.ReLU(),
            nn.Conv1d(4, 4, 1),
            nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()),
        )

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: symbolic_trace fails
            return x
        return self.body(x)


def test_fold_fx_graph_values_and_pairs():
    torch.manual_seed(0)
    m = Branchy()
    randomize_bn(m)
    m.eval()
    x = torch.randn(4, 3, 6, 6)
    ref = m(x)
    folded, pairs = fold_bn(m)
    assert sorted(pairs) == [("conv1", "bn1"), ("fc", "bn4"), ("tconv", "bn3")]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.BatchNorm2d)
    assert isinstance(m.bn1, nn.BatchNorm2d), "the input model must not change"
    out = folded(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()


def test_fold_sequential_fallback_across_nested_sequentials():
    torch.manual_seed(1)
    m = Untraceable()
    randomize_bn(m)
    m.eval()
    x = torch.randn(3, 2, 9)
    ref = m(x)
    folded, pairs = fold_bn(m)
    assert pairs == [("body.0.0", "body.0.1"), ("body.2", "body.3.0")]
    assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_formula_and_stats():
    torch.manual_seed(2)
    lin, bn = nn.Linear(3, 2), nn.BatchNorm1d(2, eps=1e-3)
    randomize_bn(nn.Sequential(bn))
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    fold_bn_into(lin, bn)
    t = bn.weight / torch.sqrt(bn.running_var + 1e-3)
    assert torch.allclose(lin.weight, w0 * t[:, None], atol=1e-6)
    assert torch.allclose(lin.bias, (b0 - bn.running_mean) * t + bn.bias, atol=1e-6)
    st = output_stats(lin)
    assert torch.equal(st.mean, bn.bias.detach()) and torch.equal(st.std, bn.weight.detach().abs())


def test_untracked_bn_refused():
    conv, bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)
    with pytest.raises(UnsupportedLayerError, match="running statistics"):
        fold_bn_into(conv, bn)
    folded, pairs = fold_bn(nn.Sequential(conv, bn))
    assert pairs == [] and isinstance(folded[1], nn.BatchNorm2d)


@pytest.mark.parametrize("conv,bn", [
    (nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=0.5)),  # no bias: one is created
    (nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3, affine=False)),
    (nn.Conv1d(4, 6, 3, groups=2, bias=False), nn.BatchNorm1d(6, eps=0.1, momentum=0.5)),
])
def test_fold_matches_torch_batchnorm_in_eval(conv, bn):
    """Against torch's own BatchNorm on running statistics gathered by train-mode passes."""
    torch.manual_seed(3)
    m = nn.Sequential(conv, bn)
    shape = (8, conv.in_channels, *([5] * (conv.weight.dim() - 2)))
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(shape) * 2 + 1)  # train mode: running statistics away from (0, 1)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features))
            bn.bias.copy_(torch.randn(bn.num_features))
    m.eval()
    x = torch.randn(shape)
    ref = m(x)
    folded, pairs = fold_bn(m)
    assert pairs == [("0", "1")] and folded[0].bias is not None
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    st = output_stats(folded[0])
    gamma = bn.weight.detach() if bn.affine else torch.ones(bn.num_features)
    beta = bn.bias.detach() if bn.affine else torch.zeros(bn.num_features)
    assert torch.equal(st.mean, beta) and torch.equal(st.std, gamma.abs())


def test_linear_on_sequence_with_batchnorm_over_length_left_alone():
    """Linear on (N, L, F) reads features on the last dim; BatchNorm1d(L) normalizes dim 1: not foldable."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(4)).eval()
    randomize_bn(m)
    x = torch.randn(3, 4, 6)
    folded, pairs = fold_bn(m)
    assert pairs == [] and isinstance(folded[1], nn.BatchNorm1d)
    assert torch.equal(folded(x), m(x))
