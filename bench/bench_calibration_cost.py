"""Cost of KL (entropy) calibration on a ResNet-18-sized model, relative to plain float inference.

torchvision ``resnet18`` (random weights, ``torch.manual_seed(0)``, eval mode) gets a forward hook on
every Conv2d and Linear output (21 tensors). Each hook feeds a streaming histogram observer:

* ``lowbit``: ``make_observer(QuantSpec("uint8", symmetric=False, calibrator="kl"))`` per tensor, then
  ``compute_range()`` (the KL threshold search) for all of them at the end;
* ``torchao`` (peer): ``torch.ao.quantization.HistogramObserver`` (quint8, per-tensor affine, 2048 bins),
  then ``calculate_qparams()``;
* ``none`` (control): the same hooks observing nothing, so its ratio and memory show the noise floor.

Timing is interleaved batch by batch so that load from other processes hits both sides alike: every
batch runs once without hooks (the float forward) and once with them (calibration). Calibration time
= hooked forwards + the final range computation; the ratio is that over the plain forwards of the same
inputs. Each observer kind runs in its own process; memory is RSS over the process's baseline (model,
inputs and one warm-up forward loaded), sampled after a quarter of the batches and after all of them,
plus the peak (``ru_maxrss``) over the same baseline.

    python bench/bench_calibration_cost.py            # 256 inputs at 224x224, batch 32 (several minutes on 2 cores)
    python bench/bench_calibration_cost.py --quick    # 64 inputs at 112x112 (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _observers(kind: str, names: list[str]) -> tuple[dict, callable]:
    """``{name: observer}`` and a function that turns them all into ranges."""
    if kind == "none":  # control: hooks that observe nothing, to show the timing and memory noise floor
        return {}, dict
    if kind == "lowbit":
        from lowbit.calibration import make_observer
        from lowbit.spec import QuantSpec

        spec = QuantSpec("uint8", symmetric=False, calibrator="kl")
        obs = {n: make_observer(spec, n) for n in names}
        return obs, lambda: {n: [float(v) for v in o.compute_range()] for n, o in obs.items()}
    import torch
    from torch.ao.quantization import HistogramObserver

    obs = {n: HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, bins=2048) for n in names}

    def ranges() -> dict:
        out = {}
        for n, o in obs.items():
            scale, zp = o.calculate_qparams()
            s, z = float(scale), int(zp)
            out[n] = [(0 - z) * s, (255 - z) * s]
        return out

    return obs, ranges


def run_worker(kind: str, n_inputs: int, size: int, batch: int, threads: int) -> dict:
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(min(batch, n_inputs - i), 3, size, size, generator=gen) for i in range(0, n_inputs, batch)]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    observers, ranges = _observers(kind, list(layers))
    enabled = [False]
    elements = [0]

    def hook(name):
        def fn(module, args, output):
            if not enabled[0]:
                return
            elements[0] += output.numel()
            if kind == "lowbit":
                observers[name].update(output)
            elif kind == "torchao":
                observers[name](output)
        return fn

    for n, m in layers.items():
        m.register_forward_hook(hook(n))
    with torch.no_grad():
        model(inputs[0])  # warm-up with a full batch: kernels loaded, activation memory already counted
        base = _rss_mb()
        peak0 = _peak_mb()
        t_float = t_cal = 0.0
        rss, trace = {}, []
        for i, x in enumerate(inputs, 1):
            enabled[0] = False
            t0 = time.perf_counter()
            model(x)
            t_float += time.perf_counter() - t0
            enabled[0] = True
            t0 = time.perf_counter()
            model(x)
            t_cal += time.perf_counter() - t0
            trace.append(round(_rss_mb() - base, 1))
            if i == max(1, len(inputs) // 4):
                rss["rss_quarter_mb"] = _rss_mb() - base
        rss["rss_end_mb"] = _rss_mb() - base
        t0 = time.perf_counter()
        result = ranges()
        t_ranges = time.perf_counter() - t0
    return {"float_s": t_float, "hooked_s": t_cal, "ranges_s": t_ranges, "tensors": len(layers),
            "elements": elements[0], "peak_growth_mb": max(0.0, _peak_mb() - max(peak0, base)),
            "peak_over_base_mb": _peak_mb() - base, "ranges": result, "rss_trace_mb": trace, **rss}


def _child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--inputs", str(args.inputs), "--size", str(args.size),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="input resolution (square)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the same for float and calibration)")
    ap.add_argument("--quick", action="store_true", help="64 inputs at 112x112")
    ap.add_argument("--peers", default="none,lowbit,torchao",
                    help="comma list of none (control: empty hooks), lowbit, torchao")
    ap.add_argument("--worker", choices=["none", "lowbit", "torchao"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.inputs, args.size = 64, 112
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.inputs, args.size, args.batch, args.threads)))
        return
    res = {k: _child(k, args) for k in args.peers.split(",")}
    first = next(iter(res.values()))
    print(f"KL calibration cost, resnet18 (random weights), {args.inputs} inputs {args.size}x{args.size}, "
          f"batch {args.batch}, {args.threads} thread(s); {first['tensors']} conv/linear outputs, "
          f"{first['elements'] / 1e6:.0f} M values observed\n")
    print(f"{'observer':10s} {'float s':>8s} {'hooked s':>9s} {'ranges s':>9s} {'calib / float':>14s} "
          f"{'ns/value':>9s} {'RSS MB @1/4':>12s} {'RSS MB @end':>12s} {'peak growth MB':>15s}")
    for k, r in res.items():
        cal = r["hooked_s"] + r["ranges_s"]
        per_value = (cal - r["float_s"]) / r["elements"] * 1e9
        print(f"{k:10s} {r['float_s']:8.2f} {r['hooked_s']:9.2f} {r['ranges_s']:9.2f} {cal / r['float_s']:13.2f}x "
              f"{per_value:9.2f} {r['rss_quarter_mb']:12.1f} {r['rss_end_mb']:12.1f} {r['peak_growth_mb']:15.1f}")
    print("\nRSS over baseline after each batch, MB:")
    for k, r in res.items():
        print(f"  {k:10s} {' '.join(f'{v:.0f}' for v in r['rss_trace_mb'])}")
    print("\n(calibration = hooked forwards + range computation; float = the same inputs without hooks, "
          "interleaved batch by batch in the same process; ns/value = extra time per observed value; RSS over "
          "the baseline after a warm-up forward; peak growth = rise of ru_maxrss above that baseline)")
    quick = " --quick" if args.quick else f" --inputs {args.inputs} --size {args.size}"
    print(f"command: python bench/bench_calibration_cost.py{quick} --batch {args.batch} --threads {args.threads}")


if __name__ == "__main__":
    main()
