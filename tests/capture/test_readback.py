"""Read-back: deployed sizes against a hand count."""

from __future__ import annotations

import torch
from torch import nn

from lowbit import QuantSpec
from lowbit.capture.readback import deployed_size_bytes, weight_bytes
from lowbit.nn import QuantLinear


def _tiny() -> QuantLinear:
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(6, 4), QuantSpec("int8", symmetric=True, granularity="channel"),
                               output_spec=QuantSpec("int16", symmetric=False), name="fc")
    q.output_quantizer.calibrate_now(torch.randn(10, 4))
    return q


def test_deployed_size_hand_count_16bit_affine_zero_point():
    q = _tiny()
    # int8 weight 4 x 6 = 24 + 4 float32 scales; float32 bias 4 x 4; int16 affine output:
    # float32 scale 4 + int16 zero point 2
    assert weight_bytes(q.weight, q.weight_quantizer) == 24 + 16
    assert deployed_size_bytes(q) == 24 + 16 + 16 + 4 + 2


def test_switched_off_weight_quantizer_counts_the_float_weight():
    q = _tiny()
    q.weight_quantizer.quant_enabled.fill_(False)
    # float32 weight 4 x 6 x 4, no weight scales; bias and output quantizer as above
    assert deployed_size_bytes(q) == 96 + 16 + 4 + 2
