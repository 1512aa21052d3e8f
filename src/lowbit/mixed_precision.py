"""Mixed precision: give each layer one of several candidate recipes, chosen by measured sensitivity,
under a model-size budget and/or a floor on a quality metric.

Flow (the measured-sensitivity greedy of AIMET's AMP and HAWQ-style searches):

1. quantize the model once per candidate recipe (``lowbit.quantize``, calibrated on ``calib_data``);
2. sensitivity: for every weighted layer ``L`` and candidate ``c``, run the model with only ``L``'s own
   quantizers of candidate ``c`` on (every other quantizer off) and measure its cost: the output
   noise-to-signal ratio ``sum (y - y_L)^2 / sum y^2`` against the float (BatchNorm-folded) model by
   default, or ``metric(float) - metric(model)`` for a user ``metric`` (higher is better);
3. path: start with every layer at the first (most precise) candidate; repeatedly move one layer one
   candidate down, taking the move with the smallest cost increase per byte saved, until every layer
   sits at its last candidate: a sequence of configurations of falling size;
4. choice: the first configuration whose deployed size fits ``size_budget``; with ``min_metric``, the
   last configuration (within the size budget) whose metric, measured on the fully quantized model,
   is at least ``min_metric``, found by bisection along the path (the metric is assumed to fall along
   it; each probe quantizes and measures one configuration).

The result is a :class:`MixedPrecisionPlan`; ``lowbit.quantize(model, plan.recipe, calib_data)`` builds
the chosen model (the plan's figures were measured on exactly that configuration).

>>> from lowbit import recipes
>>> plan = search_mixed_precision(model, [recipes.W8A8(), recipes.W4A16(group_size=32)], calib,
...                               size_budget="3MB")                          # doctest: +SKIP
>>> qmodel = lowbit.quantize(model, plan.recipe, calib)                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from tqdm.auto import tqdm

from .api import quantize
from .capture.data import iter_calls
from .capture.readback import (
    _first_tensor,
    deployed_size_bytes,
    quantization_disabled,
    quantized_weight_layers,
    weight_bytes,
)
from .errors import ConfigError
from .recipes import Recipe

log = logging.getLogger("lowbit")

__all__ = ["MixedPrecisionPlan", "search_mixed_precision", "parse_size"]

Metric = Callable[[nn.Module], float]


def parse_size(size: int | float | str) -> int:
    """Bytes from ``1234``, ``"3.5MB"``, ``"512kB"``, ``"2MiB"`` (kB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024),
    rounded down; a size that is not a finite number of at least one byte raises :class:`ConfigError`."""
    if isinstance(size, int | float) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+)\s*([kKMG]i?B|B)?\s*", str(size))
        if not m:
            raise ConfigError(f"cannot read size {size!r}; write e.g. 3500000, '3.5MB', '512kB' or '2MiB'.")
        unit = (m.group(2) or "B").replace("K", "k")
        mult = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "kiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
        value = Fraction(m.group(1)) * mult  # exact: float("1.001") * 1000 is 1000.9999...
    if (isinstance(value, float) and not math.isfinite(value)) or value < 1:
        raise ConfigError(f"a size budget must be a finite number of bytes, at least 1, got {size!r}.")
    return int(value)


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """The outcome of :func:`search_mixed_precision`.

    Attributes:
        candidates: the candidate recipes, most precise first.
        choice: ``{layer: index into candidates}`` for every searched layer.
        sensitivity: ``{layer: cost per candidate}`` (noise-to-signal ratio, or metric drop).
        layer_bytes: ``{layer: weight bytes per candidate}``.
        size_bytes: deployed bytes of the chosen model (measured on it).
        metric: the chosen model's metric (output SQNR in dB by default), measured on it.
        float_metric: the float model's metric (``inf`` dB for the default).
        metric_name: what ``metric`` is.
        meets_budget: whether every budget given was met.
        path: ``(size_bytes, metric or None)`` of every configuration probed, for plots and reports.
    """

    candidates: tuple[Recipe, ...]
    choice: Mapping[str, int]
    sensitivity: Mapping[str, tuple[float, ...]]
    layer_bytes: Mapping[str, tuple[int, ...]]
    size_bytes: int
    metric: float
    float_metric: float
    metric_name: str
    meets_budget: bool
    path: tuple[tuple[int, float | None], ...]

    @property
    def recipe(self) -> Recipe:
        """The first candidate with every layer that moved overridden by its chosen candidate."""
        return _config_recipe(self.candidates, self.choice)

    def counts(self) -> dict[str, int]:
        """How many layers each candidate got, by recipe name."""
        out = {_name(c): 0 for c in self.candidates}
        for i in self.choice.values():
            out[_name(self.candidates[i])] += 1
        return out

    def table(self) -> str:
        """One line per layer: chosen recipe, bytes, and the cost of each candidate."""
        names = [_name(c) for c in self.candidates]
        head = f"{'layer':36s} {'chosen':22s} {'bytes':>10s}  " + "  ".join(f"{n[:14]:>14s}" for n in names)
        lines = [head]
        for layer, i in self.choice.items():
            costs = "  ".join(f"{v:14.4g}" for v in self.sensitivity[layer])
            lines.append(f"{layer:36s} {names[i][:22]:22s} {self.layer_bytes[layer][i]:10d}  {costs}")
        lines.append(f"size {self.size_bytes} bytes; {self.metric_name} {self.metric:.4g} "
                     f"(float {self.float_metric:.4g}); budget met: {self.meets_budget}")
        return "\n".join(lines)


def _name(recipe: Recipe) -> str:
    g = getattr(recipe, "group_size", None)
    return type(recipe).__name__ + (f"(g{g})" if g else "")


def _config_recipe(candidates: Sequence[Recipe], choice: Mapping[str, int]) -> Recipe:
    base = candidates[0]
    moved = {layer: candidates[i] for layer, i in choice.items() if i > 0}
    return dataclasses.replace(base, overrides={**dict(base.overrides), **moved})


class _OutputNSR:
    """Default cost: output noise-to-signal ratio against the float (BN-folded) model on fixed batches."""

    name = "output SQNR dB"

    def __init__(self, calls: list[tuple[tuple, dict]], qmodel: nn.Module) -> None:
        """Reference outputs: ``qmodel`` with every quantizer off (the float, BN-folded function)."""
        self.calls = calls
        with quantization_disabled(qmodel):
            self.ref = self._outputs(qmodel)
        self.signal = sum(float((r * r).sum()) for r in self.ref)

    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [_first_tensor(model(*a, **k)).detach().double() for a, k in self.calls]

    def nsr(self, model: nn.Module) -> float:
        noise = sum(float(((r - y) ** 2).sum()) for r, y in zip(self.ref, self._outputs(model), strict=True))
        return noise / max(self.signal, 1e-300)

    @staticmethod
    def to_db(nsr: float) -> float:
        return math.inf if nsr <= 0 else -10.0 * math.log10(nsr)


def _user_metric(metric: Metric, model: nn.Module, name: str) -> float:
    """``float(metric(model))``; :class:`ConfigError` when that is not a number or is nan."""
    v = metric(model)
    try:
        out = math.nan if isinstance(v, str | bytes) else float(v)  # a number or a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        out = math.nan
    if math.isnan(out):
        raise ConfigError(f"metric ({name}) returned {v!r}; it must return a number, higher is better "
                          "(e.g. top-1 accuracy on held-out data).")
    return out


def _greedy_path(costs: Mapping[str, tuple[float, ...]], sizes: Mapping[str, tuple[int, ...]],
                 allowed: Mapping[str, tuple[int, ...]]) -> list[dict[str, int]]:
    """Configurations from all-first to all-last candidate, one layer one step down at a time, taking
    the step with the smallest ``max(0, cost increase) / bytes saved`` (steps that save nothing last)."""
    pos = {layer: 0 for layer in allowed}
    choice = {layer: allowed[layer][0] for layer in allowed}
    path = [dict(choice)]
    while True:
        best, best_key = None, None
        for layer, opts in allowed.items():
            if pos[layer] + 1 >= len(opts):
                continue
            a, b = opts[pos[layer]], opts[pos[layer] + 1]
            saved = sizes[layer][a] - sizes[layer][b]
            rise = max(0.0, costs[layer][b] - costs[layer][a])
            key = (0, rise / saved) if saved > 0 else (1, rise)
            if best_key is None or key < best_key:
                best, best_key = layer, key
        if best is None:
            return path
        pos[best] += 1
        choice[best] = allowed[best][pos[best]]
        path.append(dict(choice))


def search_mixed_precision(
    model: nn.Module,
    candidates: Sequence[Recipe],
    calib_data: Iterable | None,
    *,
    size_budget: int | float | str | None = None,
    min_metric: float | None = None,
    metric: Metric | None = None,
    metric_name: str = "metric",
    example_inputs=None,
    num_batches: int | None = None,
    progress: bool = True,
) -> MixedPrecisionPlan:
    """Choose, per weighted layer, one of ``candidates`` (most precise first) by measured sensitivity.

    Args:
        model: the float model.
        candidates: two or more recipes, most precise first (e.g. ``[W8A8(), W4A16(group_size=32)]``);
            the first one is the base recipe (joins and edges follow it).
        calib_data: calibration batches, as for :func:`lowbit.quantize`; the default metric also runs
            on them (at most ``num_batches`` of them). They are read once per candidate and per probe;
            a one-shot iterator (generator) is first stored as a list of its first ``num_batches``.
        size_budget: the largest deployed size (bytes, or ``"3.5MB"``); the first configuration of the
            path that fits is taken (before ``min_metric`` narrows it).
        min_metric: the lowest acceptable metric (output SQNR in dB by default; else ``metric``'s unit).
        metric: ``metric(model) -> float``, higher is better (e.g. top-1 on held-out data); by default
            the SQNR of the model's output against the float model on the calibration batches.
        metric_name: how tables name ``metric``.

    Returns:
        A :class:`MixedPrecisionPlan` whose ``size_bytes`` (deployed size, measured) is within
        ``size_budget``. When ``min_metric`` cannot be met within the size budget, the first configuration
        that fits is returned with ``meets_budget=False`` and a warning is logged.

    Raises:
        ConfigError: fewer than two candidates, no budget, a budget that is not a size
            (:func:`parse_size`) or a ``min_metric`` that is not a number, a ``metric`` that returns no
            number, or a size budget below what the cheapest candidates give (the message says the
            smallest size possible).
    """
    candidates = tuple(candidates)
    if len(candidates) < 2 or not all(isinstance(c, Recipe) for c in candidates):
        raise ConfigError("mixed precision needs two or more candidate recipes (lowbit.recipes presets), "
                          "most precise first, e.g. [W8A8(), W4A16(group_size=32)].")
    if size_budget is None and min_metric is None:
        raise ConfigError("give a budget: size_budget= (bytes or '3.5MB') and/or min_metric= "
                          "(lowest acceptable metric; output SQNR in dB by default).")
    budget = None if size_budget is None else parse_size(size_budget)
    if min_metric is not None:
        if isinstance(min_metric, bool) or not isinstance(min_metric, numbers.Real) or math.isnan(min_metric):
            raise ConfigError(f"min_metric must be a number ({'output SQNR in dB' if metric is None else metric_name}),"
                              f" got {min_metric!r}.")

    if calib_data is not None and iter(calib_data) is calib_data:  # a generator: the search reads it many times
        calib_data = list(itertools.islice(calib_data, num_batches))

    def build(recipe: Recipe) -> nn.Module:
        return quantize(model, recipe, calib_data, example_inputs, num_batches=num_batches, progress=False)

    qmodels = [build(c) for c in tqdm(candidates, desc="quantizing candidates", disable=not progress)]
    layers = [dict(quantized_weight_layers(q)) for q in qmodels]
    names = list(layers[0])
    allowed = {n: tuple(i for i in range(len(candidates)) if n in layers[i]) for n in names}
    allowed = {n: a for n, a in allowed.items() if a and a[0] == 0 and len(a) > 1}
    if not allowed:
        raise ConfigError("no layer is quantized by both the first and a later candidate, so there is nothing to "
                          "choose; check the candidates' exclude/overrides.")
    sizes = {n: tuple(weight_bytes(layers[i][n].weight, layers[i][n].weight_quantizer) if n in layers[i] else 0
                      for i in range(len(candidates))) for n in allowed}

    nsr = None
    if metric is None:
        calls = list(iter_calls(calib_data, qmodels[0], num_batches, progress=False))
        nsr = _OutputNSR(calls, qmodels[0])
        metric_name = _OutputNSR.name
        float_metric = math.inf
    else:
        with quantization_disabled(qmodels[0]):
            float_metric = _user_metric(metric, qmodels[0], metric_name)

    def cost_of(m: nn.Module) -> float:
        return nsr.nsr(m) if nsr is not None else float_metric - _user_metric(metric, m, metric_name)

    def measure(m: nn.Module) -> float:
        return _OutputNSR.to_db(nsr.nsr(m)) if nsr is not None else _user_metric(metric, m, metric_name)

    costs: dict[str, tuple[float, ...]] = {}
    bar = tqdm(total=sum(len(a) for a in allowed.values()), desc="layer sensitivity", disable=not progress)
    for n, opts in allowed.items():
        row = [math.nan] * len(candidates)
        for i in opts:
            with quantization_disabled(qmodels[i], keep=n):
                row[i] = cost_of(qmodels[i])
            bar.update()
        costs[n] = tuple(row)
    bar.close()
    del qmodels

    path = _greedy_path(costs, sizes, allowed)
    planned = [sum(sizes[n][c[n]] for n in allowed) for c in path]
    probed: dict[int, tuple[int, float | None]] = {}

    def probe(k: int, with_metric: bool) -> tuple[int, float | None]:
        if k not in probed or (with_metric and probed[k][1] is None):
            q = build(_config_recipe(candidates, path[k]))
            probed[k] = (deployed_size_bytes(q), measure(q) if with_metric else None)
        return probed[k]

    # Size: planned weight bytes fall along the path; the deployed size adds what stays nearly constant
    # (biases, float layers, activation scales: these differ a little per configuration, so the estimate
    # only says where to start and every choice is checked on the deployed size).
    k = 0
    if budget is not None:
        offset = probe(0, False)[0] - planned[0]
        fits = [i for i, p in enumerate(planned) if p + offset <= budget]
        k = fits[0] if fits else len(path) - 1
        while probe(k, False)[0] > budget and k + 1 < len(path):
            k += 1
        # the estimate may overshoot (a cheaper candidate can drop activation quantizers): step back
        # while the configuration before, estimated with the offset measured here, fits
        while k > 0 and planned[k - 1] + probe(k, False)[0] - planned[k] <= budget and probe(k - 1, False)[0] <= budget:
            k -= 1
        if probe(k, False)[0] > budget:
            last = len(path) - 1
            smallest = min(probe(i, False)[0] for i in {last, min(range(len(path)), key=lambda i: (planned[i], -i))})
            raise ConfigError(f"size budget {budget} bytes is below the smallest model these candidates give "
                              f"({smallest} bytes, with every layer at its cheapest candidate, here "
                              f"{_name(candidates[-1])}); raise the budget to at least {smallest} bytes or add a "
                              "smaller candidate.")
    fitting = k
    meets = True
    if min_metric is not None:
        lo, hi = k, len(path) - 1  # find the last index in [k, end] whose measured metric >= min_metric
        if not probe(lo, True)[1] >= min_metric:  # also when the metric is nan
            meets = False
            log.warning("lowbit: mixed precision: %s %.4g at the first configuration that fits is below min_metric "
                        "%.4g; returning it (raise the size budget or lower min_metric).",
                        metric_name, probe(lo, True)[1], min_metric)
        else:
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if probe(mid, True)[1] >= min_metric:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            if budget is not None and probe(k, False)[0] > budget:  # sizes need not fall exactly along the path
                k = fitting
    size, value = probe(k, True)
    return MixedPrecisionPlan(
        candidates=candidates, choice=dict(path[k]), sensitivity=costs, layer_bytes=sizes, size_bytes=size,
        metric=float(value), float_metric=float_metric, metric_name=metric_name, meets_budget=meets,
        path=tuple(v for _, v in sorted(probed.items())),
    )
