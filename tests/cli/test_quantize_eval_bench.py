"""``lowbit quantize`` / ``eval`` / ``bench`` on a tiny model and .npy/.npz data, and their error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .conftest import TINY, call, run_cli


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("q") / "out"
    r = run_cli("quantize", TINY, "--recipe", "w8a8", "--calibrator", "kl", "--calib", str(tiny_data["npz"]),
                "--num-batches", "2", "--batch-size", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_quantize_writes_the_four_outputs(quantized_dir):
    out, stdout = quantized_dir
    assert {p.name for p in out.iterdir()} == {"model_int8.onnx", "model.safetensors", "quant_spec.json",
                                               "report.html", "summary.json"}
    assert "W8A8" in stdout and "wrote:" in stdout


def test_report_names_the_layers(quantized_dir):
    html = (quantized_dir[0] / "report.html").read_text()
    for layer in ("conv1", "dw", "fc"):
        assert layer in html
    assert "<img" in html and "data:image/png;base64," in html


def test_summary_and_spec_contents(quantized_dir, tiny_data):
    out = quantized_dir[0]
    s = json.loads((out / "summary.json").read_text())
    assert s["recipe"] == "w8a8" and s["calibrator"] == "kl" and s["quantized_layers"] >= 3
    rows = {(r["variant"], r["metric"]): r for r in s["results"]}
    assert rows[("float", "cosine")]["value"] == 1.0
    assert 0.9 < rows[("W8A8", "cosine")]["value"] <= 1.0 + 1e-9
    # the float row's top-1 is recomputed here from the data's labels
    from .tiny_models import tiny_net

    z = np.load(tiny_data["npz"])
    x = torch.from_numpy(z["x"][:8])
    with torch.no_grad():
        top1 = float((tiny_net()(x).argmax(1) == torch.from_numpy(z["y"][:8])).float().mean())
    assert rows[("float", "top1")]["value"] == pytest.approx(top1)
    spec = json.loads((out / "quant_spec.json").read_text())
    weights = {t["tensor"]: t for t in spec["tensors"] if t["role"] == "weight"}
    assert weights["conv1.weight"]["format"] == "int8" and weights["conv1.weight"]["scale_shape"] == [8]
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert any(k.endswith("weight_quantizer.scale") for k in state)
    # the checkpoint is lowbit.save's format: it loads back onto a fresh float model, outputs unchanged
    import lowbit

    rebuilt = lowbit.load(out / "model.safetensors", tiny_net())
    loaded = rebuilt.state_dict()
    scales = [k for k in state if k.endswith("quantizer.scale")]
    assert scales and all(torch.equal(loaded[k], state[k]) for k in scales)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(rebuilt(x).flatten(), tiny_net()(x).flatten(), dim=0) > 0.99


def test_quantize_refuses_non_empty_out_dir(capsys, quantized_dir, tiny_data):
    out = quantized_dir[0]
    before = sorted(p.name for p in out.iterdir())
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--out", str(out))
    assert rc == 1 and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_quantize_overwrite_weight_only_without_export(capsys, tmp_path, tiny_data):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    rc, stdout, err = call(capsys, "quantize", TINY, "--recipe", "w4", "--calib", str(tiny_data["npy"]),
                           "--num-batches", "1", "--out", str(out), "--overwrite", "--no-export")
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "report.html").is_file()
    assert "W4" in stdout
    assert not list(out.glob("*.onnx")) and "onnx" not in json.loads((out / "summary.json").read_text())["files"]


def test_quantize_overwrite_reads_inputs_before_clearing_the_folder(capsys, tmp_path, tiny_data):
    """--overwrite of a folder that holds the calibration file: the data is read before the folder is cleared."""
    out = tmp_path / "o"
    out.mkdir()
    calib = out / "calib.npy"
    calib.write_bytes(tiny_data["npy"].read_bytes())
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(calib), "--num-batches", "1", "--out", str(out),
                      "--overwrite", "--no-export")
    assert rc == 0, err
    assert not calib.exists() and json.loads((out / "summary.json").read_text())["notes"][0].startswith(
        f"calibration: 8 samples from {calib}")


def _bad_data(d):
    """DATA files that must each stop `quantize` with one line on stderr (name -> path, expected words)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    np.save(d / "nan.npy", nan)
    np.savez(d / "labels.npz", x=x, y=np.arange(12) + 2)
    np.save(d / "channels.npy", x[:, :2])
    for name in ("a", "b"):
        (d / "imgs" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "imgs" / name / "ok.png")
    (d / "imgs" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return {"corrupt.npz": "BadZipFile", "nan.npy": "1 NaN and 0 Inf", "labels.npz": "run from 2 to 13",
            "channels.npy": "fails on the first batch", "imgs": "cannot identify image file"}


@pytest.mark.parametrize("name", ["corrupt.npz", "nan.npy", "labels.npz", "channels.npy", "imgs"])
def test_quantize_bad_data_is_one_line_error(capsys, tmp_path, name):
    """A weight-only recipe does not calibrate, so the NaN must be caught before; labels out of range would
    otherwise give top-1 0; a wrong shape or an undecodable image would otherwise be a traceback."""
    needle = _bad_data(tmp_path)[name]
    rc, out, err = call(capsys, "quantize", TINY, "--recipe", "w4", "--calib", str(tmp_path / name), "--out",
                        str(tmp_path / "o"), "--no-export")
    lines = [ln for ln in err.splitlines() if "lowbit quantize: error:" in ln]
    assert rc == 1 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o").exists()  # nothing written: the folder is made once the inputs are read


def test_quantize_out_below_a_file(capsys, tmp_path, tiny_data):
    (tmp_path / "f").write_text("x")
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--out", str(tmp_path / "f" / "o"))
    assert rc == 1 and "is a file" in err and (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("args,code,needle", [
    (["--recipe", "w3a3"], 2, "invalid choice"),
    (["--calibrator", "magic"], 1, "unknown calibrator"),
    (["--calib", "missing.npy"], 1, "does not exist"),
    (["--num-batches", "0"], 2, "positive integer"),
    ([], 1, "has no built-in data"),
])
def test_quantize_argument_errors(capsys, tmp_path, args, code, needle):
    rc, _, err = call(capsys, "quantize", TINY, "--out", str(tmp_path / "o"), *args)
    assert rc == code, err
    assert needle in err


def test_quantize_model_that_fails_to_load(capsys, tmp_path, tiny_data):
    rc, _, err = call(capsys, "quantize", "tests.cli.tiny_models:broken", "--calib", str(tiny_data["npy"]),
                      "--out", str(tmp_path / "o"))
    assert rc == 1 and "broken on purpose" in err


def test_eval_quantized_dir_matches_onnx_runtime(capsys, quantized_dir, tiny_data):
    """The agreement `eval` prints equals the one computed here from ORT and the float model."""
    import onnxruntime as ort

    from .tiny_models import tiny_net

    out = quantized_dir[0]
    rc, stdout, err = call(capsys, "eval", TINY, "--quantized", str(out), "--data", str(tiny_data["npz"]))
    assert rc == 0, err
    x = np.load(tiny_data["npz"])["x"]
    sess = ort.InferenceSession(str(out / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    q = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        f = tiny_net()(torch.from_numpy(x)).numpy()
    agreement = float((q.argmax(1) == f.argmax(1)).mean())
    line = next(ln for ln in stdout.splitlines() if ln.startswith("out (ONNX Runtime)"))
    assert f"{agreement:.4f}" in line.split()
    assert "12 samples" in stdout


def test_eval_in_memory_and_errors(capsys, tmp_path, tiny_data):
    rc, stdout, err = call(capsys, "eval", TINY, "--data", str(tiny_data["npy"]), "--recipe", "w8a8")
    assert rc == 0, err
    assert "W8A8 (simulated)" in stdout and "top1" not in stdout  # no labels in a .npy
    rc, _, err = call(capsys, "eval", TINY, "--data", str(tiny_data["npy"]), "--quantized", str(tmp_path))
    assert rc == 1 and "no .onnx file" in err
    rc, stdout, err = call(capsys, "eval", TINY, "--data", str(tiny_data["npy"]), "--num-batches", "2",
                           "--batch-size", "5")
    assert rc == 0 and "on 10 samples" in stdout, err


def test_bench_rows(capsys):
    rc, stdout, err = call(capsys, "bench", TINY, "--batch-sizes", "1,2", "--iters", "1")
    assert rc == 0, err
    rows = [ln.split() for ln in stdout.splitlines() if ln.startswith(("PyTorch", "ORT"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("PyTorch", "fp32", "1"), ("ORT", "fp32", "1"), ("ORT", "int8", "1"),
        ("PyTorch", "fp32", "2"), ("ORT", "fp32", "2"), ("ORT", "int8", "2")]
    assert all(float(r[3]) > 0 for r in rows)


def test_bench_bad_batch_sizes(capsys):
    rc, _, err = call(capsys, "bench", TINY, "--batch-sizes", "0,1")
    assert rc == 2 and "positive integers" in err
    rc, _, err = call(capsys, "bench", TINY, "--batch-sizes", "1,x")
    assert rc == 2 and "comma-separated integers" in err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "demo"), "--images", "40", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "W8A8" in r.stdout and "W4 g32 weight-only" in r.stdout
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    top1 = {r["variant"]: r["value"] for r in s["results"] if r["metric"] == "top1"}
    assert top1["float"] > 0.7 and top1["W8A8"] > top1["float"] - 0.1
    r2 = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert r2.returncode == 1 and "--overwrite" in r2.stderr


@pytest.mark.parametrize("flag", ["--dfq", "--adaround"])
def test_quantize_with_passes(capsys, tmp_path, tiny_data, flag):
    out = tmp_path / "o"
    rc, stdout, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--num-batches", "1",
                           "--batch-size", "4", "--out", str(out), flag, "--no-export",
                           *(["--adaround-iters", "5"] if flag == "--adaround" else []))
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["passes"] == [flag[2:]]
    # a CLE record is one pair of layers; a per-layer AdaRound record is one layer
    note = "cle x1 (2 layers)" if flag == "--dfq" else "adaround x3 (3 layers)"
    assert any(n.startswith("passes: ") and note in n for n in s["notes"]), s["notes"]
    cos = next(r["value"] for r in s["results"] if r["variant"] == "W8A8" and r["metric"] == "cosine")
    assert cos > 0.9


def test_quantize_mixed_precision_meets_the_size_budget(capsys, tmp_path, tiny_data):
    """fp16 everywhere vs W8A8 everywhere bracket the budget; the search must land in between, within it."""
    sizes = {}
    for recipe in ("fp16", "w8a8"):
        out = tmp_path / recipe
        rc, _, err = call(capsys, "quantize", TINY, "--recipe", recipe, "--calib", str(tiny_data["npy"]),
                          "--num-batches", "1", "--out", str(out), "--no-export")
        assert rc == 0, err
        s = json.loads((out / "summary.json").read_text())
        sizes[recipe] = next(r["size_bytes"] for r in s["results"] if r["variant"] != "float")
    budget = (sizes["fp16"] + sizes["w8a8"]) // 2
    out = tmp_path / "mixed"
    rc, _, err = call(capsys, "quantize", TINY, "--recipe", "fp16", "--mixed", "w8a8", "--size-budget", str(budget),
                      "--calib", str(tiny_data["npy"]), "--num-batches", "1", "--out", str(out), "--no-export")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    size = next(r["size_bytes"] for r in s["results"] if r["variant"] != "float")
    assert sizes["w8a8"] <= size <= budget < sizes["fp16"]
    note = next(n for n in s["notes"] if n.startswith("mixed precision: "))
    assert "BUDGET NOT MET" not in note and "W8A8 x" in note
    assert "budget met: True" in (out / "mixed_precision.txt").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--size-budget", "1MB"], "add --mixed"),
    (["--mixed", "w8a8"], "add --size-budget SIZE and/or --min-sqnr"),
    (["--mixed", "w3a3", "--size-budget", "1MB"], "expected recipe names"),
    (["--mixed", "w8a8", "--size-budget", "12 parsecs"], "cannot read size"),
    (["--mixed", "w8a8", "--size-budget", "10"], "smallest model"),
])
def test_quantize_mixed_precision_errors(capsys, tmp_path, tiny_data, args, needle):
    rc, _, err = call(capsys, "quantize", TINY, "--recipe", "fp16", "--calib", str(tiny_data["npy"]),
                      "--num-batches", "1", "--out", str(tmp_path / "o"), "--no-export", *args)
    assert rc != 0 and needle in err, err


def test_quantize_adaround_block_granularity(capsys, tmp_path, tiny_data):
    out = tmp_path / "o"
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--num-batches", "1",
                      "--batch-size", "4", "--out", str(out), "--adaround", "--adaround-iters", "5",
                      "--adaround-granularity", "block", "--no-export")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    # tiny_net has no Sequential blocks: block mode says so (a skipped record) and rounds the 3 layers alone
    assert any(n.startswith("passes: ") and "adaround x3 (3 layers)" in n and "1 skipped" in n
               for n in s["notes"]), s["notes"]
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--out", str(tmp_path / "p"),
                      "--adaround", "--adaround-granularity", "row")
    assert rc != 0 and "granularity" in err


def test_quantize_w4a8_with_adaround_exports_and_matches_ort(capsys, tmp_path, tiny_data):
    """--recipe w4a8 --adaround: the AdaRound path of the issue from the CLI; the export holds 4-bit weights
    and uint8 activations and ONNX Runtime agrees with the simulation (the parity note is from the export's
    own check)."""
    import onnx

    out = tmp_path / "o"
    rc, stdout, err = call(capsys, "quantize", TINY, "--recipe", "w4a8", "--calib", str(tiny_data["npy"]),
                           "--num-batches", "1", "--batch-size", "4", "--out", str(out), "--adaround",
                           "--adaround-iters", "10")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert "W4A8" in stdout and any(n.startswith("passes: ") and "adaround" in n for n in s["notes"]), s["notes"]
    parity = next(n for n in s["notes"] if n.startswith("ONNX Runtime vs simulation"))
    assert "1.0000 of outputs within one step" in parity, parity
    g = onnx.load(s["files"]["onnx"]).graph
    inits = {i.name: i for i in g.initializer}
    zp_types = {inits[n.input[2]].data_type for n in g.node if n.op_type == "DequantizeLinear" and len(n.input) > 2
                and n.input[2] in inits}
    assert onnx.TensorProto.UINT4 in zp_types and onnx.TensorProto.UINT8 in zp_types, zp_types


def test_quantize_w4a8_without_adaround_warns(capsys, tmp_path, tiny_data):
    out = tmp_path / "o"
    rc, _, err = call(capsys, "quantize", TINY, "--recipe", "w4a8", "--calib", str(tiny_data["npy"]),
                      "--num-batches", "1", "--out", str(out), "--no-export")
    assert rc == 0 and "w4a8 without --adaround" in err, err
    assert any("add --adaround" in w for w in json.loads((out / "summary.json").read_text())["warnings"])


def test_quantize_adaround_qdrop(capsys, tmp_path, tiny_data):
    """--adaround-qdrop reaches AdaRoundConfig.qdrop_prob (the note is made from the config that ran, and the
    learned rounding differs from the run without QDrop); a value outside [0, 1] is refused."""
    weights = {}
    for p in ("0", "0.5"):
        out = tmp_path / f"o{p}"
        rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--num-batches", "1",
                          "--batch-size", "4", "--out", str(out), "--adaround", "--adaround-iters", "20",
                          "--adaround-qdrop", p, "--no-export")
        assert rc == 0, err
        notes = json.loads((out / "summary.json").read_text())["notes"]
        assert f"adaround: 20 iterations per layer, batch 4, QDrop {float(p):g}" in notes, notes
        weights[p] = load_file(out / "model.safetensors")
    assert any(not torch.equal(weights["0"][k], weights["0.5"][k]) for k in weights["0"]), "QDrop changed nothing"
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--out", str(tmp_path / "p"),
                      "--adaround", "--adaround-qdrop", "1.5")
    assert rc != 0 and "probability in [0, 1]" in err


@pytest.mark.parametrize("mode,note,label", [
    ("bn", "from the BatchNorm statistics, input range (-3.0, 3.0)", "data-free (bn ranges)"),
    ("distilled", "inputs distilled from the BatchNorm statistics (3 steps", "data-free (distilled inputs, kl)")])
def test_quantize_data_free(capsys, tmp_path, tiny_data, mode, note, label):
    """--data-free quantizes without touching --calib: the data only feeds the comparison (the same ranges
    whatever data is passed), and the summary says so; the calibrator shown is what set the ranges (it
    said "(minmax)" for BatchNorm ranges, and the --calibrator for distilled inputs)."""
    summaries = []
    for data in ("npy", "npz"):
        out = tmp_path / f"{mode}-{data}"
        rc, stdout, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data[data]), "--num-batches", "1",
                               "--batch-size", "4", "--out", str(out), "--data-free", mode, "--input-range=-3,3",
                               "--calibrator", "kl", "--no-export",
                               *(["--distill-iters", "3"] if mode == "distilled" else []))
        assert rc == 0, err
        summaries.append(json.loads((out / "summary.json").read_text()))
        spec = json.loads((out / "quant_spec.json").read_text())
        assert spec["data_free"] == mode and spec["calibrator"] == label
        assert stdout.splitlines()[0] == f"{TINY} - w8a8 {label}" and "(minmax)" not in stdout
        assert "metrics: measured on the --calib data (not used to quantize: data-free)" in stdout
    s = summaries[0]
    assert s["calibrator"] == label
    assert s["passes"] == ["dfq"]
    assert s["notes"][0].startswith("comparison only (quantized data-free): "), s["notes"]
    assert any(note in n for n in s["notes"]), s["notes"]
    from safetensors.numpy import load_file

    a, b = (load_file(str(tmp_path / f"{mode}-{d}" / "model.safetensors")) for d in ("npy", "npz"))
    act_scales = [k for k in a if k.endswith(".scale") and "weight" not in k]  # x_quant, output_quantizer ...
    assert len(act_scales) >= 4 and all(np.isfinite(a[k]).all() and (a[k] > 0).all() for k in act_scales)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # different data, identical model


@pytest.mark.parametrize("args,needle", [
    (["--data-free", "bn"], "--input-range"),
    (["--data-free", "bn", "--input-range", "1,-1"], "LO < HI"),
    (["--data-free", "bn", "--input-range=-1,1", "--adaround"], "cannot be combined"),
    # options that would be ignored without the one they belong to
    (["--adaround-qdrop", "0.5"], "--adaround-qdrop only applies with --adaround"),
    (["--adaround-iters", "200"], "--adaround-iters only applies with --adaround"),
    (["--adaround-granularity", "block"], "--adaround-granularity only applies with --adaround"),
    (["--input-range=-1,1"], "--input-range only applies with --data-free"),
    (["--data-free", "bn", "--input-range=-1,1", "--distill-iters", "5"],
     "--distill-iters only applies with --data-free distilled"),
    (["--dfq", "--distill-label-weight", "50"], "--distill-label-weight only applies with --data-free distilled"),
])
def test_quantize_option_errors(capsys, tmp_path, tiny_data, args, needle):
    """Bad values (exit 2) and combinations (exit 1) fail before the output folder is made, saying what to add
    or leave out."""
    rc, _, err = call(capsys, "quantize", TINY, "--calib", str(tiny_data["npy"]), "--out", str(tmp_path / "o"),
                      "--no-export", *args)
    assert rc == (2 if "LO < HI" in needle else 1) and needle in err, err
    assert not (tmp_path / "o").exists()
