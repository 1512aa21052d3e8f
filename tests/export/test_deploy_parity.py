"""Simulation vs ONNX Runtime int8, fast: a conv stack built here where the float bias and the deployed
int32 bias give measurably different codes, and ``lowbit.nn.ort_arithmetic`` reproduces ORT bit for bit
(QLinearConv requantization, QLinearAdd on every code pair).

The real-model figures (EfficientNet-Lite0 on 1000 ImageNet samples) are in test_deploy_real.py (slow)
and docs/benchmarks.md, "Deployment parity"."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.export import export_onnx, run_ort
from lowbit.export.verify import make_session, output_scales
from lowbit.nn import QuantAdd, QuantLayerMixin
from lowbit.nn.layers import link_input_quantizer
from lowbit.runtime import ort_numerics

A8 = QuantSpec("uint8", symmetric=False)


class ConvStack(nn.Module):
    """Six 3x3 convs with ReLU6 (one stride 2), the last three with residual adds, a 1x1 head: every op is
    a QLinearConv / QLinearAdd in ORT."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3] + [width] * 6
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2 if i == 2 else 1, padding=1)
                                   for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])))
        self.head = nn.Conv2d(width, 8, 1)

    def forward(self, x):
        for i, c in enumerate(self.convs):
            y = nn.functional.relu6(c(x))
            x = y + x if i >= 3 else y
        return self.head(x)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    torch.manual_seed(0)
    m = ConvStack().eval()
    with torch.no_grad():
        for c in [*m.convs, m.head]:
            c.weight.mul_(1.5)
            c.bias.copy_(torch.randn_like(c.bias) * 0.5)
    calib = [torch.randn(4, 3, 20, 20) for _ in range(3)]
    q = lowbit.quantize(m, lowbit.recipes.W8A8(), calib, progress=False)
    r = export_onnx(q, calib[0], tmp_path_factory.mktemp("dp") / "stack.onnx")
    torch.manual_seed(1)
    x = torch.randn(16, 3, 20, 20)
    return q, r, x


def _codes(y: np.ndarray, step: float) -> np.ndarray:
    return np.rint(np.asarray(y, np.float64) / step).astype(np.int64)


def test_all_biases_int32_and_export_parity(deployed):
    q, r, _ = deployed
    assert r.biases_int32 == 7 and r.kernels.int8 == {"QLinearConv": 7} and r.kernels.n_float == 0
    assert r.parity.fraction_within >= 0.99
    layers = [m for m in q.modules() if isinstance(m, QuantLayerMixin)]
    assert all(m.int32_bias(m.bias, 4) is not None for m in layers)


def test_int32_bias_simulation_closer_to_ort_than_float_bias(deployed):
    q, r, x = deployed
    step = output_scales(r.path)[0]
    dep = _codes(run_ort(r.path, [x])[0], step)
    with torch.no_grad():
        sim_int = _codes(q(x).numpy(), step)
    layers = [m for m in q.modules() if isinstance(m, QuantLayerMixin)]
    links = {m: m.bias_input_quantizer() for m in layers}
    try:
        for m in layers:  # without its input scale a layer keeps the float bias (the old simulation)
            link_input_quantizer(m, None)
        with torch.no_grad():
            sim_float = _codes(q(x).numpy(), step)
    finally:
        for m, lq in links.items():
            link_input_quantizer(m, lq)
    differ_int = float((sim_int != dep).mean())
    differ_float = float((sim_float != dep).mean())
    # measured here: float bias 1710 of the 12 800 output codes (13.4 %) differ from ORT, int32 bias none
    # (a few float32 ties may differ on another CPU, hence the margin)
    assert differ_float > 0.03
    assert differ_int < differ_float / 10
    assert np.abs(sim_int - dep).max() <= 1


def test_ort_arithmetic_is_bit_exact_with_ort(deployed):
    q, r, x = deployed
    with lowbit.nn.ort_arithmetic(q), torch.no_grad():
        sim = q(x).numpy()
    np.testing.assert_array_equal(sim, run_ort(r.path, [x])[0])
    # the mode is scoped: outside it the layers compute as before
    assert not any("_lowbit_ort_arithmetic" in m.__dict__ for m in q.modules())


def test_ort_arithmetic_leaves_training_and_non_integer_layers_alone(deployed):
    q, _, x = deployed
    with torch.no_grad():
        ref = q(x)
    with lowbit.nn.ort_arithmetic(q):
        y = q(x)  # gradient enabled: the fake-quantized forward, so QAT keeps its gradients
    torch.testing.assert_close(y.detach(), ref, rtol=0, atol=0)


def _ort_qlinear_add(sa, za, sb, zb, sc, zc, a: np.ndarray, b: np.ndarray, path) -> np.ndarray:
    """ONNX Runtime's own QLinearAdd (ORT fuses DQ, DQ -> Add -> Q) on uint8 codes ``a``, ``b``."""
    from onnx import TensorProto, helper, numpy_helper

    f, u = np.float32, np.uint8
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
         helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
         helper.make_node("Add", ["fa", "fb"], ["c"]),
         helper.make_node("QuantizeLinear", ["c", "sc", "zc"], ["qc"])],
        "add", [helper.make_tensor_value_info(n, TensorProto.UINT8, a.shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("qc", TensorProto.UINT8, a.shape)],
        [numpy_helper.from_array(v, n) for n, v in
         (("sa", f(sa)), ("za", u(za)), ("sb", f(sb)), ("zb", u(zb)), ("sc", f(sc)), ("zc", u(zc)))])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=9), str(path))
    return run_ort(make_session(path), [a, b])[0]


# the first: EfficientNet-Lite0's last residual add, where codes (59, 115) land 2e-7 above a tie
ADD_PARAMS = [(0.1642214059829712, 90, 0.36647114157676697, 126, 0.3881721794605255, 118),
              (0.02, 0, 0.05, 128, 0.07, 3), (0.9, 255, 0.011, 7, 0.5, 200)]


@pytest.mark.parametrize("params", ADD_PARAMS)
def test_qlinear_add_arithmetic_equals_ort_on_every_code_pair(params, tmp_path):
    sa, za, sb, zb, sc, zc = params
    a, b = (t.reshape(1, -1).astype(np.uint8) for t in np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
    expected = _ort_qlinear_add(sa, za, sb, zb, sc, zc, a, b, tmp_path / "add.onnx")
    join = QuantAdd([A8, A8], output_spec=A8, name="add")
    for q, (s, z) in zip([*join.input_quantizers, join.output_quantizer], [(sa, za), (sb, zb), (sc, zc)]):
        q.set_qparams(torch.tensor(s, dtype=torch.float32), torch.tensor(z))
    fa = (torch.from_numpy(a.astype(np.float32)) - za) * torch.tensor(sa, dtype=torch.float32)
    fb = (torch.from_numpy(b.astype(np.float32)) - zb) * torch.tensor(sb, dtype=torch.float32)
    with lowbit.nn.ort_arithmetic(join), torch.no_grad():
        y = join(fa, fb)
    got = (torch.round(y / torch.tensor(sc, dtype=torch.float32)) + zc).to(torch.int64).numpy()
    np.testing.assert_array_equal(got, expected.astype(np.int64))
    # the integer runtime's QLinearAdd (lowbit.runtime.ort_numerics) is the same arithmetic
    rt = ort_numerics.qlinear_add(a, sa, za, b, sb, zb, sc, zc, np.uint8)
    np.testing.assert_array_equal(rt, expected)


@pytest.mark.parametrize("target", ["ort-cpu", "qdq"])
def test_dynamic_linear_matches_ort_kernels(target, tmp_path):
    """One W8A8Dynamic Linear on a 3-D input: the simulation's per-tensor uint8 dynamic quantization and
    int32 accumulation match ORT's DynamicQuantizeMatMul / MatMulInteger to float32 rounding. (Through
    GELU / LayerNorm, ORT's float ops differ from torch's in the last bits and can flip a dynamic code at
    a tie; docs/benchmarks.md, Deployment parity, MiniLM.)"""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 48)).eval()
    x = torch.randn(2, 16, 64)
    q = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=(x,), progress=False)
    res = export_onnx(q, (x,), tmp_path / "d.onnx", target=target)
    with torch.no_grad():
        sim = q(x).numpy()
    ort = run_ort(res.path, (x,))[0]
    assert np.abs(sim - ort).max() <= 2e-6 * np.abs(sim).max()
    assert np.abs(sim - model(x).detach().numpy()).max() > 1e-3 * np.abs(sim).max()  # it is quantized


@pytest.mark.parametrize("target", ["ort-cpu", "qdq"])
def test_ort_arithmetic_dynamic_linears_are_bit_exact(target, tmp_path):
    """Two W8A8Dynamic Linears in a row (3-D input; the second has K = 1536, so its integer accumulator is
    summed in slices that stay exact in float32): inside ``ort_arithmetic`` every output equals ORT's
    DynamicQuantizeMatMul / MatMulIntegerToFloat (``f32(f32(acc) * f32(s_x s_w)) + b``), the second layer's
    dynamic range included; the default float32 GEMM of dequantized operands equals it on a minority."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 1536), nn.Linear(1536, 48)).eval()
    x = torch.randn(2, 16, 64) * 3 + 0.5
    q = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=(x,), progress=False)
    res = export_onnx(q, (x,), tmp_path / "d2.onnx", target=target)
    ort = run_ort(res.path, (x,))[0]
    with torch.no_grad():
        default = q(x).numpy()
        with lowbit.nn.ort_arithmetic(q):
            exact = q(x).numpy()
    np.testing.assert_array_equal(exact, ort)
    assert (default == ort).mean() < 0.9
    assert res.parity.fraction_within == 1.0 and res.parity.max_steps == 0.0
