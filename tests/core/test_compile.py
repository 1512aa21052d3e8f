"""TensorQuantizer under torch.compile: same values and the same STE gradient as eager (inductor on CPU)."""

import pytest
import torch

from lowbit import QuantSpec
from lowbit.nn import TensorQuantizer


@pytest.mark.slow
def test_tensor_quantizer_compiles_with_identical_values_and_gradients():
    torch.manual_seed(0)
    q = TensorQuantizer(QuantSpec("uint8", symmetric=False), "x")
    q.calibrate_now(torch.randn(256) * 3)
    x1 = (torch.randn(8, 32) * 4).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    compiled = torch.compile(q)
    y1, y2 = q(x1), compiled(x2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(x1.grad, x2.grad)
