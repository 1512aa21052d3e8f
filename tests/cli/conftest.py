"""Helpers for the CLI tests: run ``python -m lowbit`` in a subprocess from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = "tests.cli.tiny_models:tiny_net"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m lowbit ARGS`` with the repository root as working directory (so ``tests.cli...``
    imports), one intra-op thread, and captured text output."""
    path = [str(ROOT), str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]  # src: uninstalled checkouts
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, "-m", "lowbit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """A ``.npy`` of 12 inputs (3x8x8) and a ``.npz`` with inputs ``x`` and labels ``y``."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((12, 3, 8, 8)).astype(np.float32))
    np.savez(d / "xy.npz", x=rng.standard_normal((12, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 4, 12))
    return {"npy": d / "x.npy", "npz": d / "xy.npz"}


def call(capsys, *args: str) -> tuple[int, str, str]:
    """``lowbit ARGS`` in this process (same code path as the console script, without the interpreter
    start-up): returns ``(exit code, stdout, stderr)``; argparse exits become their exit code."""
    from lowbit.cli import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err
