"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas.

Each function builds its own :class:`matplotlib.figure.Figure` (no pyplot, so no global state and no
display is touched) and returns the PNG file's bytes, ready to embed as base64.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .data import RANGE_METHODS, ActivationStats

__all__ = ["histogram_png", "layer_sqnr_png", "channel_ranges_png", "METHOD_COLORS"]

METHOD_COLORS: dict[str, str] = {
    "minmax": "#6b7280",
    "percentile": "#2563eb",
    "kl": "#d97706",
    "mse": "#059669",
}
_EXTRA_COLORS = ("#7c3aed", "#db2777", "#0891b2", "#65a30d")
_BAR = "#93c5fd"
_WORST = "#dc2626"
_DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _method_color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def _fmt(x: float) -> str:
    return f"{x + 0.0:.4g}"  # + 0.0 prints -0.0 as 0


def histogram_png(act: ActivationStats, width_in: float = 5.6, height_in: float = 3.3) -> bytes:
    """Histogram of one activation quantizer (log count axis) with the range of every calibration
    method drawn as a pair of vertical lines: dashed for the candidates, solid and shaded for the one
    the quantizer uses (``act.chosen``)."""
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    ax = fig.add_subplot()
    counts, edges = act.counts, act.edges
    positive = counts[counts > 0]
    if positive.size:
        floor = float(positive.min()) / 2
        ax.stairs(np.maximum(counts, floor), edges, fill=True, color=_BAR, baseline=floor, label="_hist")
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    methods = [m for m in RANGE_METHODS if m in act.ranges] + [m for m in act.ranges if m not in RANGE_METHODS]
    xs = [float(edges[0]), float(edges[-1])] if edges.size else []
    for i, m in enumerate(methods):
        lo, hi = act.ranges[m]
        xs += [lo, hi]
        chosen = m == act.chosen
        color = _method_color(m, i)
        label = f"{m} [{_fmt(lo)}, {_fmt(hi)}]" + ("  (chosen)" if chosen else "")
        style = {"color": color, "linewidth": 2.4 if chosen else 1.3, "linestyle": "-" if chosen else (0, (4, 2))}
        ax.axvline(lo, label=label, **style)
        ax.axvline(hi, **style)
        if chosen:
            ax.axvspan(lo, hi, color=color, alpha=0.08)
    finite = [x for x in xs if math.isfinite(x)]
    if finite:
        lo_x, hi_x = min(finite), max(finite)
        pad = 0.03 * (hi_x - lo_x or 1.0)
        ax.set_xlim(lo_x - pad, hi_x + pad)
    title = act.name if act.sqnr_db is None else f"{act.name}   (SQNR {act.sqnr_db:.1f} dB)"
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    fig.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    ax.grid(axis="y", alpha=0.25)
    return _png(fig)


def layer_sqnr_png(layer_sqnr: Mapping[str, float], worst: Sequence[str] = (), max_bars: int = 60) -> bytes:
    """Horizontal bar per layer (model order, top to bottom) of its output SQNR in dB; the layers in
    ``worst`` red. With more than ``max_bars`` layers only the ``max_bars`` lowest are drawn (still in
    model order). ``inf`` (exact layers) is drawn hatched at the right edge and labelled "exact"; NaN (a
    non-finite output) counts as the lowest and is labelled "nan" at the left edge."""
    items = list(layer_sqnr.items())
    total = len(items)
    if total > max_bars:
        keep = {k for k, _ in sorted(items, key=lambda kv: (not math.isnan(kv[1]), kv[1]))[:max_bars]}
        items = [kv for kv in items if kv[0] in keep]
    names = [k for k, _ in items]
    vals = np.array([v for _, v in items], dtype=np.float64)
    finite = vals[np.isfinite(vals)]
    top = float(finite.max()) if finite.size else 10.0
    cap = top + max(5.0, 0.1 * abs(top))
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    shown = np.where(np.isposinf(vals), cap, np.where(np.isneginf(vals) | np.isnan(vals), low, vals))
    worst_set = set(worst)
    fig = Figure(figsize=(7.5, 1.3 + 0.21 * max(len(names), 3)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(names))
    colors = [_WORST if n in worst_set else "#3b82f6" for n in names]
    bars = ax.barh(y, shown, color=colors, height=0.72)
    for bar, v in zip(bars, vals):
        if np.isposinf(v):
            bar.set_hatch("//")
            bar.set_alpha(0.45)
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " exact", va="center", fontsize=7)
        elif math.isfinite(v):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.1f}", va="center", fontsize=7)
        else:  # nan or -inf: no bar to draw, say so
            ax.text(low, bar.get_y() + bar.get_height() / 2, f" {v}", va="center", fontsize=7, color=_WORST)
    ax.set_yticks(y, names, fontsize=7)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first layer on top, no empty margin rows
    ax.set_xlim(low, cap * 1.08)
    ax.set_xlabel("SQNR of layer output (dB, higher is better)")
    title = "Per-layer SQNR" + (f" (the {len(names)} lowest of {total} layers)" if total > len(names) else "")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.25)
    return _png(fig)


def channel_ranges_png(name: str, mins: np.ndarray, maxs: np.ndarray) -> bytes:
    """One vertical line per output channel from its weight minimum to its maximum, with the
    per-tensor range dashed: channels far smaller than the tensor range lose most of their int8 levels
    under one per-tensor scale (Nagel et al. 2019, Data-Free Quantization)."""
    mins = np.asarray(mins, dtype=np.float64)
    maxs = np.asarray(maxs, dtype=np.float64)
    absmax = np.maximum(np.abs(mins), np.abs(maxs))
    ratio = float(absmax.max() / absmax.min()) if absmax.size and absmax.min() > 0 else math.inf
    fig = Figure(figsize=(7.5, 2.6), layout="constrained")
    ax = fig.add_subplot()
    c = np.arange(mins.size)
    ax.vlines(c, mins, maxs, color="#2563eb", linewidth=max(0.5, min(3.0, 300 / max(mins.size, 1))))
    if mins.size:
        ax.axhline(float(mins.min()), color=_WORST, linestyle="--", linewidth=1, label="per-tensor range")
        ax.axhline(float(maxs.max()), color=_WORST, linestyle="--", linewidth=1)
        ax.axhline(0.0, color="#111827", linewidth=0.5)
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlim(-1, max(mins.size, 1))
    ax.set_xlabel("output channel")
    ax.set_ylabel("weight")
    ratio_txt = "inf" if math.isinf(ratio) else f"{ratio:.1f}"
    ax.set_title(f"{name}: {mins.size} channels, largest/smallest channel |w| max = {ratio_txt}",
                 fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.25)
    return _png(fig)
