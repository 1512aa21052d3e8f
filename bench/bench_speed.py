"""Deployment speed, side by side in one run: PyTorch fp32 eager, ORT fp32, lowbit int8 ONNX in ORT,
ORT's own quantize_static (QDQ, per-channel) and torch.ao FX x86 int8, for ResNet-18, MobileNetV2
(torchvision, random weights: speed only), EfficientNet-Lite0 and MiniLM (when installed; seq 128,
input_ids + attention_mask, dynamic int8: lowbit W8A8Dynamic export vs ORT quantize_dynamic vs torch.ao
dynamic Linear), at batch 1 and 32, 2 threads, median of repeats (a third as many at batch 32); the ORT
peers of one model are interleaved in rounds so that they share the same machine load (PyTorch eager and
torch.ao run before them, alone: interleaved with the ORT sessions, eager times exploded in a trial run),
with ORT's thread spinning off (a peer's spinning threads would steal the next peer's cores). Then each
ORT peer is timed again alone, with ORT's default session options (spinning on, as a deployed model
runs), in alternating rounds of fresh sessions: the last two columns.
Also the int8/fp32 GEMM throughput ratio of ORT's kernels on this CPU, and per model how many
convs/matmuls ran as int8 kernels in ORT's optimized graph. "lowbit int8 (ORT)" is the default export
(``target="ort-cpu"``: the exact ORT CPU rewrites of ``lowbit.export._ort_cpu``); "lowbit int8 QDQ (ORT)"
is the same model exported with ``target="qdq"`` (plain QDQ), to show what those rewrites buy. The load
average is printed with every model: figures from a shared machine are inflated and noisy.

    python bench/bench_speed.py            # everything
    python bench/bench_speed.py --quick    # ResNet-18 + MobileNetV2, batch 1, fewer repeats (no MiniLM)
    python bench/bench_speed.py --models MiniLM --profile   # + where the time goes: ORT's per-node kernel
                                           # times by op type, ORT fp32 vs lowbit int8, each session alone
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import lowbit
from lowbit import zoo
from lowbit.export import count_kernels, export_onnx, export_onnx_float, run_ort
from lowbit.export.verify import make_session

THREADS = 2


def timings_ms(fn, repeats: int, warmup: int = 3) -> list[float]:
    """``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t))
    return ts


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    return statistics.median(timings_ms(fn, repeats, warmup))


def side_by_side(runners: dict, repeats: int, rounds: int = 5, warmup: int = 3) -> dict[str, list[float]]:
    """Timings (ms) of each runner, measured interleaved: ``rounds`` rounds, each running every runner for a
    block of ``repeats // rounds`` timed calls (after one untimed call), so that every peer sees the same
    share of a fluctuating machine load; the ratios between peers are then comparable."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    per_block = max(1, repeats // rounds)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            fn()
            for _ in range(per_block):
                t = time.perf_counter()
                fn()
                times[k].append(1000 * (time.perf_counter() - t))
    return times


def alone_with_defaults(peers: dict[str, tuple], repeats: int, rounds: int = 3, warmup: int = 5) -> dict[str, list[float]]:
    """Timings (ms) of each ORT peer (``name -> (path, *inputs)``) with ORT's default session options
    (intra-op threads spin after each run), each timed alone: ``rounds`` rounds, in each one fresh session
    per peer runs ``warmup`` untimed and ``repeats // rounds`` timed calls and is then closed, so that no
    other session's threads spin on the cores meanwhile. This is how a deployed model runs; the
    interleaved :func:`side_by_side` needs spinning off and charges every run a thread wake-up."""
    per_block = max(1, repeats // rounds)
    times: dict[str, list[float]] = {k: [] for k in peers}
    for _ in range(rounds):
        for k, (path, *xs) in peers.items():
            run = ort_runner(path, *xs, spinning=True)
            times[k] += timings_ms(run, per_block, warmup)
            del run  # closes the session
            gc.collect()
            time.sleep(0.2)  # let the closed session's threads wind down
    return times


def ort_times(peers: dict[str, tuple], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Both timings of the ORT peers: interleaved with spinning off, then alone with ORT's defaults."""
    runners = {k: ort_runner(path, *xs) for k, (path, *xs) in peers.items()}
    inter = side_by_side(runners, repeats)
    del runners
    gc.collect()
    return inter, alone_with_defaults(peers, repeats)


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def ort_runner(path, *xs: np.ndarray, spinning: bool = False):
    sess = make_session(path, threads=THREADS, spinning=spinning)
    feeds = {meta.name: x for meta, x in zip(sess.get_inputs(), xs)}
    return lambda: sess.run(None, feeds)


def op_profile(path, *xs: np.ndarray, runs: int, warmup: int = 5) -> dict[str, float]:
    """ORT's own per-node kernel times of ``runs`` runs after ``warmup`` untimed ones (one session alone,
    ORT's default options, ``THREADS`` threads), summed by op type: ms per run, largest first. The sum is the
    time inside the kernels, without the session's own work between them."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = make_session(path, threads=THREADS, profile_prefix=os.path.join(tmp, "profile"))
        for _ in range(warmup + runs):
            run_ort(sess, xs)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    if len(starts) != warmup + runs:
        raise RuntimeError(f"ORT's profile holds {len(starts)} runs, expected {warmup + runs}")
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[warmup]:
            by_op[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def profile_rows(name: str, b: int, fp32_path, int8_path, *xs: np.ndarray, runs: int, top: int = 10) -> list[str]:
    """Markdown rows: kernel ms per run by op type, ORT fp32 vs lowbit int8, the ``top`` largest of either
    and the rest summed."""
    f, i = op_profile(fp32_path, *xs, runs=runs), op_profile(int8_path, *xs, runs=runs)
    ops = sorted(set(f) | set(i), key=lambda k: -max(f.get(k, 0.0), i.get(k, 0.0)))
    rows = [f"| {name} | {b} | {k} | {f.get(k, 0.0):.2f} | {i.get(k, 0.0):.2f} |" for k in ops[:top]]
    rest = ops[top:]
    rows.append(f"| {name} | {b} | ({len(rest)} other op types) | {sum(f.get(k, 0.0) for k in rest):.2f} | "
                f"{sum(i.get(k, 0.0) for k in rest):.2f} |")
    rows.append(f"| {name} | {b} | **all kernels** | {sum(f.values()):.2f} | {sum(i.values()):.2f} |")
    return rows


def gemm_ratio(m=256, k=1024, n=1024, repeats=20) -> tuple[float, float]:
    """ORT MatMul fp32 vs MatMulInteger u8s8 time on one (m, k) x (k, n) product: (fp32 ms, int8 ms)."""
    rng = np.random.default_rng(0)
    b_f = rng.standard_normal((k, n)).astype(np.float32)
    b_i = rng.integers(-127, 128, (k, n)).astype(np.int8)

    def model(int8: bool):
        t_in = TensorProto.UINT8 if int8 else TensorProto.FLOAT
        init = helper.make_tensor("B", TensorProto.INT8 if int8 else TensorProto.FLOAT, [k, n],
                                  (b_i if int8 else b_f).flatten().tolist())
        node = helper.make_node("MatMulInteger" if int8 else "MatMul", ["A", "B"], ["Y"])
        out_t = TensorProto.INT32 if int8 else TensorProto.FLOAT
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", t_in, [m, k])],
                              [helper.make_tensor_value_info("Y", out_t, [m, n])], [init])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])

    out = []
    for int8 in (False, True):
        with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
            onnx.save(model(int8), f.name)
        a = rng.integers(0, 256, (m, k)).astype(np.uint8) if int8 else rng.standard_normal((m, k)).astype(np.float32)
        out.append(median_ms(ort_runner(f.name, a), repeats))
        os.unlink(f.name)
    return out[0], out[1]


def image_models(quick: bool):
    import torchvision

    yield "ResNet-18", torchvision.models.resnet18().eval(), (3, 224, 224)
    yield "MobileNetV2", torchvision.models.mobilenet_v2().eval(), (3, 224, 224)
    if quick:
        return
    try:
        yield "EfficientNet-Lite0", zoo.efficientnet_lite0().eval(), (3, 224, 224)
    except Exception as e:  # optional package not installed
        print(f"EfficientNet-Lite0 skipped: {type(e).__name__}: {str(e)[:120]}")


def ort_static(float_path: Path, calib: list[np.ndarray], out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input_0": c} for c in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def torch_ao_fx(model, example):
    """torch.ao x86 FX int8 (deprecated upstream; bench only)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            prepared(example)
        return convert_fx(prepared)


def bench_model(name, model, shape, batches, repeats, tmp: Path, profile: list[str] | None = None) -> list[str]:
    """Table rows of one image model; with ``profile`` a list, its per-op rows are appended to it."""
    rows = []
    torch.manual_seed(0)
    calib = [torch.randn(4, *shape) for _ in range(4)]
    q = lowbit.quantize(model, lowbit.recipes.W8A8(), calib, progress=False)
    f_path = export_onnx_float(model, calib[0], tmp / f"{name}.fp32.onnx")
    res = export_onnx(q, calib[0], tmp / f"{name}.int8.onnx", min_fraction=0.0)  # parity printed below
    plain = export_onnx(q, calib[0], tmp / f"{name}.int8.qdq.onnx", min_fraction=0.0, target="qdq")
    s_path = None
    try:
        s_path = ort_static(f_path, [c.numpy() for c in calib], tmp / f"{name}.ort_static.onnx")
        s_kernels = count_kernels(s_path)
    except Exception as e:
        print(f"{name}: ORT quantize_static failed: {type(e).__name__}: {str(e)[:120]}")
    try:
        ao = torch_ao_fx(model, calib[0])
    except Exception as e:
        ao = None
        print(f"{name}: torch.ao FX x86 int8 unavailable: {type(e).__name__}: {str(e)[:120]}")
    print(f"{name}: lowbit int8 {res.kernels}; parity {res.parity.fraction_within:.2%} within 1 step"
          + (f"; ORT quantize_static {s_kernels}" if s_path else "") + f"; load average {os.getloadavg()[0]:.1f}")
    for b in batches:
        x = torch.randn(b, *shape)
        xn = x.numpy()
        n = repeats if b == 1 else max(5, repeats // 3)
        t = {"torch fp32": timings_ms(no_grad(lambda x=x: model(x)), n)}
        if ao is not None:
            t["torch.ao x86 int8"] = timings_ms(no_grad(lambda x=x: ao(x)), n)
        peers = {"ORT fp32": (f_path, xn), "lowbit int8 (ORT)": (res.path, xn),
                 "lowbit int8 QDQ (ORT)": (plain.path, xn)}
        if s_path:
            peers["ORT quantize_static int8"] = (s_path, xn)
        inter, alone = ort_times(peers, n)
        rows += _rows(name, b, {**t, **inter}, alone)
        if profile is not None:
            profile += profile_rows(name, b, f_path, res.path, xn, runs=n)
    print("\n".join(rows), flush=True)
    return rows


SEQ = 128


def minilm_bench(batches, repeats, tmp: Path, profile: list[str] | None = None) -> list[str]:
    """MiniLM encoder (input_ids + attention_mask, seq 128): lowbit W8A8Dynamic export (DynamicQuantizeLinear
    -> int8 MatMul, fused by ORT) vs ORT fp32, ORT's own quantize_dynamic, torch.ao dynamic int8 Linear.
    "ORT fp32", lowbit int8 and quantize_dynamic have each attention block fused into one ORT node with its
    q/k/v projections packed into one GEMM (``target="ort-cpu"``: lowbit.export._attention and ._qkv; fp32
    ``Attention``, int8 ``QAttention``); "ORT fp32 (unfused attention)" and "lowbit int8 QDQ" are the plain
    exports (``target="qdq"``), to show what the fusion buys each."""
    from lowbit.export import export_onnx_dynamic

    try:
        model = zoo.minilm()
    except Exception as e:  # optional package not installed
        print(f"MiniLM skipped: {type(e).__name__}: {str(e)[:120]}")
        return []
    name = "MiniLM"

    def inputs(b: int):
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(1000, 20000, (b, SEQ), generator=g)
        mask = torch.ones(b, SEQ, dtype=torch.int64)
        mask[:, SEQ * 3 // 4:] = 0  # a quarter padding, as in a real padded batch
        return ids, mask

    ex = inputs(2)
    q = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=ex, progress=False)
    f_path = export_onnx_float(model, ex, tmp / "minilm.fp32.onnx")  # attention fused, as the int8 export's
    f_plain = export_onnx_float(model, ex, tmp / "minilm.fp32.unfused.onnx", target="qdq")
    res = export_onnx(q, ex, tmp / "minilm.int8.onnx", min_fraction=0.0, min_cosine=0.0)
    plain = export_onnx(q, ex, tmp / "minilm.int8.qdq.onnx", min_fraction=0.0, min_cosine=0.0, target="qdq")
    d_path = export_onnx_dynamic(model, ex, tmp / "minilm.ort_dynamic.onnx")
    ao = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    fused = {k: sum(n.op_type == k for n in onnx.load(str(p)).graph.node) for k, p in
             (("Attention", f_path), ("QAttention", res.path), ("MultiHeadAttention", res.path))}
    print(f"{name}: attention blocks fused: fp32 {fused['Attention']} Attention, lowbit int8 {fused['QAttention']} "
          f"QAttention + {fused['MultiHeadAttention']} MultiHeadAttention; "
          f"lowbit int8 {res.kernels}; parity: {res.parity.fraction_within:.2%} within 1 step, lowest row "
          f"cosine {res.parity.min_cosine:.4f}; ORT quantize_dynamic {count_kernels(d_path)}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for b in batches:
        ids, mask = inputs(b)
        n = repeats if b == 1 else max(5, repeats // 3)
        t = {"torch fp32": timings_ms(no_grad(lambda ids=ids, mask=mask: model(ids, mask)), n),
             "torch.ao x86 int8 (dynamic)": timings_ms(no_grad(lambda ids=ids, mask=mask: ao(ids, mask)), n)}
        xs = (ids.numpy(), mask.numpy())
        peers = {"ORT fp32": (f_path, *xs), "ORT fp32 (unfused attention)": (f_plain, *xs),
                 "lowbit int8 (ORT)": (res.path, *xs), "lowbit int8 QDQ (ORT)": (plain.path, *xs),
                 "ORT quantize_dynamic int8": (d_path, *xs)}
        inter, alone = ort_times(peers, n)
        rows += _rows(name, b, {**t, **inter}, alone)
        if profile is not None:
            profile += profile_rows(name, b, f_path, res.path, *xs, runs=n)
    print("\n".join(rows), flush=True)
    return rows


def _rows(name: str, b: int, t: dict[str, list[float]], alone: dict[str, list[float]]) -> list[str]:
    """Median per runtime; ``alone``: the ORT peers timed alone with ORT's default options (two more
    columns). (A low percentile is no fairer under intermittent load: short runs fit in the quiet moments
    more often than long ones, which favours the int8 models.)"""
    med = {k: statistics.median(v) for k, v in t.items()}
    dmed = {k: statistics.median(v) for k, v in alone.items()}
    rows = []
    for k in t:
        d = f"{dmed[k]:.1f} | {dmed['ORT fp32'] / dmed[k]:.2f}x" if k in dmed else "- | -"
        rows.append(f"| {name} | {b} | {k} | {med[k]:.1f} | {med['ORT fp32'] / med[k]:.2f}x | "
                    f"{med['torch fp32'] / med[k]:.2f}x | {d} |")
    return rows


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 and MobileNetV2 at batch 1 only")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", nargs="*", default=None, help="subset, e.g. MobileNetV2 MiniLM (default: all)")
    ap.add_argument("--profile", action="store_true",
                    help="also ORT's per-node kernel times by op type, ORT fp32 vs lowbit int8 (each session alone)")
    ap.add_argument("--threads", type=int, default=2,
                    help="intra-op threads of every session and of PyTorch (default 2, the figures in docs)")
    args = ap.parse_args()
    THREADS = args.threads
    logging.basicConfig(level=logging.ERROR)  # ORT quantization tool logs advice per bias at WARNING
    torch.set_num_threads(THREADS)
    batches = (1,) if args.quick else (1, 32)
    repeats = args.repeats or (15 if args.quick else 30)
    load0 = os.getloadavg()[0]
    f_ms, i_ms = gemm_ratio()
    print(f"ORT GEMM 256x1024x1024, {THREADS} threads: fp32 {f_ms:.2f} ms, u8s8 MatMulInteger {i_ms:.2f} ms, "
          f"int8/fp32 throughput {f_ms / i_ms:.2f}x")
    rows = ["| model | batch | runtime | ms (median) | vs ORT fp32 | vs torch fp32 | ms, ORT defaults, alone | "
            "vs ORT fp32 (defaults) |", "|---|---|---|---|---|---|---|---|"]
    prof = ["| model | batch | op type | ORT fp32 ms/run | lowbit int8 ms/run |", "|---|---|---|---|---|"]
    keep = prof if args.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, shape in image_models(args.quick):
            if args.models is None or name in args.models:
                rows += bench_model(name, model, shape, batches, repeats, Path(tmp), keep)
        if not args.quick and (args.models is None or "MiniLM" in args.models):
            rows += minilm_bench(batches, repeats, Path(tmp), keep)
    print("\n".join(rows))
    if args.profile:
        print("\nKernel time by op type (ORT's profiler, each session alone, default options; each "
              "op type's kernel time summed over the timed runs, divided by their number):\n" + "\n".join(prof))
    print(f"\ncommand: python bench/bench_speed.py {' '.join(sys.argv[1:])}  "
          f"(torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, {THREADS} threads, "
          f"load average before {load0:.1f}, after {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
