"""The HTML report: values, names and images it must contain, file handling, escaping."""

from __future__ import annotations

import base64
import math
import re
import struct

import pytest

from lowbit.errors import ConfigError, FileExistsRefusedError, QuantizationError
from lowbit.report import ActivationStats, ReportData, ResultRow, render_report, write_report

from .conftest import make_report_data

_IMG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _pngs(html: str) -> list[tuple[int, int]]:
    """(width, height) of every embedded PNG, read from its IHDR chunk."""
    sizes = []
    for b64 in _IMG.findall(html):
        raw = base64.b64decode(b64)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
        sizes.append(struct.unpack(">II", raw[16:24]))
    return sizes


def test_report_contents(tmp_path, report_data):
    path = write_report(report_data, tmp_path / "r.html", max_histograms=4)
    html = path.read_text("utf-8")
    # 1 SQNR chart + the 4 worst of 15 histograms + 1 per-channel plot
    sizes = _pngs(html)
    assert len(sizes) == 1 + 4 + 1
    assert all(w >= 400 and h >= 200 for w, h in sizes)
    assert "Showing the 4 quantizers with the lowest SQNR out of 15" in html
    # results table: values, deltas against float, sizes and ratios
    for text in ("W8A8", "W4A16", "0.8712", "0.8504", "(-0.0068)", "(-0.0276)", "17.93 MiB", "4.67 MiB",
                 "3.84×", "2.02×", "12.3", "6.1"):
        assert text in html, text
    # worst layers named, in order, with their SQNR
    worst = html[html.index("Lowest:"):html.index("</ul>", html.index("Lowest:"))]
    assert worst.index("features.3.conv</code>: 7.25 dB") < worst.index("features.11.conv")
    # every activation quantizer in the table, skipped layers and reasons, notes, recipe
    for a in report_data.activations:
        assert f"<code>{a.name}</code>" in html
    assert "first_last_float=True" in html and "<code>classifier</code>" in html
    assert "Latency measured on 2 CPU cores" in html
    assert "per-tensor kl)" in html
    # self-contained: nothing fetched from elsewhere (no link, script, CSS import or url(), no address at all)
    text = _IMG.sub("", html)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    for needle in ("http://", "https://", "url(", "@import", "<link", "<script"):
        assert needle not in text, needle


def test_histograms_are_the_worst_by_sqnr():
    data = make_report_data(n_acts=6, n_layers=8)
    html = render_report(data, max_histograms=3)
    shown = re.findall(r'alt="histogram of ([^"]+)"', html)
    by_sqnr = sorted(data.activations, key=lambda a: a.sqnr_db)
    assert shown == [a.name for a in by_sqnr[:3]]
    assert len(_pngs(html)) == 1 + 3 + 1


def test_activation_sqnr_falls_back_to_layer_prefix():
    acts = [ActivationStats(n, [1, 2], [0.0, 1.0, 2.0], {"minmax": (0.0, 2.0)}, "minmax")
            for n in ("a.input", "b.input", "c.output")]
    data = ReportData(activations=acts, layer_sqnr={"a": 30.0, "b": 10.0, "c": 20.0})
    shown = re.findall(r'alt="histogram of ([^"]+)"', render_report(data, max_histograms=2))
    assert shown == ["b.input", "c.output"]


def test_nan_sqnr_counts_as_the_worst():
    """A NaN SQNR (the quantized output is not finite) is the worst layer, not a dropped one."""
    data = make_report_data(n_acts=6, n_layers=8)
    broken = data.activations[4].name
    acts = [ActivationStats(a.name, a.counts, a.edges, a.ranges, a.chosen,
                            float("nan") if a.name == broken else a.sqnr_db) for a in data.activations]
    data = ReportData(activations=acts, layer_sqnr={**data.layer_sqnr, "features.6.conv": float("nan")})
    html = render_report(data, max_histograms=2, worst_layers=2)
    by_sqnr = sorted((a for a in acts if a.name != broken), key=lambda a: a.sqnr_db)
    assert re.findall(r'alt="histogram of ([^"]+)"', html) == [broken, by_sqnr[0].name]
    worst = html[html.index("Lowest:"):html.index("</ul>", html.index("Lowest:"))]
    assert re.findall(r"<code>([^<]+)</code>: ([^ ]+) dB", worst) == [("features.6.conv", "nan"),
                                                                       ("features.3.conv", "7.25")]


def test_sqnr_chart_keeps_nan_layers_when_it_drops_bars(monkeypatch):
    from lowbit.report import plots

    figs = []
    monkeypatch.setattr(plots, "_png", lambda fig: figs.append(fig) or b"")
    sqnr = {"l0": 30.0, "l1": float("nan"), "l2": 12.0, "l3": 25.0, "l4": float("-inf"), "l5": math.inf}
    plots.layer_sqnr_png(sqnr, worst=["l1"], max_bars=3)
    ax = figs[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["l1", "l2", "l4"]  # the 3 lowest, model order
    labels = sorted(t.get_text().strip() for t in ax.texts)
    assert labels == ["-inf", "12.0", "nan"]


def test_empty_report_renders_placeholders(tmp_path):
    html = write_report(ReportData(title="Nothing yet"), tmp_path / "e.html").read_text("utf-8")
    assert "<h1>Nothing yet</h1>" in html
    assert "No results were recorded." in html
    assert "No per-layer SQNR was measured." in html
    assert "None: every layer the recipe selects was quantized." in html
    assert _pngs(html) == []


def test_html_is_escaped(tmp_path):
    data = ReportData(model_name="<script>alert(1)</script>", results=[ResultRow("float", "a<b", 1.0)],
                      skipped=[("x", "because <b>bold</b>")])
    html = render_report(data)
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "because &lt;b&gt;bold&lt;/b&gt;" in html


def test_refuses_to_overwrite(tmp_path):
    data = make_report_data(n_acts=1, n_layers=2)
    p = tmp_path / "r.html"
    p.write_text("keep me")
    with pytest.raises(FileExistsRefusedError, match="overwrite=True"):
        write_report(data, p, max_histograms=0)
    assert p.read_text() == "keep me"
    write_report(data, p, overwrite=True, max_histograms=0)
    assert p.read_text("utf-8").startswith("<!DOCTYPE html>")
    assert isinstance(FileExistsRefusedError("x"), (QuantizationError, FileExistsError))


def test_bad_paths(tmp_path):
    data = ReportData()
    with pytest.raises(ConfigError, match="does not exist; create it first"):
        write_report(data, tmp_path / "missing" / "r.html")
    with pytest.raises(ConfigError, match="is a folder"):
        write_report(data, tmp_path)
    with pytest.raises(ConfigError, match=">= 0"):
        render_report(data, max_histograms=-1)
