"""Int8Linear / PackedWeightLinear against independent references: int64 matmul of the codes, stored dtypes."""

from __future__ import annotations

import torch
from torch import nn

from lowbit import QuantSpec
from lowbit.nn import QuantLinear
from lowbit.nn.int8 import Int8Linear, PackedWeightLinear

W8 = QuantSpec("int8", symmetric=True, granularity="channel")


def test_int8_linear_equals_int64_matmul_of_codes_times_scales():
    torch.manual_seed(0)
    fl = nn.Linear(24, 16)
    c = Int8Linear.from_quant(QuantLinear.from_float(fl, W8, name="fc"))
    x = torch.randn(2, 5, 24)
    # weights: symmetric per output channel, max|w| / 127; activations: symmetric per token (row)
    w = fl.weight.detach().double()
    s_w = w.abs().amax(1) / 127
    q_w = torch.clamp(torch.round(w / s_w[:, None]), -127, 127).long()
    x2 = x.reshape(-1, 24).double()
    s_x = x2.abs().amax(1, keepdim=True) / 127
    q_x = torch.clamp(torch.round(x2 / s_x), -127, 127).long()
    ref = (q_x @ q_w.t()).double() * s_x * s_w + fl.bias.detach().double()
    assert torch.equal(c.weight_int8.long(), q_w)
    torch.testing.assert_close(c(x).double(), ref.reshape(2, 5, 16), rtol=1e-6, atol=1e-6)


def test_integer_storage_dtypes_and_bytes():
    torch.manual_seed(1)
    fl = nn.Linear(32, 8)
    c8 = Int8Linear.from_quant(QuantLinear.from_float(fl, W8, name="fc"))
    sd = c8.state_dict()
    assert "weight" not in sd and sd["weight_int8"].dtype == torch.int8 and sd["weight_int8"].shape == (8, 32)
    c4 = PackedWeightLinear(QuantLinear.from_float(fl, QuantSpec("int4", symmetric=True, granularity="channel"), name="fc"))
    sd = c4.state_dict()
    assert "weight" not in sd and sd["weight_codes"].dtype == torch.uint8 and sd["weight_codes"].shape == (8, 16)
    # two codes per byte, low nibble = even column; codes stored + 8 (unsigned); W = (code - 8) * s
    w = fl.weight.detach()
    s = w.abs().amax(1) / 7
    q = torch.clamp(torch.round(w / s[:, None]), -8, 7).long() + 8
    assert torch.equal(sd["weight_codes"].long(), q[:, 0::2] | (q[:, 1::2] << 4))
    torch.testing.assert_close(c4.dequantized_weight(), (q - 8).float() * s[:, None], rtol=0, atol=1e-7)
