"""convert(backend="torch"): integer storage and torch._int_mm execution against independent references."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.errors import ConfigError
from lowbit.nn import QuantLinear
from lowbit.nn.int8 import Int8Linear, PackedWeightLinear, convert, module_nbytes, pack_int4, unpack_int4


def _per_token_layer(k=64, n=48, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    return QuantLinear.from_float(
        lin, QuantSpec("int8", granularity="channel"),
        input_spec=QuantSpec("int8", symmetric=True, granularity="token", dynamic=True), name="lin",
    )


def test_int8_linear_matches_simulation_of_same_scheme():
    layer = _per_token_layer()
    conv = convert(layer)
    assert isinstance(conv, Int8Linear) and conv.weight_int8.dtype == torch.int8
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        sim, got = layer(x), conv(x)
    # same codes on both sides; only the float summation order differs
    torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)


def test_int_mm_accumulator_is_exact():
    layer = convert(_per_token_layer(k=40, n=24, seed=3))
    qx = torch.randint(-127, 128, (5, 40), dtype=torch.int8)
    acc = layer._int_mm(qx)
    ref = (qx.long() @ layer.weight_int8.long().t()).to(torch.int32)
    assert acc.dtype == torch.int32 and torch.equal(acc, ref)


def test_converted_model_close_and_smaller():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(8, 128)
    q = lowbit.quantize(m, lowbit.recipes.W8A8Dynamic(granularity="token"), None, progress=False)
    c = convert(q)
    assert [k for _, k, _ in c.lowbit_convert_log] == ["int8", "int8"]
    with torch.no_grad():
        ref, sim, got = m(x), q(x), c(x)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(got, sim) < 0.02 and rel(got, ref) < 0.02
    # int8 weights: about a quarter of the float model's bytes
    assert module_nbytes(c) < 0.3 * module_nbytes(m)
    assert module_nbytes(q) > module_nbytes(m)  # the simulation keeps float weights (+ scales)


def test_int4_weight_only_packed_bit_exact_and_smaller():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    x = torch.randn(5, 64)
    q = lowbit.quantize(m, lowbit.recipes.W4A16(group_size=32), None, progress=False)
    c = convert(q)
    assert all(isinstance(c.get_submodule(i), PackedWeightLinear) and c.get_submodule(i).packed4 for i in ("0", "2"))
    assert c.get_submodule("0").weight_codes.shape == (96, 32) and c.get_submodule("0").weight_codes.dtype == torch.uint8
    torch.testing.assert_close(c.get_submodule("0").dequantized_weight(), q.get_submodule("0").quantized_weight(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(c(x), q(x), rtol=0, atol=0)
    float_bytes = module_nbytes(m)
    assert module_nbytes(c) < 0.25 * float_bytes  # 0.5 byte per weight + per-group scales


def test_odd_in_features_packs_two_codes_per_byte_bit_exact():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(37, 12)).eval()  # K odd: the last byte of each row holds one code
    q = lowbit.quantize(m, lowbit.recipes.WeightOnly(4, keep_first_last_8bit=False), None, progress=False)
    c = convert(q)
    layer = c.get_submodule("0")
    assert isinstance(layer, PackedWeightLinear) and layer.packed4
    assert layer.weight_codes.shape == (12, 19)
    assert int((layer.weight_codes[:, -1] >> 4).abs().sum()) == 0  # the padding nibble is zero
    torch.testing.assert_close(layer.dequantized_weight(), q.get_submodule("0").quantized_weight(), rtol=0, atol=0)
    x = torch.randn(4, 37)
    with torch.no_grad():
        torch.testing.assert_close(c(x), q(x), rtol=0, atol=0)


def test_pack_unpack_odd_length():
    codes = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[1 | 2 << 4, 3], [15, 7]]
    assert torch.equal(unpack_int4(packed, 3), codes)


def test_pack_unpack_round_trip():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (7, 10), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 5)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed), codes)


def test_static_model_keeps_output_side_and_logs_kept():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [torch.randn(32, 16) for _ in range(2)]
    q = lowbit.quantize(m, lowbit.recipes.W8A8(), data, progress=False)
    c = convert(q)
    assert isinstance(c.get_submodule("0"), Int8Linear) and c.get_submodule("0").output_quantizer is not None
    with torch.no_grad():
        out = c(data[0])
        sim = q(data[0])
    assert float((out - sim).abs().max()) <= 4 * float(q.get_submodule("2").output_quantizer.scale)
    fp8 = lowbit.quantize(m, lowbit.recipes.FP8(), data, progress=False)
    kept = convert(fp8).lowbit_convert_log
    assert all(k == "kept" and "not an integer" in r for _, k, r in kept)


def test_bad_backend():
    with pytest.raises(ConfigError, match="backend='torch'"):
        convert(_per_token_layer(), backend="tensorrt")


@pytest.mark.gpu
def test_cuda_int_mm_padding_and_fallback():
    for k, n, m_rows in [(64, 48, 1), (64, 48, 40), (60, 30, 3)]:  # M <= 16 padded; K, N not /8 -> fallback
        layer = convert(_per_token_layer(k, n))
        x = torch.randn(m_rows, k)
        with torch.no_grad():
            cpu = layer(x)
            gpu = layer.cuda()(x.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)
