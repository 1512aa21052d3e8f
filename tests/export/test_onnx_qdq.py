"""ONNX QDQ export: parity with the simulation in output steps, int8 kernels in ORT's optimized graph,
stored codes against an independent torch computation, and every bad input."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import lowbit
from lowbit.errors import (
    ConfigError,
    EmptyCalibrationError,
    ExportError,
    FileExistsRefusedError,
    ModelFileError,
    ParityError,
)
from lowbit.export import (
    count_kernels,
    export_onnx,
    export_onnx_dynamic,
    export_onnx_float,
    run_ort,
    verify_parity,
)
from lowbit.export.verify import make_session
from lowbit.nn import QuantLinear


@pytest.fixture(scope="module")
def exported(qnet, calib, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "net.int8.onnx"
    return export_onnx(qnet, calib[0], path)


def _inits(path):
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def test_parity_in_steps_and_int8_kernels(exported, qnet, calib):
    r = exported
    assert r.opset == 13
    assert r.parity.fraction_within >= 0.99 and r.parity.max_steps <= 1.0 + 1e-3
    assert r.parity.top1_agreement == 1.0
    # every conv and the linear run as integer kernels, nothing stays float
    assert r.kernels.int8 == {"QLinearConv": 2, "QGemm": 1}
    assert r.kernels.n_float == 0
    assert r.biases_int32 == 3
    # other inputs than the example: still within one step (scales are static)
    torch.manual_seed(5)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        sim = qnet(x).numpy()
    rep = verify_parity([sim], run_ort(r.path, [x]), r.path)  # dynamic batch dimension
    assert rep.fraction_within >= 0.99


def test_stored_codes_match_independent_quantization(exported, qnet):
    """int8 weight codes = clamp(round(w / s_w)), int32 bias = round(b / (s_x s_w)), computed here with torch."""
    inits = _inits(exported.path)
    model = onnx.load(str(exported.path))
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    producer = {o: n for n in model.graph.node for o in n.output}
    dq_w, dq_b, dq_x = producer[fc.input[1]], producer[fc.input[2]], producer[fc.input[0]]
    codes = numpy_helper.to_array(inits[dq_w.input[0]])
    assert inits[dq_w.input[0]].data_type == TensorProto.INT8
    w, s_w = qnet.fc.weight.detach(), qnet.fc.weight_quantizer.scale
    ref = torch.clamp(torch.round(w / s_w[:, None]), -128, 127).to(torch.int8).numpy()
    np.testing.assert_array_equal(codes, ref)
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq_w.input[1]]), s_w.numpy())
    s_x = float(numpy_helper.to_array(inits[dq_x.input[1]]))
    assert inits[dq_b.input[0]].data_type == TensorProto.INT32
    s_b = (np.float32(s_x) * s_w.numpy()).astype(np.float32)
    ref_b = np.round(qnet.fc.bias.detach().numpy().astype(np.float64) / s_b).astype(np.int32)
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq_b.input[0]]), ref_b)
    assert not numpy_helper.to_array(inits[dq_b.input[2]]).any()  # bias zero point 0
    # activations: uint8 (U8S8, the fast form on x86)
    assert inits[dq_x.input[2]].data_type == TensorProto.UINT8


def test_model_unchanged_by_export(small_net, calib, tmp_path):
    q = lowbit.quantize(small_net, lowbit.recipes.W8A8(), calib, progress=False)
    with torch.no_grad():
        before = q(calib[1]).clone()
    export_onnx(q, calib[0], tmp_path / "a.onnx", verify=False)
    assert all("forward" not in m.__dict__ and "quantized_weight" not in m.__dict__ for m in q.modules())
    with torch.no_grad():
        assert torch.equal(q(calib[1]), before)


def test_integer_runtime_agrees_with_ort(exported, calib):
    rt = pytest.importorskip("lowbit.runtime")
    ort_out = run_ort(exported.path, [calib[0]])[0]
    try:
        out = rt.IntegerRuntime(str(exported.path), requant="float").run({"input_0": calib[0].numpy()})
    except lowbit.QuantizationError as e:  # pragma: no cover - the runtime is another module's work
        pytest.skip(f"integer runtime cannot run this graph: {e}")
    got = next(iter(out.values()))
    np.testing.assert_allclose(got, ort_out, rtol=0, atol=1e-6)


def test_linear_on_3d_input_matmul(calib, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    data = [torch.randn(2, 20, 16) for _ in range(2)]
    q = lowbit.quantize(m, lowbit.recipes.W8A8(), data, progress=False)
    r = export_onnx(q, data[0], tmp_path / "mlp.onnx")
    assert r.parity.fraction_within >= 0.99
    assert r.kernels.n_int8 >= 1


@pytest.mark.parametrize("recipe", ["W8A16", "WeightOnly8"])
def test_weight_only_linear_on_3d_input_keeps_float_activations_in_matmulnbits(recipe, tmp_path):
    """ORT fuses a weight-only ``DQ -> MatMul`` (3-D input) into MatMulNBits, whose default accuracy level
    quantizes the activations to int8 inside (W8A16: 211 steps off). Our sessions set level 1
    (``ORT_SESSION_CONFIG``): the deployed model equals the simulation; a session without it does not."""
    import onnxruntime as ort

    from lowbit.export import ORT_SESSION_CONFIG

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    x = torch.randn(4, 10, 64)
    rec = lowbit.recipes.W8A16() if recipe == "W8A16" else lowbit.recipes.WeightOnly(bits=8)
    q = lowbit.quantize(m, rec, [x], progress=False)
    r = export_onnx(q, x, tmp_path / "m.onnx")
    assert r.kernels.int8.get("MatMulNBits") == 2
    assert r.parity.max_steps == 0.0
    with torch.no_grad():
        sim = q(x).numpy()
    np.testing.assert_allclose(run_ort(r.path, [x])[0], sim, rtol=1e-5, atol=1e-6)
    so = ort.SessionOptions()  # ORT's defaults: int8 activations inside MatMulNBits
    default = ort.InferenceSession(str(r.path), so, providers=["CPUExecutionProvider"])
    y = default.run(None, {default.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(y - sim).max() > 1e-3, "ORT's default no longer differs: ORT_SESSION_CONFIG may be unneeded"
    assert ORT_SESSION_CONFIG == {"session.qdq_matmulnbits_accuracy_level": "1"}


def test_int4_group_weights_opset21(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(8, 32)
    q = lowbit.quantize(m, lowbit.recipes.W4A16(group_size=16), None, progress=False)
    r = export_onnx(q, x, tmp_path / "w4.onnx")
    assert r.opset == 21
    inits = _inits(r.path)
    code_types = {t.data_type for n, t in inits.items() if n.endswith("_codes")}
    assert code_types == {TensorProto.UINT4}
    dq = [n for n in onnx.load(str(r.path)).graph.node if n.op_type == "DequantizeLinear"]
    assert all(any(a.name == "block_size" and a.i == 16 for a in n.attribute) for n in dq)
    with torch.no_grad():
        sim = q(x).numpy()
    np.testing.assert_allclose(run_ort(r.path, [x])[0], sim, rtol=1e-5, atol=1e-5)


def test_dynamic_recipe_exports_dynamic_quantize_linear(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(8, 32)
    q = lowbit.quantize(m, lowbit.recipes.W8A8Dynamic(), None, progress=False)
    r = export_onnx(q, x, tmp_path / "dyn.onnx")
    ops = [n.op_type for n in onnx.load(str(r.path)).graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2
    assert r.parity.fraction_within >= 0.99


def test_float_and_ort_dynamic_exports(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = m(x).numpy()
    pf = export_onnx_float(m, x, tmp_path / "f.onnx")
    np.testing.assert_allclose(run_ort(pf, [x])[0], ref, rtol=1e-4, atol=1e-5)
    pd = export_onnx_dynamic(m, x, tmp_path / "d.onnx")
    k = count_kernels(pd)
    assert k.n_int8 == 2 and k.n_float == 0
    err = np.abs(run_ort(pd, [x])[0] - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05  # quantized (not bit-identical to float), but close


# ------------------------------------------------------------------------------ bad input
def test_missing_parent_dir(qnet, calib, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(qnet, calib[0], tmp_path / "no" / "such" / "m.onnx")


def test_existing_file_refused_unless_overwrite(qnet, calib, tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"old")
    with pytest.raises(FileExistsRefusedError, match="overwrite=True"):
        export_onnx(qnet, calib[0], p, verify=False)
    assert p.read_bytes() == b"old"
    export_onnx(qnet, calib[0], p, overwrite=True, verify=False)
    assert onnx.load(str(p)).graph.node


def test_unexpressible_layer_named(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    q = lowbit.quantize(m, lowbit.recipes.BinaryWeights(), None, progress=False)
    with pytest.raises(ExportError, match=r"0\.weight.*binary"):
        export_onnx(q, torch.randn(2, 8), tmp_path / "b.onnx")


def test_per_token_dynamic_refused(tmp_path):
    m = nn.Sequential(nn.Linear(8, 4)).eval()
    q = lowbit.quantize(m, lowbit.recipes.W8A8Dynamic(granularity="token"), None, progress=False)
    with pytest.raises(ExportError, match="DynamicQuantizeLinear"):
        export_onnx(q, torch.randn(2, 8), tmp_path / "t.onnx")


def test_opset_too_low(tmp_path):
    m = nn.Sequential(nn.Linear(32, 4)).eval()
    q = lowbit.quantize(m, lowbit.recipes.W4A16(group_size=16), None, progress=False)
    with pytest.raises(ConfigError, match="opset >= 21"):
        export_onnx(q, torch.randn(2, 32), tmp_path / "o.onnx", opset=13)


def test_uncalibrated_quantizer(tmp_path):
    spec = lowbit.QuantSpec("int8", granularity="channel")
    layer = QuantLinear.from_float(nn.Linear(8, 4), spec, output_spec=lowbit.QuantSpec("uint8", symmetric=False))
    with pytest.raises(EmptyCalibrationError, match="output"):
        export_onnx(layer, torch.randn(2, 8), tmp_path / "u.onnx")


def test_profiled_session_records_the_int8_kernels(exported, calib, tmp_path):
    """``make_session(profile_prefix=...)``: ORT's trace lands beside the prefix and names every kernel of the
    optimized graph once per run (what bench_speed.py --profile sums)."""
    sess = make_session(exported.path, threads=1, profile_prefix=str(tmp_path / "trace"))
    for _ in range(3):
        run_ort(sess, [calib[0]])
    trace = Path(sess.end_profiling())
    assert trace.parent == tmp_path and trace.name.startswith("trace")
    kernels = [e["args"]["op_name"] for e in json.loads(trace.read_text())
               if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert kernels.count("QLinearConv") == 3 * 2 and kernels.count("QGemm") == 3
    assert not any(k in ("Conv", "Gemm", "MatMul") for k in kernels)


def test_corrupted_file_to_loader(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(ModelFileError, match="cannot load"):
        count_kernels(p)


def test_parity_error_beyond_tolerance(exported, calib):
    ort_out = run_ort(exported.path, [calib[0]])[0]
    scale = 0.5 * float(np.abs(ort_out).max())  # nonsense scale is not used: the graph's own scale is
    s_out = [t for t in onnx.load(str(exported.path)).graph.output]
    assert s_out
    rep = verify_parity([ort_out], [ort_out], exported.path)
    assert rep.max_steps == 0.0 and rep.fraction_within == 1.0
    model = onnx.load(str(exported.path))
    from lowbit.export.verify import output_scales

    s = output_scales(model)[0]
    assert s is not None and s < scale
    shifted = ort_out + 2.0 * s  # two steps everywhere
    with pytest.raises(ParityError, match="within one output quantization step"):
        verify_parity([shifted], [ort_out], model)
    one_step = ort_out.copy()
    one_step.flat[0] += 0.999 * s
    assert verify_parity([one_step], [ort_out], model).fraction_within == 1.0


@pytest.mark.parametrize("act", ["fp8_e4m3", "int4", "int16"])
def test_relu_and_relu6_before_a_wide_quantizer_stay_in_ort(act, tmp_path):
    """ReLU / ReLU6 before an fp8, int4 or int16 activation quantizer with zero point 0: ONNX Runtime drops a
    Relu before such a QuantizeLinear (as if 0 were the type's minimum) and cannot load a Clip before an
    fp8 / int4 one. ORT's output must equal the torch simulation (the same codes), negative values clamped."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU6(), nn.Linear(64, 16)).eval()
    data = [torch.randn(16, 32) * 3 for _ in range(2)]
    fmt = lowbit.QuantSpec(act, symmetric=True)
    q = lowbit.quantize(m, lowbit.recipes.Custom(weight=lowbit.QuantSpec("int8", granularity="channel"),
                                                 activation=fmt), data, progress=False)
    r = export_onnx(q, data[0], tmp_path / "w.onnx")
    assert r.parity.fraction_within == 1.0
    ops = [n.op_type for n in onnx.load(str(r.path)).graph.node]
    assert "Relu" not in ops and "Clip" not in ops and ops.count("Max") == 2 and ops.count("Min") == 1
    torch.manual_seed(1)
    x = torch.randn(8, 32) * 3
    with torch.no_grad():
        sim = q(x).numpy()
    np.testing.assert_allclose(run_ort(r.path, [x])[0], sim, rtol=0, atol=1e-6 * np.abs(sim).max())


def test_parity_refuses_a_different_number_of_outputs(exported, calib):
    """Outputs compared pairwise: a missing output is a mismatch, not a shorter comparison."""
    ort_out = run_ort(exported.path, [calib[0]])[0]
    with pytest.raises(ParityError, match="2 output.*ONNX Runtime 1"):
        verify_parity([ort_out, ort_out + 100.0], [ort_out], exported.path)
    with pytest.raises(ParityError, match="0 output"):
        verify_parity([], [], exported.path)


def test_bad_example_inputs_are_config_errors_and_mode_restored(qnet, calib, tmp_path):
    qnet.train()
    try:
        for x in (calib[0].double(), calib[0].half()):
            with pytest.raises(ConfigError, match=r"float32.*x\.float\(\)"):
                export_onnx(qnet, x, tmp_path / "d.onnx")
        with pytest.raises(ConfigError, match="cannot run on example_inputs"):
            export_onnx(qnet, torch.randn(2, 5, 16, 16), tmp_path / "c.onnx")  # 5 channels, the model takes 3
        assert qnet.training  # the caller's mode survives a failed export
        assert not (tmp_path / "c.onnx").exists() and not (tmp_path / "d.onnx").exists()
    finally:
        qnet.eval()


def _unpack_onnx_int4(t: onnx.TensorProto) -> np.ndarray:
    """ONNX INT4 initializer -> int8 values, unpacked here: two per byte, element 2k in the low nibble,
    element 2k + 1 in the high one, two's complement (8..15 are -8..-1); an odd count pads the last byte."""
    packed = np.frombuffer(t.raw_data, np.uint8) if t.raw_data else (np.asarray(t.int32_data) & 0xFF).astype(np.uint8)
    nib = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1).astype(np.int16)
    n = int(np.prod(t.dims))
    return np.where(nib >= 8, nib - 16, nib)[:n].astype(np.int8).reshape(tuple(t.dims))


def test_signed_int4_weights_packed_two_per_byte_with_sign(tmp_path):
    """Signed int4 per-channel weights with an odd element count: the file's packed nibbles, unpacked
    independently, equal clamp(round(w / s), -8, 7) computed with torch, and ORT equals the simulation."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 3)).eval()
    q = lowbit.quantize(m, lowbit.recipes.WeightOnly(bits=4, symmetric=True), None, progress=False)
    x = torch.randn(5, 7)
    r = export_onnx(q, x, tmp_path / "i4.onnx")
    assert r.opset == 21
    model = onnx.load(str(r.path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2
    for gemm, name in zip(gemms, ("0", "2")):
        dq = producer[gemm.input[1]]
        t = inits[dq.input[0]]
        assert t.data_type == TensorProto.INT4
        layer = q.get_submodule(name)
        w, s = layer.weight.detach(), layer.weight_quantizer.scale.detach()
        ref = torch.clamp(torch.round(w / s[:, None]), -8, 7).to(torch.int8).numpy()
        assert (ref < 0).any() and ref.size % 2 == 1
        np.testing.assert_array_equal(_unpack_onnx_int4(t), ref)
        np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[1]]), s.numpy())
    with torch.no_grad():
        sim = q(x).numpy()
    np.testing.assert_allclose(run_ort(r.path, [x])[0], sim, rtol=0, atol=1e-6 * np.abs(sim).max())


def test_a_file_failing_parity_is_named_and_left_for_inspection(qnet, calib, tmp_path, monkeypatch):
    """verify_export's ParityError reaches the caller with the written file's path in the message."""
    import lowbit.export.onnx_qdq as oq

    def disagree(*args, **kwargs):
        raise ParityError("ONNX Runtime disagrees with the simulated model: only 12.00% of 80 outputs ...")

    monkeypatch.setattr(oq, "verify_export", disagree)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match=rf"12\.00% .* left at {path} for inspection.*do not deploy") as info:
        export_onnx(qnet, calib[0], path)
    assert path.is_file() and isinstance(info.value.__cause__, ParityError)
    onnx.checker.check_model(str(path))


@pytest.mark.parametrize("kwargs", [{"min_fraction": 1.5}, {"min_fraction": -0.1}, {"min_cosine": 2.0}])
def test_impossible_parity_tolerances_are_refused(qnet, calib, tmp_path, kwargs):
    with pytest.raises(ConfigError, match="min_fraction must be in"):
        export_onnx(qnet, calib[0], tmp_path / "x.onnx", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_parity_report_prints_one_line(exported):
    from lowbit.export.verify import ParityReport

    rep = ParityReport(max_steps=1.0, fraction_within=0.998, top1_agreement=1.0, n=4000, min_cosine=0.99991)
    assert str(rep) == ("99.80% of 4000 outputs within one step (max 1.00 steps), top-1 agreement 1.0000, "
                        "lowest row cosine 0.99991")
    assert "\n" not in str(exported.parity) and "outputs within one step" in str(exported.parity)
