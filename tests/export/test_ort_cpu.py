"""target="ort-cpu" rewrites (lowbit.export._ort_cpu): the same outputs as the plain QDQ export, and the
integer kernels they exist for in ONNX Runtime's optimized graph (op counts, never timings)."""

import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.errors import ConfigError
from lowbit.export import export_onnx, run_ort
from lowbit.export.verify import make_session
from lowbit.runtime import IntegerRuntime


def _optimized(path, tmp_path) -> onnx.GraphProto:
    opt = os.path.join(tmp_path, f"{os.path.basename(str(path))}.opt.onnx")
    make_session(path, optimized_path=opt)
    return onnx.load(opt).graph


def _optimized_ops(path, tmp_path) -> collections.Counter:
    return collections.Counter(n.op_type for n in _optimized(path, tmp_path).node)


def _biases_in_int8_kernels(graph: onnx.GraphProto) -> list[bool]:
    """Per DynamicQuantizeMatMul / MatMulIntegerToFloat: does it carry the bias (its last input)?"""
    last = {"DynamicQuantizeMatMul": 4, "MatMulIntegerToFloat": 6}
    return [len(n.input) > last[n.op_type] and bool(n.input[last[n.op_type]]) for n in graph.node if n.op_type in last]


@pytest.fixture(scope="module")
def both_targets(qnet, calib, tmp_path_factory):
    d = tmp_path_factory.mktemp("ortcpu")
    return (export_onnx(qnet, calib[0], d / "net.ort.onnx"), export_onnx(qnet, calib[0], d / "net.qdq.onnx", target="qdq"))


def test_stem_input_channels_padded_exactly(both_targets, tmp_path):
    ort_cpu, qdq = both_targets
    g = onnx.load(str(ort_cpu.path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    pads = [n for n in g.node if n.op_type == "Pad"]
    assert len(pads) == 1  # SmallNet's 3-channel stem only; c2 has 8 input channels already
    np.testing.assert_array_equal(inits[pads[0].input[1]], [0, 0, 0, 0, 0, 1, 0, 0])
    producer = {o: n for n in g.node for o in n.output}
    assert producer[pads[0].input[0]].op_type == "QuantizeLinear"
    assert pads[0].input[2] == producer[pads[0].input[0]].input[2]  # filled with the input's zero point
    stem = next(n for n in g.node if n.op_type == "Conv" and producer[n.input[0]].input[0] == pads[0].output[0])
    w = inits[producer[stem.input[1]].input[0]]
    assert w.shape == (8, 4, 3, 3) and w.dtype == np.int8 and not w[:, 3].any()
    w_qdq = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(qdq.path)).graph.initializer}
    np.testing.assert_array_equal(w[:, :3], w_qdq[producer[stem.input[1]].input[0]])
    # still every conv an integer kernel in ORT, no float conv, and bit-identical outputs
    assert ort_cpu.kernels.int8 == qdq.kernels.int8 == {"QLinearConv": 2, "QGemm": 1}
    assert ort_cpu.kernels.n_float == 0
    ops = _optimized_ops(ort_cpu.path, tmp_path)
    assert ops["Pad"] == 1 and ops["DequantizeLinear"] <= 1 and ops["QuantizeLinear"] == 1  # the Pad stays on codes
    torch.manual_seed(3)
    x = torch.randn(5, 3, 16, 16)
    np.testing.assert_array_equal(run_ort(ort_cpu.path, [x])[0], run_ort(qdq.path, [x])[0])
    rt = IntegerRuntime(ort_cpu.path, requant="float")
    out = rt.run({rt.input_names[0]: x.numpy()})[rt.output_names[0]]
    np.testing.assert_array_equal(out, run_ort(ort_cpu.path, [x])[0])


def _static_dims(v: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]


def test_padded_stem_leaves_no_stale_value_info(both_targets, capfd):
    """The stem's weight codes grow from 3 to 4 input channels; the tracer's value_info of the weight's
    DequantizeLinear output said (8, 3, 3, 3), so ONNX Runtime warned "Error merging shape info" on every
    load and strict shape inference failed. Every value_info left agrees with ONNX shape inference, and
    names a tensor the graph still has."""
    path = both_targets[0].path
    model = onnx.load(str(path))
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = {v.name: _static_dims(v) for v in onnx.shape_inference.infer_shapes(bare).graph.value_info}
    assert len(model.graph.value_info) > 0  # the entries still right are kept
    for v in model.graph.value_info:
        assert v.name in inferred, f"value_info of {v.name}, a tensor the graph no longer has"
        mine, theirs = _static_dims(v), inferred[v.name]
        assert len(mine) == len(theirs) and all(a is None or b is None or a == b for a, b in zip(mine, theirs)), v.name
    producer = {o: n for n in model.graph.node for o in n.output}
    stem = next(n for n in model.graph.node if n.op_type == "Conv" and producer[n.input[0]].input[0].endswith("_codes")
                and producer[producer[n.input[0]].input[0]].op_type == "Pad")
    assert inferred[stem.input[1]] == [8, 4, 3, 3]
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    capfd.readouterr()
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # ORT's default log level shows warnings
    assert "MergeShapeInfo" not in capfd.readouterr().err


def test_no_padding_for_grouped_or_aligned_convs(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)).eval()
    calib = [torch.randn(2, 4, 12, 12) for _ in range(2)]
    q = lowbit.quantize(m, lowbit.recipes.W8A8(), calib, progress=False)
    r = export_onnx(q, calib[0], tmp_path / "m.onnx")
    pads = [n for n in onnx.load(str(r.path)).graph.node if n.op_type == "Pad"]
    assert len(pads) == 1  # only the last conv (6 input channels -> 8); 4, grouped 8 and 8 stay
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(t for t in onnx.load(str(r.path)).graph.initializer if t.name == pads[0].input[1])),
        [0, 0, 0, 0, 0, 2, 0, 0])
    assert r.kernels.int8 == {"QLinearConv": 4} and r.parity.fraction_within == 1.0


class Block(nn.Module):
    """Transformer-style MLP block: Linear -> GELU -> Linear, residual, LayerNorm (biases everywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.ln = nn.LayerNorm(32)

    def forward(self, x):
        return self.ln(x + self.fc2(nn.functional.gelu(self.fc1(x))))


@pytest.fixture(scope="module")
def dynamic_block(tmp_path_factory):
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 7, 32)
    q = lowbit.quantize(m, lowbit.recipes.W8A8Dynamic(), example_inputs=x, progress=False)
    d = tmp_path_factory.mktemp("dyn")
    return q, x, export_onnx(q, x, d / "b.ort.onnx"), export_onnx(q, x, d / "b.qdq.onnx", target="qdq")


def test_dynamic_linear_as_matmul_integer_fuses_the_bias(dynamic_block, tmp_path):
    _, x, ort_cpu, qdq = dynamic_block
    raw = collections.Counter(n.op_type for n in onnx.load(str(ort_cpu.path)).graph.node)
    assert raw["MatMulInteger"] == 2 and raw["MatMul"] == 0 and raw["DequantizeLinear"] == 0
    fused, plain = _optimized(ort_cpu.path, tmp_path), _optimized(qdq.path, tmp_path)
    assert ort_cpu.kernels.n_int8 == qdq.kernels.n_int8 == 2 and ort_cpu.kernels.n_float == 0
    # ORT folds both biases into its integer kernels; from the QDQ form it cannot (they end up in float
    # BiasGelu / Add nodes instead)
    assert _biases_in_int8_kernels(fused) == [True, True]
    assert _biases_in_int8_kernels(plain) == [False, False]
    ops = collections.Counter(n.op_type for n in fused.node)
    assert ops["Add"] == 0 and ops["BiasGelu"] == 0, ops
    a, b = run_ort(ort_cpu.path, [x])[0], run_ort(qdq.path, [x])[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("shape", [(2, 3, 16), (6, 16)], ids=["3d-matmul", "2d-gemm"])
def test_matmul_integer_form_against_numpy(tmp_path, shape):
    """One Linear on (batch, tokens, features), traced as MatMul + Add, or on (batch, features), traced as
    Gemm: ORT's output of the rewritten graph = s_x s_w (q_x - z_x) q_w^T + b, with the ONNX
    DynamicQuantizeLinear formula computed in numpy."""
    torch.manual_seed(1)
    lin = nn.Linear(16, 8).eval()
    model = nn.Sequential(lin).eval()  # quantize() swaps children
    x = torch.randn(*shape)
    q = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=x, progress=False)
    r = export_onnx(q, x, tmp_path / "lin.onnx")
    g = onnx.load(str(r.path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    mmi = next(n for n in g.node if n.op_type == "MatMulInteger")
    w_codes = inits[mmi.input[1]].astype(np.float64)  # (K, N), stored transposed for MatMulInteger
    s_w = next(v for k, v in inits.items() if k.endswith("_scale") and v.size == 8).astype(np.float64)
    xf = x.numpy().astype(np.float32)
    lo, hi = min(0.0, float(xf.min())), max(0.0, float(xf.max()))
    s_x = np.float32((hi - lo) / 255)
    z_x = np.clip(np.rint(-lo / s_x), 0, 255)
    q_x = np.clip(np.rint(xf / s_x) + z_x, 0, 255)
    ref = float(s_x) * s_w * ((q_x - z_x) @ w_codes) + lin.bias.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(run_ort(r.path, [x])[0], ref, rtol=1e-5, atol=1e-6)


def test_dynamic_linear_on_2d_input_runs_integer_kernels(tmp_path):
    """An MLP on (batch, features): each Linear is traced as a Gemm, which ORT ran in float after
    DequantizeLinear (0 integer kernels). Written as MatMulInteger + bias Add like the 3-D case, both Linears
    become DynamicQuantizeMatMul with the bias inside, and ORT equals the simulation in ORT's arithmetic."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(8, 64)
    q = lowbit.quantize(mlp, lowbit.recipes.W8A8Dynamic(), example_inputs=x, progress=False)
    ort_cpu = export_onnx(q, x, tmp_path / "mlp.ort.onnx")
    qdq = export_onnx(q, x, tmp_path / "mlp.qdq.onnx", target="qdq")
    raw = collections.Counter(n.op_type for n in onnx.load(str(ort_cpu.path)).graph.node)
    assert raw["MatMulInteger"] == 2 and raw["Gemm"] == 0 and raw["DequantizeLinear"] == 0
    assert ort_cpu.kernels.n_int8 == 2 and ort_cpu.kernels.n_float == 0  # one per Linear
    assert qdq.kernels.n_int8 == 0 and qdq.kernels.n_float == 2  # the plain QDQ Gemm: float in ORT
    assert _biases_in_int8_kernels(_optimized(ort_cpu.path, tmp_path)) == [True, True]
    assert ort_cpu.parity.max_steps == 0.0 and all(s.max_steps == 0.0 for s in ort_cpu.parity.stages)
    x2 = torch.randn(5, 64)  # another batch size: the batch dimension stays dynamic
    with lowbit.nn.ort_arithmetic(q), torch.no_grad():
        sim = q(x2).numpy()
    a, b = run_ort(ort_cpu.path, [x2])[0], run_ort(qdq.path, [x2])[0]
    np.testing.assert_array_equal(a, sim)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_unknown_target_refused(qnet, calib, tmp_path):
    with pytest.raises(ConfigError, match="target"):
        export_onnx(qnet, calib[0], tmp_path / "x.onnx", target="tensorrt")


class ReLU6Net(nn.Module):
    """Conv-BN-ReLU6 twice, pooled into a Linear: cross-layer equalization turns both ReLU6 into per-channel
    clips (ChannelClip), which the plain QDQ export keeps in float between Conv and QuantizeLinear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.act1, self.act2 = nn.ReLU6(), nn.ReLU6()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        x = self.act1(self.b1(self.c1(x)))
        x = self.act2(self.b2(self.c2(x)))
        return self.fc(self.pool(self.c3(x)).flatten(1))


def test_equalized_relu6_clips_codes_after_the_quantizer(tmp_path):
    """After CLE the ReLU6 between conv and quantizer is a per-channel clip: exported as QuantizeLinear then
    a Min on the codes (exact: Q is monotone), every conv stays an integer kernel, and ORT, the simulation in
    ORT's arithmetic and the integer runtime agree bit for bit."""
    from lowbit.passes import DFQ
    from lowbit.passes.clip import ChannelClip

    torch.manual_seed(0)
    net = ReLU6Net().eval()
    for bn in (net.b1, net.b2):  # trained-looking statistics, uneven channel ranges for CLE to equalize
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 4)
        bn.weight.data.uniform_(0.2, 3)
    calib = [torch.randn(8, 4, 12, 12) * 20 for _ in range(2)]  # large: the clips bite
    q = lowbit.quantize(net, lowbit.recipes.W8A8(), calib, dfq=DFQ(high_bias_absorption=False, bias_correction=None),
                        progress=False)
    assert sum(isinstance(m, ChannelClip) for m in q.modules()) == 2
    res = export_onnx(q, calib[0], tmp_path / "cle.onnx")
    plain = export_onnx(q, calib[0], tmp_path / "cle.qdq.onnx", target="qdq")
    g = onnx.load(str(res.path)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    mins = [n for n in g.node if n.op_type == "Min"]
    assert 1 <= len(mins) <= 2 and not any(n.op_type == "Relu" for n in g.node)  # a Min is dropped if all 255
    for n in mins:
        assert producer[n.input[0]].op_type == "QuantizeLinear" and inits[n.input[1]].dtype == np.uint8
        assert inits[n.input[1]].shape == (8, 1, 1) and inits[n.input[1]].min() < 255  # a real clip
    assert res.kernels.int8 == {"QLinearConv": 3, "QGemm": 1} and res.kernels.n_float == 0
    assert plain.kernels.n_float == 2  # the two clipped convs stay float in the plain form
    assert res.parity.fraction_within == 1.0 and res.parity.max_steps == 0.0  # bit-exact in ORT arithmetic
    x = torch.randn(5, 4, 12, 12) * 20
    rt = IntegerRuntime(res.path, requant="float")
    np.testing.assert_array_equal(rt.run({rt.input_names[0]: x.numpy()})[rt.output_names[0]], run_ort(res.path, [x])[0])
    with lowbit.nn.ort_arithmetic(q), torch.no_grad():
        sim = q(x).numpy()
    np.testing.assert_array_equal(sim, run_ort(res.path, [x])[0])
    rt_plain = IntegerRuntime(plain.path, requant="float")  # the float clip of the plain form: refused, said why
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match="does not come from DequantizeLinear"):
        rt_plain.run({rt_plain.input_names[0]: x.numpy()})
