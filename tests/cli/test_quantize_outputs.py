"""``lowbit quantize``: what its files are named, which figures it compares and what it says about them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .conftest import TINY, call


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_w8a16_report_has_no_kl_range_and_says_so(capsys, tmp_path, tiny_data):
    """int16 activations have 32768 levels per sign, more than the report's 2048 histogram bins: KL is left
    out of the report with a note (the run used to fail with a KL ConfigError although the calibrator is
    minmax), and the ONNX file is not called int8 (int16 activations)."""
    out = tmp_path / "o"
    rc, stdout, err = call(capsys, "quantize", TINY, "--recipe", "w8a16", "--calib", str(tiny_data["npy"]),
                           "--num-batches", "2", "--batch-size", "4", "--out", str(out))
    assert rc == 0, err
    assert {p.name for p in out.iterdir()} == {"model_quantized.onnx", "model.safetensors", "quant_spec.json",
                                               "report.html", "summary.json"}
    s = _summary(out)
    assert s["files"]["onnx"] == str(out / "model_quantized.onnx") and s["calibrator"] == "minmax"
    html = (out / "report.html").read_text()
    assert "KL: n/a for int16" in html and "32768" in html
    spec = json.loads((out / "quant_spec.json").read_text())
    assert {t["format"] for t in spec["tensors"] if t["role"] != "weight"} == {"int16"}


def test_nothing_is_written_when_the_report_analysis_fails(capsys, tmp_path, tiny_data, monkeypatch):
    """The report's statistics are gathered before any file is written: a failure there leaves the output
    folder empty (it used to hold the ONNX file, the checkpoint and quant_spec.json)."""
    import lowbit.report.build as build
    from lowbit.errors import ConfigError

    def fail(*args, **kwargs):
        raise ConfigError("report analysis failed on purpose")

    monkeypatch.setattr(build, "build_report_data", fail)
    out = tmp_path / "o"
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--num-batches", "1",
                      "--out", str(out))
    assert rc == 1 and "failed on purpose" in err
    assert out.is_dir() and not list(out.iterdir())


@pytest.mark.parametrize("recipe,name", [("fp8", "model_quantized.onnx"), ("w8a8-dynamic", "model_int8.onnx")])
def test_onnx_file_is_named_by_its_activation_format(capsys, tmp_path, tiny_data, recipe, name):
    """model_int8.onnx only when every quantized activation is an 8-bit integer (fp8 used to be called int8)."""
    out = tmp_path / "o"
    rc, stdout, err = call(capsys, "quantize", TINY, "--recipe", recipe, "--calib", str(tiny_data["npy"]),
                           "--num-batches", "1", "--batch-size", "4", "--out", str(out))
    assert rc == 0, err
    assert [p.name for p in out.glob("*.onnx")] == [name]
    assert _summary(out)["files"]["onnx"] == str(out / name) and f"onnx       {out / name}" in stdout


def test_latency_compares_onnx_runtime_with_onnx_runtime(capsys, tmp_path, tiny_data, monkeypatch):
    """Float and quantized latency both come from ONNX Runtime (float: a temporary fp32 export); the PyTorch
    eager time is only a labelled extra. The basis is printed and in summary.json, as is the data the
    metrics were measured on (the calibration data: quantize takes no other)."""
    import lowbit.workflows as wf

    timed = []

    def fake_ort(path, x, iters):
        timed.append(path.name)
        return 4.0 if path.name == "model_fp32.onnx" else 1.0

    monkeypatch.setattr(wf, "_ort_latency", fake_ort)
    monkeypatch.setattr(wf, "_torch_latency", lambda model, x, iters: 9.0)
    out = tmp_path / "o"
    rc, stdout, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--num-batches", "2",
                           "--batch-size", "4", "--out", str(out))
    assert rc == 0, err
    assert sorted(timed) == ["model_fp32.onnx", "model_int8.onnx"]
    assert not (out / "model_fp32.onnx").exists()  # temporary: `lowbit eval --quantized` takes the folder's ONNX
    s = _summary(out)
    lat = {r["variant"]: r["latency_ms"] for r in s["results"]}
    assert lat == {"float": 4.0, "W8A8": 1.0}
    basis = s["latency_basis"]
    assert "batch 1" in basis and "float fp32 in ONNX Runtime, W8A8 in ONNX Runtime" in basis
    assert "ORT W8A8 over ORT fp32: 4.00x" in basis and "PyTorch eager fp32 9.00 ms (not compared)" in basis
    assert s["metrics_basis"].startswith("metrics: measured on the calibration data") and "8 samples" in s["metrics_basis"]
    assert basis in stdout and s["metrics_basis"] in stdout
    html = (out / "report.html").read_text()
    assert "4.00×" in html and "ORT W8A8 over ORT fp32: 4.00x" in html


def test_fixed_batch_pt2_is_timed_and_exported_at_its_batch(capsys, tmp_path, tiny_data):
    """A .pt2 exported for batch 4 without dynamic_shapes: latency, ONNX export and the checkpoint's example use
    batch 4 (it used to crash with a traceback timing batch 1), a short last batch is left out and said so."""
    import onnxruntime as ort

    from .tiny_models import tiny_net

    model = tiny_net()
    path = tmp_path / "tiny_b4.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(4, 3, 8, 8),)), str(path))
    x = np.load(tiny_data["npy"])[:10]  # 4 + 4 + 2: the last batch does not fit the program
    np.save(tmp_path / "x10.npy", x)
    out = tmp_path / "o"
    rc, stdout, err = call(capsys, "quantize", str(path), "--calib", str(tmp_path / "x10.npy"), "--batch-size", "4",
                           "--out", str(out))
    assert rc == 0, err
    s = _summary(out)
    assert s["notes"][0].startswith("calibration: 8 samples from") and "(2 batch(es) of 4)" in s["notes"][0]
    assert any("takes batches of exactly 4 samples" in n and "last 2 sample(s) were left out" in n for n in s["notes"])
    assert s["latency_basis"].startswith("latency: batch 4 (the batch size the model was exported with)")
    assert s["latency_basis"] in stdout and s["warnings"] == []
    assert all(r["latency_ms"] > 0 for r in s["results"])
    sess = ort.InferenceSession(s["files"]["onnx"], providers=["CPUExecutionProvider"])
    q = sess.run(None, {sess.get_inputs()[0].name: x[:4]})[0]
    with torch.no_grad():
        f = model(torch.from_numpy(x[:4])).numpy()
    assert q.shape == (4, 4) and np.corrcoef(q.ravel(), f.ravel())[0, 1] > 0.99
    meta = json.loads((out / "quant_spec.json").read_text())
    assert meta["input_shape"] == [3, 8, 8]
    # a batch size the program does not take is still one line saying what to do
    rc, _, err = call(capsys, "quantize", str(path), "--calib", str(tmp_path / "x10.npy"), "--batch-size", "3",
                      "--out", str(tmp_path / "p"), "--no-export")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and "pass --batch-size" in lines[0], err


@pytest.mark.parametrize("extra,where", [([], "even with W8A8 on every layer"),
                                         (["--size-budget", "100kB"], "within --size-budget 100kB")])
def test_min_sqnr_not_met_is_a_printed_warning(capsys, tmp_path, tiny_data, extra, where):
    """An SQNR floor no mix reaches: the model is still written (exit 0), and the miss is a one-line warning
    on stderr and in summary.json's warnings (it used to be only a note)."""
    out = tmp_path / "o"
    rc, _, err = call(capsys, "quantize", TINY, "--recipe", "w8a8", "--mixed", "w4", "--min-sqnr", "200",
                      "--calib", str(tiny_data["npy"]), "--num-batches", "1", "--out", str(out), "--no-export", *extra)
    assert rc == 0, err
    s = _summary(out)
    assert len(s["warnings"]) == 1 and s["warnings"][0].startswith("BUDGET NOT MET: output SQNR")
    assert "below --min-sqnr 200" in s["warnings"][0] and where in s["warnings"][0]
    lines = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert lines == [f"warning: {s['warnings'][0]}"]
    assert "budget met: False" in (out / "mixed_precision.txt").read_text()
    assert [r["variant"] for r in s["results"]][-1].startswith("W8A8+W4 mixed")  # not plain "W8A8"


def test_eval_times_float_and_quantized_both_in_onnx_runtime(capsys, tmp_path, tiny_data, monkeypatch):
    """`lowbit eval --quantized DIR`: the float row's latency is ONNX Runtime fp32 (a temporary export), as the
    quantized file's is (it set PyTorch eager against ORT int8); the notes say so and how size was counted."""
    import lowbit.workflows as wf

    out = tmp_path / "o"
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--num-batches", "1",
                      "--batch-size", "4", "--out", str(out))
    assert rc == 0, err
    timed = []

    def fake_ort(path, x, iters):
        timed.append((path.name, len(x)))
        return 6.0 if path.name == "model_fp32.onnx" else 2.0

    monkeypatch.setattr(wf, "_ort_latency", fake_ort)
    monkeypatch.setattr(wf, "_torch_latency", lambda *a, **k: pytest.fail("eval must not time PyTorch eager"))
    s = wf.run_eval(TINY, data=str(tiny_data["npz"]), quantized=out, progress=False)
    assert sorted(timed) == [("model_fp32.onnx", 1), ("model_int8.onnx", 1)]
    assert [r.latency_ms for r in s.results if r.metric != "cosine"][:1] == [6.0]
    assert {r.latency_ms for r in s.results if r.variant.startswith("o (")} == {2.0}
    text = s.table()
    assert "float fp32 and the quantized file both in ONNX Runtime" in text and "bytes of model_int8.onnx" in text


def test_eval_of_a_fixed_batch_pt2(capsys, tmp_path, tiny_data):
    """A .pt2 exported for batch 4 is evaluated and timed at batch 4 (it crashed timing batch 1)."""
    from .tiny_models import tiny_net

    path = tmp_path / "tiny_b4.pt2"
    torch.export.save(torch.export.export(tiny_net(), (torch.randn(4, 3, 8, 8),)), str(path))
    np.save(tmp_path / "x10.npy", np.load(tiny_data["npy"])[:10])
    rc, stdout, err = call(capsys, "eval", str(path), "--data", str(tmp_path / "x10.npy"), "--batch-size", "4")
    assert rc == 0, err
    assert "on 8 samples" in stdout and "latency: batch 4" in stdout and "last 2 sample(s) were left out" in stdout
