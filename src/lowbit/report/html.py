"""One self-contained HTML file from a :class:`~lowbit.report.data.ReportData`.

Plots are PNGs embedded as base64 ``data:`` URIs and the CSS is inline, so the file opens anywhere,
offline, and can be attached to a ticket. Sections: results table (accuracy, size, latency per variant),
per-layer SQNR, activation histograms with every candidate range, per-channel weight ranges of the
collapse-prone layers, layers kept in float, notes.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from pathlib import Path

import jinja2

from ..errors import ConfigError, FileExistsRefusedError
from . import plots
from .data import ActivationStats, ReportData

__all__ = ["write_report", "render_report"]

log = logging.getLogger(__name__)

FLOAT_VARIANT = "float"


@dataclass(frozen=True)
class _Cell:
    text: str
    delta: str = ""


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x + 0.0:.{digits}g}"  # + 0.0 prints -0.0 as 0


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _results_table(data: ReportData) -> tuple[list[str], list[dict]]:
    """Pivot the rows: one line per variant, one column per metric, then size and latency."""
    variants: list[str] = []
    metrics: list[str] = []
    for r in data.results:
        if r.variant not in variants:
            variants.append(r.variant)
        if r.metric not in metrics:
            metrics.append(r.metric)
    value: dict[tuple[str, str], float] = {}
    size: dict[str, int] = {}
    latency: dict[str, float] = {}
    for r in data.results:
        value.setdefault((r.variant, r.metric), r.value)
        if r.size_bytes is not None:
            size.setdefault(r.variant, r.size_bytes)
        if r.latency_ms is not None:
            latency.setdefault(r.variant, r.latency_ms)
    ref = FLOAT_VARIANT if FLOAT_VARIANT in variants else None
    rows = []
    for v in variants:
        cells = []
        for m in metrics:
            x = value.get((v, m))
            base = value.get((ref, m)) if ref else None
            delta = ""
            if x is not None and base is not None and v != ref and math.isfinite(x) and math.isfinite(base):
                delta = f"{x - base:+.3g}"
            cells.append(_Cell(_num(x), delta))
        s, fs = size.get(v), size.get(ref) if ref else None
        ratio = f"{fs / s:.2f}×" if s and fs and v != ref else ""
        lat, flat = latency.get(v), latency.get(ref) if ref else None
        speed = f"{flat / lat:.2f}×" if lat and flat and v != ref else ""
        rows.append({"variant": v, "cells": cells, "size": _size(s), "ratio": ratio,
                     "latency": _num(lat, 3), "speedup": speed, "is_ref": v == ref})
    return metrics, rows


def _act_sqnr(act: ActivationStats, layer_sqnr: dict[str, float]) -> float | None:
    """The quantizer's own SQNR, else that of the layer its name starts with (``conv1.input`` -> ``conv1``)."""
    if act.sqnr_db is not None:
        return act.sqnr_db
    name = act.name
    while name:
        if name in layer_sqnr:
            return layer_sqnr[name]
        name = name.rpartition(".")[0]
    return None


def _worst_first(v: float | None) -> tuple[int, float]:
    """Sort key: NaN (a broken output) first, then the SQNR ascending, then no SQNR (None) last."""
    if v is None:
        return (2, 0.0)
    return (0, 0.0) if math.isnan(v) else (1, v)


def _order_activations(data: ReportData) -> list[ActivationStats]:
    """Worst SQNR first (NaN before any number); quantizers with no SQNR keep their order after those with one."""
    keyed = [(_worst_first(_act_sqnr(a, data.layer_sqnr)), i, a) for i, a in enumerate(data.activations)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [a for _, _, a in keyed]


def render_report(data: ReportData, max_histograms: int = 12, worst_layers: int = 5) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    if max_histograms < 0 or worst_layers < 0:
        raise ConfigError("max_histograms and worst_layers must be >= 0.")
    metrics, rows = _results_table(data)
    by_sqnr = sorted(data.layer_sqnr.items(), key=lambda kv: _worst_first(kv[1]))  # NaN (broken) first
    worst = [(k, _num(v, 3)) for k, v in by_sqnr[:worst_layers] if not math.isinf(v) or v < 0]
    sqnr_png = (_b64(plots.layer_sqnr_png(data.layer_sqnr, [k for k, _ in worst]))
                if data.layer_sqnr else None)
    ordered = _order_activations(data)
    shown = ordered[:max_histograms]
    histograms = [{"name": a.name, "png": _b64(plots.histogram_png(a))} for a in shown]
    act_rows = [
        {"name": a.name, "chosen": a.chosen, "sqnr": _num(_act_sqnr(a, data.layer_sqnr), 3),
         "ranges": {m: f"[{_num(lo)}, {_num(hi)}]" for m, (lo, hi) in a.ranges.items()}}
        for a in ordered
    ]
    methods: list[str] = []
    for a in data.activations:
        methods += [m for m in a.ranges if m not in methods]
    channel_plots = [
        {"name": k, "png": _b64(plots.channel_ranges_png(k, lo, hi))}
        for k, (lo, hi) in data.weight_channel_ranges.items()
    ]
    template = resources.files("lowbit.report").joinpath("templates", "report.html").read_text("utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.from_string(template).render(
        data=data, metrics=metrics, rows=rows, worst=worst, sqnr_png=sqnr_png,
        n_layers=len(data.layer_sqnr), histograms=histograms, n_acts=len(data.activations),
        act_rows=act_rows, methods=methods, channel_plots=channel_plots, colors=plots.METHOD_COLORS,
    )
    log.debug("report: %d histograms, %d channel plots", len(histograms), len(channel_plots))
    return html


def write_report(
    data: ReportData,
    path: str | PathLike[str],
    overwrite: bool = False,
    *,
    max_histograms: int = 12,
    worst_layers: int = 5,
) -> Path:
    """Write the report as one self-contained HTML file and return its path.

    Args:
        data: what to show.
        path: the ``.html`` file to write; its folder must exist.
        overwrite: replace an existing file (otherwise :class:`~lowbit.errors.FileExistsRefusedError`).
        max_histograms: activation histograms drawn, worst SQNR first (the others are listed in a
            table); plotting each costs ~0.1 s.
        worst_layers: how many of the lowest-SQNR layers are named and drawn red.

    Raises:
        FileExistsRefusedError: ``path`` exists and ``overwrite`` is False.
        ConfigError: the folder of ``path`` does not exist or ``path`` is a folder.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"report path {str(p)!r} is a folder; pass a file name such as {str(p / 'report.html')!r}.")
    if not p.parent.is_dir():
        raise ConfigError(
            f"cannot write the report to {str(p)!r}: the folder {str(p.parent)!r} does not exist; "
            "create it first (mkdir -p) or choose another path."
        )
    if p.exists() and not overwrite:
        raise FileExistsRefusedError(
            f"{str(p)!r} already exists; pass overwrite=True to replace it or choose another file name."
        )
    html = render_report(data, max_histograms=max_histograms, worst_layers=worst_layers)
    try:
        with open(p, "w" if overwrite else "x", encoding="utf-8") as f:
            f.write(html)
    except FileExistsError:  # created by someone else between the check and the write
        raise FileExistsRefusedError(
            f"{str(p)!r} already exists; pass overwrite=True to replace it or choose another file name."
        ) from None
    log.info("wrote report %s (%d KiB)", p, len(html) // 1024)
    return p
