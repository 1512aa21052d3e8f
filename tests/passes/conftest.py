"""Small models shared by the pass tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread is fastest (see tests/conftest.py)."""


def randomize_bn(model: nn.Module) -> None:
    """BatchNorm statistics and affine parameters far from the identity (so folding matters)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n))
            m.running_var.copy_(torch.rand(n) + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(n))
                m.bias.data.copy_(torch.randn(n))


def spread_channels(model: nn.Module, decades: float = 2.0) -> None:
    """Multiply each output channel of every conv/linear by 10**U(-decades, decades): the badly
    balanced ranges that per-tensor quantization suffers from and equalization fixes."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                f = 10 ** ((torch.rand(m.weight.shape[0]) * 2 - 1) * decades)
                m.weight.mul_(f.reshape(-1, *([1] * (m.weight.dim() - 1))))


def mobile_block() -> nn.Sequential:
    """conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> pointwise -> BN -> ReLU -> pool -> flatten -> linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )


@pytest.fixture
def store_every_target(monkeypatch):
    """Call it to make AdaRound's ``_Targets`` keep every reconstruction target in memory (the
    memory-hungry way it recomputes large ones instead), for comparing the two."""
    import importlib

    ada = importlib.import_module("lowbit.passes.adaround")  # the module, not the function it exports

    init = ada._Targets.__init__

    def storing(self, fn, x_fp, bs=ada.CHUNK):
        init(self, fn, x_fp, bs)
        if self.stored is None:
            with torch.no_grad():
                self.stored = fn(x_fp)

    return lambda: monkeypatch.setattr(ada._Targets, "__init__", storing)
