"""The two small Fashion-MNIST architectures (28x28 grayscale in, 10 logits out).

``FashionCNN`` is the plain case (conv-relu-pool twice, two linears); ``FashionResNet`` adds what
quantization has to handle in real CNNs: BatchNorm to fold, and residual adds whose two inputs have
different ranges.
"""

from __future__ import annotations

import torch
from torch import nn


class FashionCNN(nn.Module):
    """conv3x3(1->32)-ReLU-maxpool2, conv3x3(32->64)-ReLU-maxpool2, linear(3136->128)-ReLU, linear(128->10).

    Input ``(N, 1, 28, 28)`` float32, output ``(N, 10)`` logits. 421 642 parameters.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a strided 1x1 conv + BN
    when the shape changes, else the identity (He et al. 2016, "Deep Residual Learning")."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class FashionResNet(nn.Module):
    """Stem conv3x3(1->16, stride 2)+BN+ReLU, blocks 16 (14x14, identity shortcut) -> 32 (7x7) -> 64 (4x4)
    (projection shortcuts), global average pool, linear(64->10). Input ``(N, 1, 28, 28)``, output ``(N, 10)``
    logits; 2.6 M multiply-adds per image (the stride-2 stem keeps CPU training to minutes)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


ARCHITECTURES: dict[str, type[nn.Module]] = {"fashion_cnn": FashionCNN, "fashion_resnet": FashionResNet}
