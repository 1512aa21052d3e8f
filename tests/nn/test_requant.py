"""``lowbit.nn.requant``: the exact integer accumulation of the dynamic Linear path and its fall-backs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.nn.quantizer import DYNAMIC_QPARAMS_ATTR
from lowbit.nn.requant import _integer_linear, ort_dynamic_linear_output


def test_integer_linear_is_exact_beyond_float32_integers():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-255, 256, (3, 7, 2000), generator=g)
    w = torch.randint(-127, 128, (5, 2000), generator=g)
    x[0, 0], w[0] = 255, 127  # one output of 2000 * 255 * 127 = 6.5e7 > 2**24
    exact = (x.long() @ w.long().T)
    got = _integer_linear(x.double(), w.double())
    assert got.dtype == torch.float64 and torch.equal(got.long(), exact)
    assert float(exact.abs().max()) > 2**24


def _dynamic_linear(**overrides) -> nn.Module:
    torch.manual_seed(0)
    q = lowbit.quantize(nn.Sequential(nn.Linear(8, 4)), lowbit.recipes.W8A8Dynamic(**overrides), None, progress=False)
    return next(m for m in q.modules() if isinstance(m, lowbit.nn.QuantLinear))


def test_dynamic_quantizer_keeps_the_batch_qparams():
    lin = _dynamic_linear()
    x = torch.tensor([[-1.0, 0.5, 3.0, 0.0, 1.0, 2.0, -0.5, 0.25]])
    lin.input_quantizer(x)
    s, z = lin.input_quantizer.__dict__[DYNAMIC_QPARAMS_ATTR]
    assert float(s) == float(torch.tensor(4.0) / 255) and int(z) == 64  # ONNX DynamicQuantizeLinear's formula


def test_dynamic_linear_output_falls_back_where_ort_differs():
    lin = _dynamic_linear()
    x = torch.randn(3, 8)
    with torch.no_grad():
        xq = lin.input_quantizer(x)
        assert ort_dynamic_linear_output(lin, xq, lin.quantized_weight()) is not None
        lin.input_quantizer.spec = QuantSpec("int8", symmetric=True, dynamic=True)  # not DynamicQuantizeLinear
        assert ort_dynamic_linear_output(lin, xq, lin.quantized_weight()) is None
    fresh = _dynamic_linear()
    assert ort_dynamic_linear_output(fresh, x, fresh.quantized_weight()) is None  # no batch quantized yet


def test_dynamic_linear_output_equals_ort_dynamicquantizematmul():
    """The returned values, not only "not None": ORT's DynamicQuantizeMatMul (com.microsoft, what
    ``MatMulInteger -> Cast -> Mul -> Add`` fuses into) on the same float input, int8 per-column weight codes
    and float bias gives every output bit for bit; 256-wide rows make float32 rounding visible."""
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.export.verify import make_session

    torch.manual_seed(0)
    q = lowbit.quantize(nn.Sequential(nn.Linear(256, 48)), lowbit.recipes.W8A8Dynamic(), None, progress=False)
    lin = next(m for m in q.modules() if isinstance(m, lowbit.nn.QuantLinear))
    x = (torch.randn(64, 256) * 2 + 0.3).float()
    with torch.no_grad():
        w = lin.quantized_weight()
        s_w = lin.weight_quantizer.scale.detach().float().reshape(-1)
        w_codes = torch.round(w.double() / s_w.double().reshape(-1, 1)).to(torch.int8)
        got = ort_dynamic_linear_output(lin, lin.input_quantizer(x), w)
    assert got is not None and int(lin.weight_quantizer.zero_point.abs().max()) == 0
    inits = [numpy_helper.from_array(w_codes.numpy().T.copy(), "b"), numpy_helper.from_array(s_w.numpy(), "sb"),
             numpy_helper.from_array(np.zeros(48, np.int8), "zb"),
             numpy_helper.from_array(lin.bias.detach().float().numpy(), "bias")]
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "b", "sb", "zb", "bias"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "dqmm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 48])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    ref = make_session(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got.numpy(), ref)
    assert len(np.unique(ref)) > 1000


def test_per_token_dynamic_linear_is_not_modelled():
    lin = _dynamic_linear(granularity="token")  # one range per row: not DynamicQuantizeLinear
    with torch.no_grad():
        xq = lin.input_quantizer(torch.randn(3, 8))
        assert ort_dynamic_linear_output(lin, xq, lin.quantized_weight()) is None


def _ort_dynamic_quantize(x: np.ndarray):
    from onnx import TensorProto, helper

    from lowbit.export.verify import make_session

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in
                               (("q", TensorProto.UINT8, list(x.shape)), ("s", TensorProto.FLOAT, []), ("z", TensorProto.UINT8, []))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    return make_session(model.SerializeToString()).run(None, {"x": x})


def test_dynamic_quantizer_equals_dynamicquantizelinear_ties_included():
    """ONNX DynamicQuantizeLinear: s = (max(0, x_max) - min(0, x_min)) / 255, z = rint(-x_min / s),
    q = rint(x / s) + z, half to even. Range [-2, 13.9375] gives s = 1/16 exactly, so k/16 + 1/32 are exact
    ties, both parities; plus a million normal values. The same scale, zero point and every code as ORT's."""
    lin = _dynamic_linear()
    iq = lin.input_quantizer
    ties = (np.arange(-32, 223, dtype=np.float32) + np.float32(0.5)) / np.float32(16)
    rng = np.random.default_rng(0)
    for x in (np.concatenate([[-2.0, 13.9375], ties]).astype(np.float32),
              (rng.standard_normal((1000, 1000)) * 3 + 0.7).astype(np.float32)):
        q, s, z = _ort_dynamic_quantize(x)
        with torch.no_grad():
            y = iq(torch.from_numpy(x))
        s_l, z_l = iq.__dict__[DYNAMIC_QPARAMS_ATTR]
        assert float(s_l) == float(s) and int(z_l) == int(z)
        codes = torch.round(y / s_l) + z_l  # y = (q - z) s exactly: the codes back
        np.testing.assert_array_equal(codes.numpy().astype(np.uint8), q)
