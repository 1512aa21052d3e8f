"""KL (entropy) calibration: lowbit's streaming histogram + vectorized search vs ONNX Runtime's
HistogramCollector (CalibrationMethod.Entropy), on the same activation stream, side by side.

The stream is a reproducible synthetic stand-in for ResNet-18 activations: per tensor, a post-ReLU
activation (rectified Gaussian with per-channel scales and a heavy tail) and a signed conv output
(Laplace with per-channel scales), batch after batch from one seeded numpy generator.
Both sides see identical arrays; each side runs in its own process so peak RSS is its own.
Settings matched: 2048 bins of |x| and 128 levels (ORT: 4096 signed bins, 256 quantized bins).

Memory: RSS over the process's baseline (after imports) is sampled in the same process after a quarter
of the batches and after all of them: "flat" means the two agree (a few MB of allocator noise). The
peak includes the threshold search's fixed workspace, which does not depend on the number of batches.

    python bench/bench_kl_calibration.py               # 256 batches, ~30 s on 2 CPU cores
    python bench/bench_kl_calibration.py --batches 64  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def stream(n_batches: int, shape: tuple[int, ...], seed: int = 0):
    """Yield ``{name: float32 array}`` per batch; the same for every caller with the same arguments."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    ch_scale = np.exp(rng.normal(0.0, 0.5, size=(1, c) + (1,) * (len(shape) - 2))).astype(np.float32)
    for _ in range(n_batches):
        g = rng.standard_normal(shape, dtype=np.float32) * ch_scale + 0.2
        tail = rng.standard_exponential(shape, dtype=np.float32) ** 2 * 0.05
        relu = np.maximum(g + tail * np.sign(g), 0.0)
        conv = rng.laplace(0.0, 1.0, size=shape).astype(np.float32) * ch_scale
        yield {"layer1.relu": relu, "layer2.conv": conv}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_lowbit(n_batches: int, shape) -> dict:
    import torch

    from lowbit.calibration import KL, make_observer
    from lowbit.spec import QuantSpec

    torch.set_num_threads(1)  # numpy (ORT) is single-threaded too; 2 shared cores oversubscribe badly
    observers = {}
    base = _rss_mb()
    t_collect = 0.0
    rss = {}
    for i, batch in enumerate(stream(n_batches, shape), 1):
        t0 = time.perf_counter()
        for name, arr in batch.items():
            if name not in observers:
                observers[name] = make_observer(QuantSpec("int8", calibrator=KL(num_bins=2048)), name)
            observers[name].update(torch.from_numpy(arr))
        t_collect += time.perf_counter() - t0
        _sample_rss(rss, i, n_batches, base)
    t0 = time.perf_counter()
    thresholds = {n: [float(v) for v in o.compute_range()] for n, o in observers.items()}
    t_compute = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"collect_s": t_collect, "compute_s": t_compute, "peak_mb": peak - base, "thresholds": thresholds, **rss}


def _sample_rss(rss: dict, i: int, n_batches: int, base: float) -> None:
    if i == max(1, n_batches // 4):
        rss["rss_quarter_mb"] = _rss_mb() - base
    if i == n_batches:
        rss["rss_end_mb"] = _rss_mb() - base


def run_ort(n_batches: int, shape) -> dict:
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector(method="entropy", symmetric=False, num_bins=4096, num_quantized_bins=256,
                                   percentile=99.999, scenario="same")
    base = _rss_mb()
    t_collect = 0.0
    quiet = io.StringIO()
    rss = {}
    for i, batch in enumerate(stream(n_batches, shape), 1):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(quiet):  # ORT prints a line per collect
            collector.collect({k: [v] for k, v in batch.items()})
        t_collect += time.perf_counter() - t0
        quiet.seek(0)
        quiet.truncate()
        _sample_rss(rss, i, n_batches, base)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        result = collector.compute_collection_result()
    t_compute = time.perf_counter() - t0
    thresholds = {n: [float(v[0]), float(v[1])] for n, v in result.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"collect_s": t_collect, "compute_s": t_compute, "peak_mb": peak - base, "thresholds": thresholds, **rss}


def _child(method: str, n_batches: int, shape) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--batches", str(n_batches),
           "--shape", ",".join(map(str, shape))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=256)
    ap.add_argument("--shape", default="8,64,16,16", help="activation batch shape N,C,H,W")
    ap.add_argument("--worker", choices=["lowbit", "ort"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.worker:
        res = (run_lowbit if args.worker == "lowbit" else run_ort)(args.batches, shape)
        print(json.dumps(res))
        return
    res = {m: _child(m, args.batches, shape) for m in ("lowbit", "ort")}
    lb, ort = res["lowbit"], res["ort"]
    q = max(1, args.batches // 4)
    print(f"KL calibration, {args.batches} batches of {shape} x 2 tensors (float32)\n")
    print(f"{'':10s} {'collect s':>10s} {'compute s':>10s} {'total s':>9s} {'RSS MB @' + str(q):>12s} "
          f"{'RSS MB @' + str(args.batches):>12s} {'peak MB':>8s}")
    for m, r in res.items():
        tot = r["collect_s"] + r["compute_s"]
        print(f"{m:10s} {r['collect_s']:10.2f} {r['compute_s']:10.2f} {tot:9.2f} {r['rss_quarter_mb']:12.1f} "
              f"{r['rss_end_mb']:12.1f} {r['peak_mb']:8.1f}")
    print("(RSS and peak over the process's own baseline after imports; RSS sampled after that many batches)")
    t_ratio = (ort["collect_s"] + ort["compute_s"]) / (lb["collect_s"] + lb["compute_s"])
    print(f"\nspeed-up lowbit vs ORT (total): {t_ratio:.1f}x   "
          f"(collect {ort['collect_s'] / lb['collect_s']:.1f}x, compute {ort['compute_s'] / lb['compute_s']:.1f}x)")
    print(f"peak memory ratio ORT / lowbit: {ort['peak_mb'] / max(lb['peak_mb'], 1e-3):.2f}")
    print("\nthresholds (lo, hi):")
    for name in lb["thresholds"]:
        a, b = lb["thresholds"][name], ort["thresholds"][name]
        print(f"  {name:12s} lowbit ({a[0]:8.4f}, {a[1]:8.4f})   ort ({b[0]:8.4f}, {b[1]:8.4f})")
    print(f"\ncommand: python bench/bench_kl_calibration.py --batches {args.batches} --shape {args.shape}")


if __name__ == "__main__":
    main()
