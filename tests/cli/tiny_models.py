"""Tiny models the CLI tests load as ``tests.cli.tiny_models:<factory>`` (MODEL = module:factory)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv(3->8, 3x3) + BN + ReLU, depthwise Conv(8, 3x3) + ReLU, global pool, Linear(8->4).

    Parameters: conv1 3*8*9 + 8 = 224, bn 16, dw 8*9 + 8 = 80, fc 8*4 + 4 = 36: 356 in all.
    MACs on 1x3x8x8: conv1 64*8*27 = 13824, dw 64*8*9 = 4608, fc 32: 18464.
    """

    example_input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.dw(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def broken() -> nn.Module:
    raise RuntimeError("this factory is broken on purpose")


def not_a_module() -> int:
    return 3
