"""IntFormat against torch's quantized tensors and closed-form ranges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.formats import IntFormat, NumberFormat, parse


@pytest.mark.parametrize(
    "fmt,lo,hi,dtype",
    [
        (IntFormat(8), -128, 127, torch.int8),
        (IntFormat(8, narrow=True), -127, 127, torch.int8),
        (IntFormat(8, signed=False), 0, 255, torch.uint8),
        (IntFormat(4), -8, 7, torch.int8),
        (IntFormat(4, signed=False, narrow=True), 0, 14, torch.int8),
        (IntFormat(2), -2, 1, torch.int8),
        (IntFormat(1, signed=False), 0, 1, torch.int8),
        (IntFormat(16), -32768, 32767, torch.int16),
        (IntFormat(16, signed=False), 0, 65535, torch.int32),
    ],
)
def test_ranges_grid_and_code_dtype(fmt, lo, hi, dtype):
    assert (fmt.min_value, fmt.max_value, fmt.code_dtype) == (lo, hi, dtype)
    assert fmt.grid().tolist() == list(range(lo, hi + 1)) and fmt.grid().dtype == torch.float64
    assert fmt.num_levels == hi - lo + 1
    assert isinstance(fmt, NumberFormat) and fmt.is_integer
    # every grid value round-trips through its code
    codes = fmt.quantize(fmt.grid().float())
    assert codes.dtype == dtype and torch.equal(fmt.dequantize(codes).double(), fmt.grid())


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("qdtype,fmt", [(torch.qint8, IntFormat(8)), (torch.quint8, IntFormat(8, signed=False))])
def test_round_equals_torch_quantize_per_tensor(qdtype, fmt):
    g = torch.manual_seed(0)
    x = torch.cat([torch.randn(5000, generator=g) * 100, torch.arange(-300, 300) + 0.5, torch.tensor([-0.5, 0.5, 1.5])])
    ref = torch.quantize_per_tensor(x, 1.0, 0, qdtype).int_repr().float()
    assert torch.equal(fmt.round(x), ref)


@pytest.mark.parametrize("fmt", [IntFormat(4), IntFormat(3, signed=False), IntFormat(6, narrow=True), IntFormat(12)])
def test_round_equals_numpy_rint_clip(fmt):
    g = torch.manual_seed(1)
    x = torch.cat([torch.randn(3000, generator=g) * fmt.max_value, torch.arange(-40, 40) + 0.5])
    ref = np.clip(np.rint(x.numpy()), fmt.min_value, fmt.max_value)  # rint: half to even
    assert np.array_equal(fmt.round(x).numpy(), ref)
    assert np.array_equal(fmt.dequantize(fmt.quantize(x)).numpy(), ref)


def test_half_to_even_and_saturation():
    f = IntFormat(4)
    x = torch.tensor([-8.5, -7.5, -2.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.5, 100.0, -math.inf, math.inf])
    assert f.round(x).tolist() == [-8.0, -8.0, -2.0, -0.0, 0.0, 2.0, 2.0, 6.0, 7.0, 7.0, -8.0, 7.0]


def test_stochastic_is_unbiased():
    gen = torch.Generator().manual_seed(3)
    x = torch.full((100_000,), 2.3)
    q = IntFormat(8).round(x, "stochastic", gen)
    assert set(q.unique().tolist()) == {2.0, 3.0}
    sigma = math.sqrt(0.3 * 0.7 / x.numel())
    assert abs(float(q.double().mean()) - 2.3) < 5 * sigma


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_of_an_integer_never_moves_it_in_half_precision(dtype):
    """``floor(x + u)`` with ``u < 1``: an integer ``x`` stays itself. A draw cast to fp16/bf16 before the
    add can round up to 1.0 (about 1 in 4096 / 512 draws) and bias every value up."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 3.0, dtype=dtype)
    q = IntFormat(8).round(x, "stochastic", gen)
    assert q.dtype == dtype and torch.equal(q, x)


def test_parse_and_errors():
    assert parse("int8") == IntFormat(8) and parse("UINT4") == IntFormat(4, signed=False)
    assert parse("int8_narrow") == IntFormat(8, narrow=True) and parse(IntFormat(3)) == IntFormat(3)
    for f in [IntFormat(8), IntFormat(5, signed=False, narrow=True)]:
        assert parse(f.name) == f
    for bad in [dict(bits=0), dict(bits=17), dict(bits=1, narrow=True)]:
        with pytest.raises(ConfigError):
            IntFormat(**bad)
    with pytest.raises(ConfigError):
        parse("int32")
    with pytest.raises(ConfigError):
        IntFormat(8).round(torch.zeros(2), "up")
