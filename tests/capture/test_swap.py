"""Module-swap fallback: untraceable models, the decision log, strict mode."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import UnsupportedLayerError
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.recipes import W8A8


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace ``if x.sum() > 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.rnn = nn.LSTM(2, 2)

    def forward(self, x):
        h = self.bn(self.conv(x)).mean((2, 3))
        if h.sum() > 0:
            h = h * 2
        return self.fc(h)


def test_untraceable_model_falls_back_and_says_so(caplog):
    torch.manual_seed(0)
    model = Branchy().eval()
    data = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        q = lowbit.quantize(model, W8A8(), data, progress=False)
    log = lowbit.decision_log(q)
    assert log.path == "module_swap" and "could not trace" in log.path_reason
    assert any("falling back to module swapping" in r.message for r in caplog.records)
    assert isinstance(q.conv, QuantConv2d) and isinstance(q.fc, QuantLinear)
    # no graph: each layer quantizes its own input, calibrated from the data
    assert q.conv.input_quantizer is not None and q.conv.input_quantizer.is_calibrated
    assert q.conv.output_quantizer is None
    # without a graph, a BN that is not in an nn.Sequential after its conv cannot be paired: logged, not hidden
    assert "BatchNorm not folded" in log.get("bn").reason
    assert log.get("rnn").quantized is False and "no quantized counterpart" in log.get("rnn").reason
    # equals the reference: quantized input -> conv with int8 per-channel weights
    x = data[0]
    s = q.conv.input_quantizer
    xq = torch.fake_quantize_per_tensor_affine(x, float(s.scale), int(s.zero_point), 0, 255)
    s_b = s.scale * q.conv.weight_quantizer.scale  # the int32 bias an int8 backend adds (and the export stores)
    ref = torch.nn.functional.conv2d(xq, q.conv.quantized_weight(), torch.round(q.conv.bias / s_b) * s_b)
    got = {}
    q.conv.register_forward_hook(lambda m, i, o: got.setdefault("y", o))
    q(x)
    torch.testing.assert_close(got["y"], ref, rtol=0, atol=1e-5)


def test_strict_raises_on_unexpected_skip():
    model = Branchy().eval()
    with pytest.raises(UnsupportedLayerError, match="rnn"):
        lowbit.quantize(model, W8A8(), [torch.randn(1, 3, 6, 6)], progress=False, strict=True)
    # excluding the layer explicitly satisfies strict
    q = lowbit.quantize(model, W8A8(), [torch.randn(1, 3, 6, 6)], progress=False, strict=True, exclude=("rnn", "bn"))
    assert lowbit.decision_log(q).get("rnn").by_user


class _SamePad(nn.Conv2d):
    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias)


class BranchySubclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _SamePad(3, 4, 2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        if h.sum() > 0:
            h = h * 2
        return self.fc(h)


def test_swap_logs_a_layer_subclass_with_its_own_forward():
    model = BranchySubclass().eval()
    data = [torch.randn(2, 3, 5, 5)]
    q = lowbit.quantize(model, W8A8(), data, progress=False)
    d = lowbit.decision_log(q).get("conv")
    assert d is not None and not d.quantized and "own forward" in d.reason
    assert type(q.conv) is _SamePad
    torch.testing.assert_close(q.conv(data[0]), model.conv(data[0]), rtol=0, atol=0)  # its forward is kept
    with pytest.raises(UnsupportedLayerError, match="conv"):
        lowbit.quantize(model, W8A8(), data, progress=False, strict=True)
