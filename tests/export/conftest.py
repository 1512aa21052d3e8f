import pytest
import torch
from torch import nn

import lowbit


class SmallNet(nn.Module):
    """conv-bn-relu, conv + residual add + relu, global mean, linear: every QDQ pattern in a few ops."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = self.pool(y)
        y = torch.relu(self.c2(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    m = SmallNet().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so folding changes the weights
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return [torch.randn(4, 3, 16, 16) for _ in range(3)]


@pytest.fixture(scope="module")
def qnet(small_net, calib):
    return lowbit.quantize(small_net, lowbit.recipes.W8A8(), calib, progress=False)


@pytest.fixture(scope="session")
def minilm_stsb():
    """(all-MiniLM-L6-v2 encoder, STS-B test pairs) from ``lowbit.zoo``; skips when either is not installed."""
    from lowbit import zoo

    try:
        return zoo.minilm(), zoo.stsb("test")
    except lowbit.errors.QuantizationError as e:
        pytest.skip(f"MiniLM / STS-B unavailable: {e}")
