"""Integer runtime, op by op, bit-exact against ONNX Runtime's CPU kernels on small onnx.helper graphs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import ConfigError, ShapeMismatchError, UnsupportedLayerError
from lowbit.runtime import IntegerRuntime, compare_requant_modes
from lowbit.runtime import kernels as K

OPSET = [helper.make_opsetid("", 19), helper.make_opsetid("com.microsoft", 1)]
NP2ONNX = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
           np.dtype(np.int32): TensorProto.INT32, np.dtype(np.float32): TensorProto.FLOAT}


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, NP2ONNX[np.dtype(d)], s) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, NP2ONNX[np.dtype(d)], None) for n, d in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=9)


def _codes(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)


def _conv_case(rng, x_dtype=np.uint8, cin=4, cout=6, group=1, k=3, stride=1, pad=1, hw=7,
               per_channel=True, x_zp=None, y_zp=None, y_scale=None, x=None, w=None, bias=True):
    x = _codes(rng, (2, cin, hw, hw), x_dtype) if x is None else x
    w = _codes(rng, (cout, cin // group, k, k), np.int8) if w is None else w
    sx = np.float32(rng.uniform(0.005, 0.05))
    sw = rng.uniform(0.001, 0.02, size=cout if per_channel else ()).astype(np.float32)
    sy = np.float32(y_scale if y_scale is not None else rng.uniform(0.02, 0.2))
    info = np.iinfo(x_dtype)
    zx = np.asarray(x_zp if x_zp is not None else rng.integers(info.min, info.max + 1), dtype=x_dtype)
    zy = np.asarray(y_zp if y_zp is not None else rng.integers(info.min, info.max + 1), dtype=x_dtype)
    b = rng.integers(-5000, 5000, size=cout).astype(np.int32) if bias else None
    attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)
    return dict(x=x, w=w, sx=sx, sw=sw, sy=sy, zx=zx, zy=zy, b=b, attrs=attrs)


def _qdq_conv_model(c):
    wzp = np.zeros(c["sw"].shape, dtype=np.int8)
    inits = {"w": c["w"], "sw": c["sw"], "zw": wzp, "sx": c["sx"], "zx": c["zx"], "sy": c["sy"], "zy": c["zy"]}
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0),
    ]
    conv_in = ["xf", "wf"]
    if c["b"] is not None:
        inits.update(b=c["b"], sb=(c["sx"] * c["sw"]).astype(np.float32), zb=np.zeros(c["sw"].shape, np.int32))
        nodes.append(helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], axis=0))
        conv_in.append("bf")
    nodes += [helper.make_node("Conv", conv_in, ["yf"], **c["attrs"]),
              helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])]
    return _model(nodes, [("x", c["x"].dtype, list(c["x"].shape))], [("y", c["x"].dtype)], inits)


def _qlinearconv_model(c):
    inits = {"w": c["w"], "sw": c["sw"], "zw": np.zeros(c["sw"].shape, np.int8), "sx": c["sx"], "zx": c["zx"],
             "sy": c["sy"], "zy": c["zy"]}
    ins = ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"]
    if c["b"] is not None:
        inits["b"] = c["b"]
        ins.append("b")
    node = helper.make_node("QLinearConv", ins, ["y"], **c["attrs"])
    return _model([node], [("x", c["x"].dtype, list(c["x"].shape))], [("y", c["x"].dtype)], inits)


def _assert_conv_exact(c):
    ref = _session(_qlinearconv_model(c)).run(None, {"x": c["x"]})[0]
    qdq = _qdq_conv_model(c)
    ort_qdq = _session(qdq).run(None, {"x": c["x"]})[0]
    got = IntegerRuntime(qdq, requant="float").run({"x": c["x"]})["y"]
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(ort_qdq, ref)  # ORT fuses the QDQ graph into the same kernel
    np.testing.assert_array_equal(got, ref)
    fixed = IntegerRuntime(qdq, requant="fixed_point").run({"x": c["x"]})["y"]
    assert np.abs(fixed.astype(np.int64) - ref.astype(np.int64)).max() <= 1
    return ref


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_qlinearconv_random(x_dtype, per_channel):
    rng = np.random.default_rng(0)
    ref = _assert_conv_exact(_conv_case(rng, x_dtype=x_dtype, per_channel=per_channel))
    assert len(np.unique(ref)) > 20  # not a saturated or constant output


@pytest.mark.parametrize("group,cin,cout,stride,pad,k", [(4, 4, 4, 1, 1, 3), (4, 4, 8, 2, 1, 3), (2, 4, 6, 1, 0, 1),
                                                         (1, 3, 5, 2, 2, 5)])
def test_qlinearconv_depthwise_grouped_strided(group, cin, cout, stride, pad, k):
    rng = np.random.default_rng(group * 10 + k)
    _assert_conv_exact(_conv_case(rng, cin=cin, cout=cout, group=group, stride=stride, pad=pad, k=k, hw=9))


@pytest.mark.parametrize("x_zp,y_zp", [(0, 0), (255, 255), (0, 255), (255, 0)])
def test_qlinearconv_edge_zero_points_and_saturation(x_zp, y_zp):
    rng = np.random.default_rng(7)
    x = np.where(rng.random((2, 4, 5, 5)) < 0.5, 0, 255).astype(np.uint8)
    w = np.where(rng.random((6, 4, 3, 3)) < 0.5, -128, 127).astype(np.int8)
    c = _conv_case(rng, x=x, w=w, x_zp=x_zp, y_zp=y_zp, y_scale=0.01, hw=5)
    ref = _assert_conv_exact(c)
    assert (ref == 0).any() and (ref == 255).any()  # both saturation bounds are reached


def test_qlinearconv_large_accumulators_lose_float32_bits_like_ort():
    """|acc| > 2^24: the int32 -> float32 conversion rounds, and the runtime must round the same way."""
    rng = np.random.default_rng(3)
    x = np.full((1, 64, 6, 6), 255, np.uint8)
    w = np.full((4, 64, 3, 3), 127, np.int8)
    w[1] = -128
    c = _conv_case(rng, x=x, w=w, cin=64, cout=4, x_zp=0, y_zp=128, y_scale=None, hw=6, bias=True)
    c["sx"], c["sw"], c["sy"] = np.float32(1.0), np.full(4, 1.0, np.float32), np.float32(2.0**19 + 3)
    ref = _assert_conv_exact(c)
    assert 200 > len(np.unique(ref)) > 1


def _qdq_gemm_model(a, sa, za, w, sw, b, sy, zy, trans_b=True, alpha=1.0):
    """DQ -> Gemm -> Q; ``b=None`` for a Gemm without bias."""
    axis = 0 if trans_b else 1
    inits = {"w": w, "sw": sw, "zw": np.zeros(sw.shape, np.int8), "sa": sa, "za": za, "sy": sy, "zy": zy}
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=axis)]
    gemm_in = ["af", "wf"]
    if b is not None:
        inits.update(b=b, sb=(sa * sw).astype(np.float32), zb=np.zeros(sw.shape, np.int32))
        nodes.append(helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], axis=0))
        gemm_in.append("bf")
    nodes += [helper.make_node("Gemm", gemm_in, ["yf"], transB=int(trans_b), alpha=alpha),
              helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])]
    return _model(nodes, [("a", a.dtype, list(a.shape))], [("y", a.dtype)], inits)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("trans_b", [True, False])
def test_qgemm_from_qdq_gemm(per_channel, trans_b):
    rng = np.random.default_rng(11)
    a = _codes(rng, (5, 32), np.uint8)
    w = _codes(rng, (10, 32) if trans_b else (32, 10), np.int8)
    sw = rng.uniform(0.001, 0.01, size=10 if per_channel else ()).astype(np.float32)
    b = rng.integers(-3000, 3000, 10).astype(np.int32)
    m = _qdq_gemm_model(a, np.float32(0.02), np.uint8(120), w, sw, b, np.float32(0.05), np.uint8(130), trans_b)
    ref = _session(m).run(None, {"a": a})[0]
    got = IntegerRuntime(m).run({"a": a})["y"]
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(ref)) > 10
    fixed = IntegerRuntime(m, requant="fixed_point").run({"a": a})["y"]
    assert np.abs(fixed.astype(np.int64) - ref.astype(np.int64)).max() <= 1


@pytest.mark.parametrize("alpha", [0.37, 1.7, -0.8])
def test_qgemm_alpha(alpha):
    """Without bias ORT fuses ``alpha`` into QGemm's output scale ``f32(alpha * s_a * s_b) / s_y``; with a bias
    ``alpha * A B + C`` has no single integer accumulator (ORT runs that Gemm in float): refused."""
    rng = np.random.default_rng(13)
    a = _codes(rng, (6, 40), np.uint8)
    w = _codes(rng, (12, 40), np.int8)
    sw = rng.uniform(0.001, 0.01, size=12).astype(np.float32)
    m = _qdq_gemm_model(a, np.float32(0.02), np.uint8(120), w, sw, None, np.float32(0.04), np.uint8(128), alpha=alpha)
    ref = _session(m).run(None, {"a": a})[0]
    np.testing.assert_array_equal(IntegerRuntime(m).run({"a": a})["y"], ref)
    assert len(np.unique(ref)) > 20
    fixed = IntegerRuntime(m, requant="fixed_point").run({"a": a})["y"]
    assert np.abs(fixed.astype(np.int64) - ref.astype(np.int64)).max() <= 1
    b = rng.integers(-3000, 3000, 12).astype(np.int32)
    m = _qdq_gemm_model(a, np.float32(0.02), np.uint8(120), w, sw, b, np.float32(0.04), np.uint8(128), alpha=alpha)
    with pytest.raises(UnsupportedLayerError, match="alpha"):
        IntegerRuntime(m).run({"a": a})


def _qlinearmatmul_pair(a, sa, za, b, sb, zb, sy, zy):
    inits = {"b": b, "sb": sb, "zb": zb, "sa": sa, "za": za, "sy": sy, "zy": zy}
    direct = _model([helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])],
                    [("a", a.dtype, list(a.shape))], [("y", a.dtype)], inits)
    qdq = _model([helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
                  helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], axis=1),
                  helper.make_node("MatMul", ["af", "bf"], ["yf"]),
                  helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])],
                 [("a", a.dtype, list(a.shape))], [("y", a.dtype)], inits)
    return direct, qdq


@pytest.mark.parametrize("a_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("per_column", [False, True])
def test_qlinearmatmul(a_dtype, per_column):
    rng = np.random.default_rng(5)
    a = _codes(rng, (3, 7, 24), a_dtype)
    b = _codes(rng, (24, 9), np.int8)
    sb = rng.uniform(0.002, 0.01, size=9 if per_column else ()).astype(np.float32)
    zb = np.zeros(sb.shape, np.int8)
    za = np.asarray(3 if a_dtype == np.int8 else 140, a_dtype)
    zy = np.asarray(-5 if a_dtype == np.int8 else 100, a_dtype)
    direct, qdq = _qlinearmatmul_pair(a, np.float32(0.03), za, b, sb, zb, np.float32(0.06), zy)
    ref = _session(direct).run(None, {"a": a})[0]
    np.testing.assert_array_equal(_session(qdq).run(None, {"a": a})[0], ref)
    np.testing.assert_array_equal(IntegerRuntime(qdq).run({"a": a})["y"], ref)


def test_conv_integer_and_matmul_integer_accumulators():
    rng = np.random.default_rng(9)
    x = _codes(rng, (2, 3, 8, 8), np.uint8)
    w = _codes(rng, (5, 3, 3, 3), np.uint8)
    zx, zw = np.uint8(7), np.uint8(200)
    m = _model([helper.make_node("ConvInteger", ["x", "w", "zx", "zw"], ["y"], pads=[1, 0, 2, 1], strides=[2, 1])],
               [("x", np.uint8, [2, 3, 8, 8])], [("y", np.int32)], {"w": w, "zx": zx, "zw": zw})
    ref = _session(m).run(None, {"x": x})[0]
    got = K.conv_integer(K.centered(x, zx), K.centered(w, zw), [2, 1], [1, 0, 2, 1], [1, 1], 1)
    np.testing.assert_array_equal(got.numpy(), ref)

    a = _codes(rng, (4, 33), np.uint8)
    b = _codes(rng, (33, 6), np.int8)
    mm = _model([helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])],
                [("a", np.uint8, [4, 33])], [("y", np.int32)], {"b": b, "za": np.uint8(255), "zb": np.int8(-128)})
    ref = _session(mm).run(None, {"a": a})[0]
    got = K.matmul_integer(K.centered(a, 255), K.centered(b, -128))
    np.testing.assert_array_equal(got.numpy(), ref)


def _add_models(dtype, shape_a, shape_b, p):
    inits = {k: v for k, v in p.items()}
    qla = _model([helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"],
                                   domain="com.microsoft")],
                 [("a", dtype, shape_a), ("b", dtype, shape_b)], [("c", dtype)], inits)
    qdq = _model([helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
                  helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
                  helper.make_node("Add", ["af", "bf"], ["cf"]),
                  helper.make_node("QuantizeLinear", ["cf", "sc", "zc"], ["c"])],
                 [("a", dtype, shape_a), ("b", dtype, shape_b)], [("c", dtype)], inits)
    return qla, qdq


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("seed", range(4))
def test_qlinearadd(dtype, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    n = 1000 + seed  # odd lengths exercise the kernel's tail
    a, b = _codes(rng, (1, n), dtype), _codes(rng, (1, n), dtype)
    p = {"sa": np.float32(rng.uniform(0.01, 0.1)), "za": np.asarray(rng.integers(info.min, info.max + 1), dtype),
         "sb": np.float32(rng.uniform(0.01, 0.1)), "zb": np.asarray(rng.integers(info.min, info.max + 1), dtype),
         "sc": np.float32(rng.uniform(0.01, 0.15)), "zc": np.asarray(rng.integers(info.min, info.max + 1), dtype)}
    qla, qdq = _add_models(dtype, [1, n], [1, n], p)
    ref = _session(qla).run(None, {"a": a, "b": b})[0]
    np.testing.assert_array_equal(_session(qdq).run(None, {"a": a, "b": b})[0], ref)
    got = IntegerRuntime(qdq).run({"a": a, "b": b})["c"]
    np.testing.assert_array_equal(got, ref)
    fixed = IntegerRuntime(qdq, requant="fixed_point").run({"a": a, "b": b})["c"]
    assert np.abs(fixed.astype(np.int64) - ref.astype(np.int64)).max() <= 1
    assert (ref == info.min).any() or (ref == info.max).any() or len(np.unique(ref)) > 50


def test_qlinearadd_exhaustive_pairs_and_scalar_operand():
    """Every (a, b) uint8 pair at awkward scales, plus the one-element broadcast path."""
    a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(1, -1)
    b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(1, -1)
    p = {"sa": np.float32(0.0137), "za": np.uint8(0), "sb": np.float32(0.0291), "zb": np.uint8(255),
         "sc": np.float32(0.0213), "zc": np.uint8(131)}
    qla, qdq = _add_models(np.uint8, list(a.shape), list(b.shape), p)
    ref = _session(qla).run(None, {"a": a, "b": b})[0]
    np.testing.assert_array_equal(IntegerRuntime(qdq).run({"a": a, "b": b})["c"], ref)
    one = np.array([[77]], np.uint8)
    qla, qdq = _add_models(np.uint8, list(a.shape), [1, 1], p)
    ref = _session(qla).run(None, {"a": a, "b": one})[0]
    np.testing.assert_array_equal(IntegerRuntime(qdq).run({"a": a, "b": one})["c"], ref)


def _unary_qdq(op, x_shape, s_in, z_in, s_out, z_out, extra_inits=None, extra_inputs=(), **attrs):
    inits = {"s": s_in, "z": z_in, "so": s_out, "zo": z_out, **(extra_inits or {})}
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"]),
             helper.make_node(op, ["xf", *extra_inputs], ["yf"], **attrs),
             helper.make_node("QuantizeLinear", ["yf", "so", "zo"], ["y"])]
    return _model(nodes, [("x", z_in.dtype, list(x_shape))], [("y", z_out.dtype)], inits)


@pytest.mark.parametrize("case", [
    ("GlobalAveragePool", {}, (0.02, 0.011)),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (0.02, 0.017)),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "count_include_pad": 1}, (0.02, 0.02)),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (0.02, 0.02)),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (0.02, 0.031)),
    # ceil_mode: the last window overhangs the end (9 = 4 * 2 + 1), so it is clipped
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (0.02, 0.017)),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1,
                     "count_include_pad": 1}, (0.02, 0.017)),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (0.02, 0.031)),
    ("Relu", {}, (0.02, 0.02)),
    ("Relu", {}, (0.02, 0.013)),
])
def test_pools_and_activations(case):
    op, attrs, (s_in, s_out) = case
    rng = np.random.default_rng(21)
    x = _codes(rng, (2, 5, 9, 9), np.uint8)
    z_out = np.uint8(0) if op == "Relu" else np.uint8(120)
    m = _unary_qdq(op, x.shape, np.float32(s_in), np.uint8(128), np.float32(s_out), z_out, **attrs)
    ref = _session(m).run(None, {"x": x})[0]
    got = IntegerRuntime(m).run({"x": x})["y"]
    np.testing.assert_array_equal(got, ref)
    fixed = IntegerRuntime(m, requant="fixed_point").run({"x": x})["y"]
    assert np.abs(fixed.astype(np.int64) - ref.astype(np.int64)).max() <= 1


def test_clip_concat_flatten_reshape():
    rng = np.random.default_rng(4)
    x = _codes(rng, (2, 3, 4, 4), np.uint8)
    y = _codes(rng, (2, 2, 4, 4), np.uint8)
    inits = {"sx": np.float32(0.03), "zx": np.uint8(100), "sy": np.float32(0.05), "zy": np.uint8(30),
             "so": np.float32(0.04), "zo": np.uint8(90), "lo": np.float32(0.0), "hi": np.float32(6.0 * 0.3),
             "sc": np.float32(0.02), "zc": np.uint8(0), "shape": np.array([2, -1], np.int64),
             "sf": np.float32(0.04), "zf": np.uint8(90)}
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["y", "sy", "zy"], ["yf"]),
             helper.make_node("Clip", ["xf", "lo", "hi"], ["cf"]),
             helper.make_node("QuantizeLinear", ["cf", "sc", "zc"], ["c"]),
             helper.make_node("Concat", ["xf", "yf"], ["kf"], axis=1),
             helper.make_node("QuantizeLinear", ["kf", "so", "zo"], ["k"]),
             helper.make_node("DequantizeLinear", ["k", "so", "zo"], ["kd"]),
             helper.make_node("Flatten", ["kd"], ["ff"], axis=1),
             helper.make_node("Reshape", ["ff", "shape"], ["rf"]),
             helper.make_node("QuantizeLinear", ["rf", "sf", "zf"], ["r"])]
    m = _model(nodes, [("x", np.uint8, [2, 3, 4, 4]), ("y", np.uint8, [2, 2, 4, 4])],
               [("c", np.uint8), ("k", np.uint8), ("r", np.uint8)], inits)
    names = ["c", "k", "r"]
    ref = dict(zip(names, _session(m).run(names, {"x": x, "y": y})))
    got = IntegerRuntime(m).run({"x": x, "y": y})
    for n in names:
        np.testing.assert_array_equal(got[n], ref[n], err_msg=n)
    np.testing.assert_array_equal(got["r"], got["k"].reshape(2, -1))
    assert got["c"].max() == 90  # clipped at 1.8 / 0.02


def test_per_op_comparison_counts_concat_and_clip():
    """``compare_requant_modes``: Concat and Clip requantize in the mode asked for. Scales in ratio 1/2 put
    every odd centred code on a tie (ORT: half to even; fixed point: up), so the modes differ; with every op
    reading graph inputs the per-op figure must equal the count from two separate runs."""
    rng = np.random.default_rng(4)
    x, y = _codes(rng, (2, 3, 16, 16), np.uint8), _codes(rng, (2, 2, 16, 16), np.uint8)
    inits = {"sx": np.float32(0.0625), "zx": np.uint8(100), "sy": np.float32(0.0517), "zy": np.uint8(30),
             "so": np.float32(0.125), "zo": np.uint8(90), "lo": np.float32(-2.0), "hi": np.float32(4.0),
             "sc": np.float32(0.125), "zc": np.uint8(3)}
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["y", "sy", "zy"], ["yf"]),
             helper.make_node("Concat", ["xf", "yf"], ["kf"], axis=1),
             helper.make_node("QuantizeLinear", ["kf", "so", "zo"], ["k"]),
             helper.make_node("Clip", ["xf", "lo", "hi"], ["cf"]),
             helper.make_node("QuantizeLinear", ["cf", "sc", "zc"], ["c"])]
    m = _model(nodes, [("x", np.uint8, [2, 3, 16, 16]), ("y", np.uint8, [2, 2, 16, 16])],
               [("k", np.uint8), ("c", np.uint8)], inits)
    feeds = {"x": x, "y": y}
    ref = dict(zip("kc", _session(m).run(["k", "c"], feeds)))
    flt, fixed = IntegerRuntime(m).run(feeds), IntegerRuntime(m, requant="fixed_point").run(feeds)
    per_op = compare_requant_modes(m, feeds)
    for n in "kc":
        np.testing.assert_array_equal(flt[n], ref[n], err_msg=n)
        d = np.abs(fixed[n].astype(np.int64) - ref[n].astype(np.int64))
        assert d.max() <= 1 and per_op.differing[n] == int((d > 0).sum()) > 50, n


def test_unsupported_op_is_named():
    m = _unary_qdq("Sigmoid", (1, 2, 3, 3), np.float32(0.1), np.uint8(0), np.float32(0.1), np.uint8(0))
    with pytest.raises(UnsupportedLayerError, match="Sigmoid"):
        IntegerRuntime(m)


def test_compute_op_without_quantize_after_it_is_refused():
    rng = np.random.default_rng(0)
    c = _conv_case(rng)
    m = _qdq_conv_model(c)
    m.graph.node.pop()  # drop the QuantizeLinear; the Conv output becomes float
    m.graph.output[0].name = "yf"
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    with pytest.raises(UnsupportedLayerError, match="without a QuantizeLinear"):
        IntegerRuntime(m).run({"x": c["x"]})


@pytest.mark.parametrize("bad,error", [
    ("float32", ConfigError), ("int8", ConfigError), ("int64", ConfigError), ("shape", ShapeMismatchError),
    ("name", ShapeMismatchError),
])
def test_feeds_onnxruntime_refuses_are_refused(bad, error):
    """Codes of another type would be read as wrong codes (int8 for uint8: up to 255 steps off, floats: not
    codes at all), a wrong shape failed deep in torch: refused up front, as ORT refuses them."""
    rng = np.random.default_rng(0)
    c = _conv_case(rng)
    m = _qdq_conv_model(c)
    x = c["x"]
    feeds = {"shape": {"x": x[:, :2]}, "name": {"x": x, "x_typo": x}}.get(bad) or {"x": x.astype(bad)}
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        _session(m).run(None, feeds)
    with pytest.raises(error, match="'x"):
        IntegerRuntime(m).run(feeds)


def test_torch_reference_for_the_integer_conv():
    """The float64 path is exact: compare with an int64 loop-free unfold reference."""
    torch.manual_seed(0)
    x = torch.randint(-128, 128, (1, 3, 6, 6)).double()
    w = torch.randint(-128, 128, (4, 3, 3, 3)).double()
    got = K.conv_integer(x, w, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    cols = torch.nn.functional.unfold(x, 3, padding=1).long()  # (1, 27, 36)
    ref = (w.long().reshape(4, -1) @ cols[0]).reshape(1, 4, 6, 6)
    assert torch.equal(got, ref)


def test_exact_ties_round_half_to_even_like_ort():
    """Power-of-two scales make acc * M land exactly on .5: ORT rounds those to even."""
    rng = np.random.default_rng(12)
    c = _conv_case(rng, x_zp=128, y_zp=128, hw=6, bias=False)
    c["sx"], c["sw"], c["sy"] = np.float32(0.5), np.full(6, 0.25, np.float32), np.float32(0.25)  # M = 1/2
    c["x"] = rng.integers(120, 137, size=c["x"].shape).astype(np.uint8)
    c["w"] = rng.integers(-3, 4, size=c["w"].shape).astype(np.int8)
    ref = _assert_conv_exact(c)
    acc = K.conv_integer(K.centered(c["x"], 128), K.centered(c["w"], 0), [1, 1], [1] * 4, [1, 1], 1).numpy()
    ties = (acc % 2) == 1
    assert ties.sum() > 100 and np.abs(acc).max() < 250  # many ties, none saturated
    np.testing.assert_array_equal(ref[ties].astype(np.int64) - 128, np.rint(acc[ties] / 2.0))
    p = {"sa": np.float32(1.0), "za": np.uint8(0), "sb": np.float32(1.0), "zb": np.uint8(0),
         "sc": np.float32(2.0), "zc": np.uint8(0)}
    a = np.arange(256, dtype=np.uint8).reshape(1, -1)
    b = np.full((1, 256), 1, np.uint8)
    qla, qdq = _add_models(np.uint8, [1, 256], [1, 256], p)
    ref = _session(qla).run(None, {"a": a, "b": b})[0]
    np.testing.assert_array_equal(IntegerRuntime(qdq).run({"a": a, "b": b})["c"], ref)
    np.testing.assert_array_equal(ref[0, :8], [0, 1, 2, 2, 2, 3, 4, 4])  # (k + 1) / 2, halves to even


def test_qlinearadd_fused_multiply_add_case():
    """Parameters where a separately rounded multiply and add gives a different code from MLAS's
    ``vfmadd`` for one of the 65536 pairs: the runtime must follow the fused arithmetic."""
    a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(1, -1)
    b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(1, -1)
    p = {"sa": np.float32(0.049779344), "za": np.uint8(158), "sb": np.float32(0.047702465), "zb": np.uint8(213),
         "sc": np.float32(0.025702031), "zc": np.uint8(193)}
    qla, qdq = _add_models(np.uint8, list(a.shape), list(b.shape), p)
    ref = _session(qla).run(None, {"a": a, "b": b})[0]
    np.testing.assert_array_equal(IntegerRuntime(qdq).run({"a": a, "b": b})["c"], ref)


@pytest.mark.parametrize("bad", ["zero", "nan", "inf", "zp_type"])
def test_bad_qdq_parameters_are_refused(bad):
    """A QuantizeLinear / DequantizeLinear scale that is 0, NaN or inf (ORT saturates or propagates it), or a
    zero point whose type differs from the codes', is a ConfigError naming the node."""
    rng = np.random.default_rng(1)
    c = _conv_case(rng)
    if bad == "zp_type":
        c["zx"] = np.int8(0)
    else:
        c["sy"] = np.float32({"zero": 0.0, "nan": np.nan, "inf": np.inf}[bad])
    with pytest.raises(ConfigError, match="zero point|scale"):
        IntegerRuntime(_qdq_conv_model(c)).run({"x": c["x"]})
