"""The exact graph simplifications real models need (EfficientNet-Lite0's static padding, ReLU6, view(bs, -1),
dead-channel biases, attention): each checked bit-exact against ONNX Runtime before/after, and end to end."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lowbit
from lowbit.errors import ParityError
from lowbit.export import _simplify as sp
from lowbit.export import count_kernels, export_onnx, run_ort, verify_parity
from lowbit.export.verify import make_session
from lowbit.runtime import IntegerRuntime


class SamePadNet(nn.Module):
    """TF-'SAME' padding as EfficientNet-Lite does it (ZeroPad2d before an unpadded conv), ReLU6, a
    depthwise conv, a residual add, x.view(x.size(0), -1) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pad0 = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.pad1 = nn.ZeroPad2d(1)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        bs = x.size(0)
        y = nn.functional.relu6(self.stem(self.pad0(x)))
        y = self.pw(nn.functional.relu6(self.dw(self.pad1(y)))) + y
        y = nn.functional.adaptive_avg_pool2d(y, 1).view(bs, -1)
        return self.fc(y)


@pytest.fixture(scope="module")
def samepad(tmp_path_factory):
    torch.manual_seed(0)
    m = SamePadNet().eval()
    with torch.no_grad():  # a dead channel whose bias does not fit int32 at s_x * s_w (EfficientNet's stem has 3)
        m.stem.weight[3].mul_(1e-7)
        m.stem.bias[3] = -40.0
    calib = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    q = lowbit.quantize(m, lowbit.recipes.W8A8(), calib, progress=False)
    r = export_onnx(q, calib[0], tmp_path_factory.mktemp("sp") / "samepad.onnx")
    return m, q, r, calib


def test_real_model_patterns_fold_to_pure_qdq(samepad):
    _, _, r, _ = samepad
    ops = [n.op_type for n in onnx.load(str(r.path)).graph.node]
    for gone in ("Shape", "Gather", "ConstantOfShape", "Concat", "Slice", "Clip", "Constant"):
        assert gone not in ops, gone
    assert ops.count("Pad") == 3  # the two ZeroPad2d, and the stem's input channels 3 -> 4 (target "ort-cpu")
    assert r.kernels.int8 == {"QLinearConv": 3, "QGemm": 1} and r.kernels.n_float == 0
    assert r.biases_int32 == 4
    assert r.parity.fraction_within >= 0.99 and r.parity.top1_agreement == 1.0


def test_dynamic_batch_survives_constant_reshape(samepad):
    _, q, r, _ = samepad
    torch.manual_seed(3)
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        sim = q(x).numpy()
    rep = verify_parity([sim], run_ort(r.path, [x]), r.path)
    assert rep.n == 7 * 5 and rep.fraction_within >= 0.99


def test_integer_runtime_bit_exact_with_pad_and_clip_dropped(samepad):
    _, _, r, calib = samepad
    x = calib[1].numpy()
    rt = IntegerRuntime(r.path, requant="float")
    out = rt.run({rt.input_names[0]: x})[rt.output_names[0]]
    np.testing.assert_array_equal(out, run_ort(r.path, [x])[0])


def test_dead_channel_bias_fits_int32(samepad):
    m, q, r, _ = samepad
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(r.path)).graph.initializer}
    key = next(k for k in inits if k.endswith("_bias_codes") and inits[k].size == 8 and "stem" in k)
    codes = inits[key].astype(np.int64)
    assert np.abs(codes).max() < 2**31 - 27 * 255 * 128  # no wrap-around in ORT's int32 accumulator
    s_b = inits[key.replace("_codes", "_scale")]
    # the stored bias still dequantizes to the float bias, every channel within half a bias step
    np.testing.assert_array_less(np.abs(codes * s_b.astype(np.float64) - m.stem.bias.detach().numpy()),
                                 0.5 * s_b + 1e-9)
    # the dead channel's output is its real value (relu6(-40 + ~0) = 0), not a wrapped accumulator
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        sim = q(x).numpy()
    rep = verify_parity([sim], run_ort(r.path, [x]), r.path)
    assert rep.max_steps <= 1.0 + 1e-3


def _clip_q_model(lo: float, hi: float, scale: float, zp: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [64])
    inits = [numpy_helper.from_array(np.array(lo, np.float32), "lo"), numpy_helper.from_array(np.array(hi, np.float32), "hi"),
             numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zp, np.uint8), "z")]
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]), helper.make_node("QuantizeLinear", ["c", "s", "z"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=9)


@pytest.mark.parametrize("scale,zp,dropped", [
    (6.0 / 255, 0, True),      # ReLU6 with the calibrated range [0, 6]: the quantizer saturates at 6
    (5.0 / 255, 0, True),      # range inside [0, 6]: Q(6) saturates too
    (6.5 / 255, 0, False),     # range beyond 6: the Clip changes codes 236..255, it must stay
    (6.0 / 255, 3, False),     # Q(0) = 3 > 0: values below 0 would give codes 0..2 without the Clip
])
def test_drop_clip_only_where_exact(tmp_path, scale, zp, dropped):
    model = _clip_q_model(0.0, 6.0, scale, zp)
    x = np.concatenate([np.linspace(-8, 8, 60), [6.0, 0.0, -1e-9, 6.0001]]).astype(np.float32)
    before = run_ort(make_session_from(model, tmp_path / "a.onnx"), [x])[0]
    assert sp.drop_clamp_before_quantize(model) == int(dropped)
    after = run_ort(make_session_from(model, tmp_path / "b.onnx"), [x])[0]
    np.testing.assert_array_equal(after, before)


def _relu_q_model(zp: int, dtype) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])
    y = helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [64])
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(zp, dtype), "z")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("QuantizeLinear", ["r", "s", "z"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=9)


@pytest.mark.parametrize("zp,dtype,dropped", [
    (0, np.uint8, True),       # Q(0) = 0 = qmin: every negative value saturates to code 0 anyway
    (-128, np.int8, True),     # the same at the int8 minimum
    (1, np.uint8, False),      # Q(0) = 1: negative values would reach code 0 without the Relu
    (0, np.int8, False),       # int8 with zero point 0: negatives map to -1..-128, the Relu must stay
])
def test_drop_relu_only_where_exact(tmp_path, zp, dtype, dropped):
    model = _relu_q_model(zp, dtype)
    x = np.concatenate([np.linspace(-8, 8, 61), [0.0, -1e-9, -0.025]]).astype(np.float32)
    before = run_ort(make_session_from(model, tmp_path / "a.onnx"), [x])[0]
    assert sp.drop_clamp_before_quantize(model) == int(dropped)
    assert [n.op_type for n in model.graph.node] == (["QuantizeLinear"] if dropped else ["Relu", "QuantizeLinear"])
    after = run_ort(make_session_from(model, tmp_path / "b.onnx"), [x])[0]
    np.testing.assert_array_equal(after, before)


def make_session_from(model: onnx.ModelProto, path):
    onnx.save(model, str(path))
    return make_session(path)


def test_quantize_before_pad_is_exact_on_ort(tmp_path):
    """Pad(0) -> Q -> DQ == Q -> DQ -> Pad, checked on ORT with the values of a real activation."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64), "pads"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(7, np.uint8), "z")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    xv = np.random.default_rng(0).normal(size=(1, 2, 3, 3)).astype(np.float32)
    before = run_ort(make_session_from(model, tmp_path / "a.onnx"), [xv])[0]
    assert sp.quantize_before_pad(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "DequantizeLinear", "Pad"]
    after = run_ort(make_session_from(model, tmp_path / "b.onnx"), [xv])[0]
    np.testing.assert_array_equal(after, before)
    assert before.shape == (1, 2, 4, 5)


def test_runtime_pad_fill_value_on_grid_and_refused_off_grid(tmp_path):
    def model(value: float):
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 2, 2])
        y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
        inits = [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                 numpy_helper.from_array(np.array(value, np.float32), "v"),
                 numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(10, np.uint8), "z")]
        nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
                 helper.make_node("Pad", ["d", "pads", "v"], ["p"]), helper.make_node("QuantizeLinear", ["p", "s", "z"], ["y"])]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=9)

    xv = np.array([[[[0, 255], [10, 37]]]], np.uint8)
    m = model(1.5)  # code 13
    out = IntegerRuntime(m).run({"x": xv})["y"]
    np.testing.assert_array_equal(out, run_ort(make_session_from(m, tmp_path / "p.onnx"), [xv])[0])
    assert out[0, 0, 0, 0] == 13 and out[0, 0, 1, 1] == 0
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match="not on the input's quantization grid"):
        IntegerRuntime(model(0.3)).run({"x": xv})


def test_fold_constants_keeps_qdq_and_dead_code_removed():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "a"), numpy_helper.from_array(np.array([3], np.int64), "b"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array([5, 6, 7, 8], np.int8), "w")]
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=0),            # constant: folded
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"]),          # constant but kept (a weight)
             helper.make_node("Shape", ["x"], ["unused"]),                      # dead
             helper.make_node("Add", ["x", "wd"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    assert sp.fold_constants(model) == 1
    assert numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "ab")).tolist() == [1, 2, 3]
    assert sp.remove_dead_nodes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Add"]


def test_float_output_tolerance_by_cosine(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = lowbit.quantize(m, lowbit.recipes.W8A8Dynamic(), None, progress=False)
    r = export_onnx(q, torch.randn(4, 16), tmp_path / "d.onnx")
    assert r.parity.min_cosine is not None and r.parity.min_cosine > 0.999
    a = np.random.default_rng(0).normal(size=(4, 8))
    rotated = a + 0.05 * np.abs(a).max()  # every value ~13 "steps" of max/255 away, rows still ~parallel
    rep = verify_parity([a], [rotated], r.path, min_cosine=0.9)
    assert rep.fraction_within == 0.0 and rep.min_cosine > 0.9
    with pytest.raises(ParityError, match="lowest row cosine"):
        verify_parity([a], [rotated], r.path, min_cosine=0.99999)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v))


def test_attention_raises_the_opset_and_uses_int8_matmuls(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    q = lowbit.quantize(Attention().eval(), lowbit.recipes.W8A8Dynamic(), None, progress=False)
    r = export_onnx(q, x, tmp_path / "att.onnx")
    assert r.opset >= 14  # scaled_dot_product_attention has no opset-13 form
    assert count_kernels(r.path).n_int8 == 2
    assert r.parity.min_cosine > 0.999


def _shape_graph():
    """x (n, 6, 4) -> Reshape to (n, 6, 2, 2) with the target computed from Shape(x) the way the tracer writes
    ``x.view(x.size(0), x.size(1), 2, -1)``, then y = reshaped * 2."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"), numpy_helper.from_array(np.array([2, -1], np.int64), "rest"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Gather", ["shp", "i0"], ["d0"]), helper.make_node("Gather", ["shp", "i1"], ["d1"]),
             helper.make_node("Unsqueeze", ["d0", "ax"], ["u0"]), helper.make_node("Unsqueeze", ["d1", "ax"], ["u1"]),
             helper.make_node("Concat", ["u0", "u1", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=9)


def test_fold_static_shapes_keeps_dynamic_batch(tmp_path):
    before, after = _shape_graph(), _shape_graph()
    assert sp.fold_static_shapes(after) > 0
    sp.remove_dead_nodes(after)
    assert [n.op_type for n in after.graph.node] == ["Reshape", "Mul"]
    target = next(t for t in after.graph.initializer if t.name == after.graph.node[0].input[1])
    assert numpy_helper.to_array(target).tolist() == [0, 6, 2, -1]  # batch copied from the input, 6 now constant
    for n in (1, 5):
        xv = np.random.default_rng(n).normal(size=(n, 6, 4)).astype(np.float32)
        got = run_ort(make_session_from(after, tmp_path / f"a{n}.onnx"), [xv])[0]
        np.testing.assert_array_equal(got, run_ort(make_session_from(before, tmp_path / f"b{n}.onnx"), [xv])[0])
        np.testing.assert_array_equal(got, xv.reshape(n, 6, 2, 2) * 2)


def test_fold_static_shapes_leaves_a_dynamic_value_alone():
    m = _shape_graph()
    m.graph.node[1].input[1] = "i1"  # Gather dims 1 and 1: (6, 6, 2, -1) is static -> folded ...
    m.graph.node[2].input[1] = "i0"  # ... but here: (6, n, 2, -1) puts the batch at position 1: kept
    sp.fold_static_shapes(m)
    ops = [n.op_type for n in m.graph.node]
    assert "Shape" in ops and "Reshape" in ops and not any(t.name.endswith("_static_shape") for t in m.graph.initializer)


class Heads(nn.Module):
    """Multi-head split/merge as traced transformers write it (size() arithmetic in every layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        h = self.qkv(x).view(b, t, 4, x.size(2) // 4).transpose(1, 2)
        return self.out(torch.relu(h).transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_traced_head_reshapes_become_constant(tmp_path, kind):
    from lowbit.export import export_onnx_float

    torch.manual_seed(0)
    m = Heads().eval()
    x = torch.randn(2, 5, 16)
    if kind == "float":
        path = export_onnx_float(m, x, tmp_path / "h.onnx")
    else:
        q = lowbit.quantize(m, lowbit.recipes.W8A8Dynamic(), None, progress=False)
        path = export_onnx(q, x, tmp_path / "h.onnx").path
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Shape" not in ops and "Gather" not in ops and "Concat" not in ops, ops
    x3 = torch.randn(3, 5, 16)  # another batch size: the batch dimension stayed dynamic
    with torch.no_grad():
        ref = (m if kind == "float" else q)(x3).numpy()
    tol = 1e-5 if kind == "float" else 0.05 * np.abs(ref).max()
    np.testing.assert_allclose(run_ort(path, [x3])[0], ref, rtol=0, atol=tol)


def test_failed_opset_attempt_prints_no_torchscript_graph(tmp_path):
    """The opset-13 attempt of an attention model fails and is retried; torch's exporter would print its
    whole IR graph for it (to stdout when that is not a terminal; C++ output, so run a plain process)."""
    script = (
        "import sys, torch, lowbit\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_simplify import Attention\n"
        "torch.manual_seed(0)\n"
        "q = lowbit.quantize(Attention().eval(), lowbit.recipes.W8A8Dynamic(), None, progress=False)\n"
        f"r = lowbit.export_onnx(q, torch.randn(2, 5, 16), {str(tmp_path / 'a.onnx')!r})\n"
        "print('opset', r.opset)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "opset 17" in out.stdout and "Torch IR graph" not in out.stdout + out.stderr


def _two_pads_model() -> onnx.ModelProto:
    """x -> Pad -> Q -> DQ -> Relu -> Pad -> Q -> DQ -> y: two zero Pads of float tensors before a quantizer,
    with the tracer-style value_info of the padded codes (the shapes before the rewrite)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 6])
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64), "pads_a"),
             numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 0], np.int64), "pads_b"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(7, np.uint8), "z"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s2"), numpy_helper.from_array(np.array(0, np.uint8), "z2")]
    nodes = [helper.make_node("Pad", ["x", "pads_a"], ["p1"], name="pad1"),
             helper.make_node("QuantizeLinear", ["p1", "s", "z"], ["q1"], name="q1"),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"], name="dq1"),
             helper.make_node("Relu", ["d1"], ["r"], name="relu"),
             helper.make_node("Pad", ["r", "pads_b"], ["p2"], name="pad2"),
             helper.make_node("QuantizeLinear", ["p2", "s2", "z2"], ["q2"], name="q2"),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"], name="dq2")]
    value_info = [helper.make_tensor_value_info("q1", TensorProto.UINT8, [1, 2, 4, 5]),
                  helper.make_tensor_value_info("q2", TensorProto.UINT8, [1, 2, 5, 6])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits, value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)


def test_quantize_before_pad_rewrites_every_pattern(tmp_path):
    """Two Pad -> Q -> DQ patterns in one graph: both move (the second used to fail with "... is not in list":
    the node list was rewritten after the first, leaving the maps' nodes detached copies), the graph stays
    topological, the codes' value_info of the padded shape is gone, and ORT's output is unchanged."""
    model = _two_pads_model()
    xv = np.random.default_rng(0).normal(size=(1, 2, 3, 3)).astype(np.float32)
    before = run_ort(make_session_from(model, tmp_path / "a.onnx"), [xv])[0]
    assert sp.quantize_before_pad(model) == 2
    assert [n.name for n in model.graph.node] == ["q1", "dq1", "pad1", "relu", "q2", "dq2", "pad2"]
    assert model.graph.node[0].input[0] == "x" and model.graph.node[6].output[0] == "y"
    assert not any(v.name in ("q1", "q2") for v in model.graph.value_info)
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    after = run_ort(make_session_from(model, tmp_path / "b.onnx"), [xv])[0]
    assert before.shape == (1, 2, 5, 6)
    np.testing.assert_array_equal(after, before)


class WeightOnlyPadNet(nn.Module):
    """EfficientNet-Lite's expand -> ReLU6 -> static padding -> depthwise, twice. With the expand convs
    weight-only (what mixed precision picks for them), each ReLU6 output is float, so the depthwise conv's input
    quantizer sees ``Pad -> QuantizeLinear``: two such patterns for quantize_before_pad."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1, self.pad1, self.dw1 = nn.Conv2d(4, 8, 1), nn.ZeroPad2d(1), nn.Conv2d(8, 8, 3, groups=8)
        self.pw2, self.pad2 = nn.Conv2d(8, 8, 1), nn.ZeroPad2d((0, 1, 0, 1))
        self.dw2 = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.dw1(self.pad1(nn.functional.relu6(self.pw1(x))))
        y = self.dw2(self.pad2(nn.functional.relu6(self.pw2(y))))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_layers_before_padding_export(tmp_path, bits):
    """A mixed-precision model whose weight-only layers feed zero padding (EfficientNet-Lite0 with
    ``--mixed w4`` failed to export): every Pad moves onto the codes, the depthwise convs run as QLinearConv,
    and ORT computes what the simulation computes (in ORT's arithmetic), on the export's batch and a new one."""
    torch.manual_seed(0)
    net = WeightOnlyPadNet().eval()
    calib = [torch.randn(4, 4, 12, 12) for _ in range(2)]
    wo = lowbit.recipes.WeightOnly(bits=bits)
    q = lowbit.quantize(net, lowbit.recipes.W8A8(overrides={"pw1": wo, "pw2": wo}), calib, progress=False)
    r = export_onnx(q, calib[0], tmp_path / "mixed.onnx")
    g = onnx.load(str(r.path)).graph
    producer = {o: n for n in g.node for o in n.output}
    pads = [n for n in g.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(producer[p.input[0]].op_type == "DequantizeLinear" for p in pads)
    assert not any(n.op_type == "Clip" for n in g.node)  # each ReLU6 now right before a saturating quantizer
    # the depthwise convs and the head; with 8-bit weights also pw2, whose input and output are quantized
    assert r.kernels.int8 == {"QLinearConv": 3 if bits == 8 else 2, "QGemm": 1}
    assert r.parity.fraction_within == 1.0
    torch.manual_seed(5)
    x = torch.randn(16, 4, 12, 12)
    with lowbit.nn.ort_arithmetic(q), torch.no_grad():
        sim = q(x).numpy()
    steps = np.abs(run_ort(r.path, [x])[0] - sim) / float(q.fc.output_quantizer.scale)
    # lowbit writes pw2's int32 bias at s_x * s_w itself, for 4-bit weights too, as the simulation computes it
    # (with a float bias ORT rounds it so on its own when a DQ-fed Conv feeds a QuantizeLinear: 94 % exact)
    assert steps.max() == 0.0
