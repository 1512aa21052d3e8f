"""Run every benchmark in bench/ one after another (what `make bench` runs after the slow tests).

Each script prints its own table of ratios measured side by side in one run and the command that
reproduces it; docs/benchmarks.md holds the latest figures. Usage:

    python bench/run_all.py            # full runs (tens of minutes on 2 cores)
    python bench/run_all.py --quick    # reduced sizes, a few minutes
    python bench/run_all.py speed kl   # only the scripts whose name contains these words
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    words = [a for a in argv if not a.startswith("-")]
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not words or any(w in p.stem for w in words))
    import torch

    if not torch.cuda.is_available():  # bench_gpu.py measures CUDA kernels only
        print("bench_gpu.py skipped: no CUDA device")
        scripts = [p for p in scripts if p.name != "bench_gpu.py"]
    failed = []
    for script in scripts:
        help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
        cmd = [sys.executable, str(script)] + (["--quick"] if quick and "--quick" in help_text else [])
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        print(f"=== {script.name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
