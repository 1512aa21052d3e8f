"""Fill a :class:`~lowbit.report.data.ReportData` from a model that :func:`lowbit.quantize` produced.

What is read, and from where:

* activation histograms and candidate ranges: each static activation quantizer's calibration observer.
  A histogram observer (KL / percentile / MSE calibrators) already holds the histogram and gives every
  estimator's range (:meth:`~lowbit.calibration.histogram.HistogramObserver.candidate_ranges`) from
  the same statistics. KL is left out for a format with more levels than the histogram has bins per
  sign (int16: 32768 levels, 2048 bins): TensorRT's search needs one bin per level at least, and the
  report says so in a note instead of failing. Quantizers calibrated with min/max keep no histogram: their inputs are
  re-observed by a histogram observer over ``data`` with the activation quantizers passing data
  through and the weights quantized (the conditions of calibration), and the range the quantizer actually uses is added under its calibrator's name.
* each activation quantizer's own SQNR ``10 log10(sum x^2 / sum (x - q(x))^2)`` over ``data``, and the
  per-layer SQNR of :func:`lowbit.layer_sqnr` (layer output, quantized vs float).
* per-channel weight ranges ``(min_c W[c], max_c W[c])`` of the quantized layers where one per-tensor
  scale would not serve every output channel: depthwise convolutions and any weight whose
  ``max_c absmax(W[c]) / min_c absmax(W[c])`` exceeds ``ratio_threshold`` (Nagel et al. 2019, DFQ).
* layers kept float, with the reason, from the decision log.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calibration.config import KL
from ..calibration.estimators import signed_counts
from ..calibration.histogram import HistogramObserver
from ..capture.data import iter_calls
from ..capture.readback import layer_sqnr
from ..nn.quantizer import TensorQuantizer, quantizers
from .data import RANGE_METHODS, ActivationStats, ReportData, ResultRow

__all__ = ["build_report_data", "activation_stats", "weight_channel_ranges", "histogram_arrays"]

_WEIGHT_SUFFIX = "weight_quantizer"


def histogram_arrays(obs: HistogramObserver, max_bins: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The observer's per-tensor histogram as ``(counts (K,), edges (K + 1,))``, ``K <= max_bins``.

    The stored histogram has ``2 nb`` bins of width ``w`` on ``[-nb w, nb w)``; bins outside the observed
    ``[min, max]`` are dropped and the rest merged ``ceil(n / max_bins)`` at a time (counts are summed,
    so ``counts.sum()`` is the number of values observed). Block 0 only (activations are per tensor).
    """
    h = obs.stats
    nb = h.num_bins
    counts = signed_counts(h)[0].numpy()
    w = float(h.width[0])
    if w == 0.0:  # only zeros were seen
        return np.array([counts.sum()]), np.array([-0.5, 0.5])
    # a negative value -k w sits in the bin left of -k w (the negative side counts floor(|x| / w)): one bin margin
    lo_bin = max(0, int(math.floor(float(h.min_val[0]) / w)) + nb - 1)
    hi_bin = min(2 * nb, int(math.floor(float(h.max_val[0]) / w)) + nb + 1)
    counts = counts[lo_bin:hi_bin]
    step = max(1, math.ceil(counts.size / max_bins))
    pad = (-counts.size) % step
    counts = np.concatenate([counts, np.zeros(pad)]).reshape(-1, step).sum(axis=1)
    edges = (lo_bin - nb + step * np.arange(counts.size + 1)) * w
    return counts, edges


def _activation_quantizers(qmodel: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(p, q) for p, q in quantizers(qmodel)
            if not p.endswith(_WEIGHT_SUFFIX) and q.needs_calibration and q.is_calibrated]


@torch.no_grad()
def _observe(qmodel: nn.Module, targets: list[tuple[str, TensorQuantizer]], data: Iterable,
             num_batches: int | None, fresh: set[str]) -> tuple[dict[str, float], dict[str, HistogramObserver]]:
    """One quantized pass (each target's SQNR) and, for the names in ``fresh``, one pass with the
    activation quantizers off feeding a new histogram observer with the quantizer's input."""
    sig = dict.fromkeys((p for p, _ in targets), 0.0)
    noise = dict.fromkeys(sig, 0.0)
    calls = dict.fromkeys(sig, 0)
    observers = {p: HistogramObserver(q.spec.replace(calibrator=KL()), q.name) for p, q in targets if p in fresh}
    state = {"float": False}

    def hook_for(path: str):
        def hook(_m, inp, out):
            x = inp[0].detach().double()
            if state["float"]:
                if path in observers:
                    observers[path].update(inp[0].detach())
                return
            calls[path] += 1
            sig[path] += float((x * x).sum())
            noise[path] += float(((x - out.detach().double()) ** 2).sum())
        return hook

    handles = [q.register_forward_hook(hook_for(p)) for p, q in targets]
    try:
        for args, kwargs in iter_calls(data, qmodel, num_batches, False):
            state["float"] = False
            qmodel(*args, **kwargs)
            if observers:  # as during calibration: activation quantizers pass through, weights quantized
                state["float"] = True
                for _, q in targets:
                    q.quant_enabled.fill_(False)
                try:
                    qmodel(*args, **kwargs)
                finally:
                    for _, q in targets:
                        q.quant_enabled.fill_(True)
    finally:
        for h in handles:
            h.remove()
    # a quantizer the data never reached has no SQNR (not inf: nothing was measured, it is not exact)
    sqnr = {p: (math.inf if noise[p] == 0 else (-math.inf if sig[p] == 0 else 10 * math.log10(sig[p] / noise[p])))
            for p in sig if calls[p]}
    return sqnr, observers


def _activation_stats(qmodel: nn.Module, data: Iterable | None, num_batches: int | None,
                      max_bins: int) -> tuple[list[ActivationStats], dict[str, tuple[int, int]]]:
    """:func:`activation_stats` and ``{format name: (levels, bins)}`` of the formats whose KL range was left out."""
    targets = _activation_quantizers(qmodel)
    histo = {p for p, q in targets if isinstance(q.observer, HistogramObserver) and q.observer.num_batches}
    sqnr: dict[str, float] = {}
    fresh: dict[str, HistogramObserver] = {}
    if data is not None:
        sqnr, fresh = _observe(qmodel, targets, data, num_batches, {p for p, _ in targets if p not in histo})
    out = []
    no_kl: dict[str, tuple[int, int]] = {}
    for path, q in targets:
        obs = q.observer if path in histo else fresh.get(path)
        if obs is None or obs.num_batches == 0 or obs.stats is None or obs.stats.hist.shape[0] != 1:
            continue  # no data reached it, or not per tensor: nothing to draw
        ranges = {k: (float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]))
                  for k, (lo, hi) in obs.candidate_ranges().items()}
        if "kl" not in ranges:
            no_kl.setdefault(q.spec.format.name, obs.kl_levels_and_bins())
        chosen = q.spec.calibrator.name
        if chosen not in RANGE_METHODS and q.chosen_range is not None:
            lo, hi = q.chosen_range
            ranges[chosen] = (float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]))
        elif chosen not in ranges:
            continue
        counts, edges = histogram_arrays(obs, max_bins)
        out.append(ActivationStats(q.name, counts, edges, ranges, chosen, sqnr.get(path)))
    return out, no_kl


def activation_stats(qmodel: nn.Module, data: Iterable | None = None, *, num_batches: int | None = 4,
                     max_bins: int = 256) -> list[ActivationStats]:
    """One :class:`ActivationStats` per calibrated static activation quantizer of ``qmodel``, in module order.

    ``ranges`` holds minmax / percentile / KL / MSE candidates (``(lo, hi)`` floats; no KL for a format of
    more levels than the histogram has bins per sign, e.g. int16) and ``chosen`` the quantizer's
    calibrator; with ``data`` each entry also gets the quantizer's SQNR over at most ``num_batches``
    batches (None for a quantizer those batches never reach), and min/max-calibrated quantizers get a
    histogram (see the module doc).
    """
    return _activation_stats(qmodel, data, num_batches, max_bins)[0]


def _kl_notes(no_kl: dict[str, tuple[int, int]]) -> list[str]:
    return [f"KL: n/a for {fmt} (its search needs at least {levels} histogram bins per sign, one per level; the "
            f"histogram has {bins}): minmax, percentile and MSE ranges shown" for fmt, (levels, bins) in no_kl.items()]


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.groups > 1 and m.groups == m.in_channels


def weight_channel_ranges(qmodel: nn.Module, *, ratio_threshold: float = 10.0,
                          max_layers: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-output-channel ``(min, max)`` (each shape ``(C,)``) of the weights of quantized layers that
    are depthwise or whose channel range ratio ``max_c absmax(W[c]) / min_c absmax(W[c])`` exceeds
    ``ratio_threshold``; the ``max_layers`` with the largest ratio, in module order."""
    found: list[tuple[float, int, str, np.ndarray, np.ndarray]] = []
    for i, (name, m) in enumerate(qmodel.named_modules()):
        w = getattr(m, "weight", None)
        if getattr(m, "weight_quantizer", None) is None or not torch.is_tensor(w) or w.dim() < 2:
            continue
        wc = w.detach().float().reshape(w.shape[0], -1)
        absmax = wc.abs().amax(dim=1)
        lo, hi = float(absmax.min()), float(absmax.max())
        ratio = math.inf if lo == 0.0 and hi > 0 else (1.0 if hi == 0 else hi / lo)
        if _is_depthwise(m) or ratio > ratio_threshold:
            found.append((ratio, i, name, wc.amin(dim=1).numpy(), wc.amax(dim=1).numpy()))
    keep = sorted(found, key=lambda t: -t[0])[:max_layers]
    return {name: (lo, hi) for _, _, name, lo, hi in sorted(keep, key=lambda t: t[1])}


def build_report_data(
    qmodel: nn.Module,
    data: Iterable | None = None,
    *,
    results: Sequence[ResultRow] = (),
    model_name: str = "",
    recipe: Any = None,
    title: str = "lowbit quantization report",
    num_batches: int | None = 4,
    notes: Sequence[str] = (),
) -> ReportData:
    """Everything the HTML report shows about ``qmodel`` (a :func:`lowbit.quantize` result).

    Args:
        qmodel: the quantized-simulation model (its decision log, observers and weights are read).
        data: batches as for calibration (tensors, tuples, dicts); at most ``num_batches`` are run for
            the SQNR figures and the min/max histograms. None: no SQNR, histograms only where kept.
        results: accuracy / size / latency rows measured by the caller.
        model_name, recipe, title, notes: shown verbatim (``recipe`` through ``str``).

    Returns:
        A :class:`ReportData`; ``lowbit.report.write_report(data, "report.html")`` draws it.
    """
    from ..api import decision_log

    dlog = decision_log(qmodel)
    sqnr: dict[str, float] = {}
    if data is not None:
        sqnr = {r.name: r.sqnr_db for r in layer_sqnr(None, qmodel, data, num_batches=num_batches)}
    skipped = [(d.name, d.reason) for d in dlog.skipped]
    activations, no_kl = _activation_stats(qmodel, data, num_batches, 256)
    all_notes = [f"capture: {dlog.path} ({dlog.path_reason})", *dlog.notes, *_kl_notes(no_kl), *notes]
    return ReportData(
        title=title,
        model_name=model_name,
        recipe=str(recipe if recipe is not None else getattr(qmodel, "lowbit_recipe", "")),
        results=tuple(results),
        activations=activations,
        layer_sqnr=sqnr,
        weight_channel_ranges=weight_channel_ranges(qmodel),
        skipped=skipped,
        notes=all_notes,
    )
