"""Render the report in headless Chromium and check the screenshot is a real, non-blank page."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from lowbit.report import write_report

from .conftest import make_report_data

WIDTH, HEIGHT = 1280, 2000


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium) ; "
                    "the browser rendering test needs it")
def test_report_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    report = write_report(make_report_data(n_acts=4, n_layers=10), tmp_path / "report.html", max_histograms=4)
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
        report.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    img = imread(shot)[..., :3]  # float in [0, 1]
    assert img.shape == (HEIGHT, WIDTH, 3)
    gray = img.mean(axis=2)
    # a blank (all white) or error page has almost no variance; text, tables and plots do
    assert float(gray.var()) > 0.005
    dark = gray < 0.5
    assert 0.005 < float(dark.mean()) < 0.5  # text drawn, but not a black page
    # content in the top, middle and bottom thirds: the page laid out, not just a header
    for part in np.array_split(gray, 3, axis=0):
        assert float(part.var()) > 0.002
