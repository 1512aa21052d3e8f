"""Everything a quantization report shows, as plain frozen dataclasses that serialise to JSON.

The rest of lowbit fills in a :class:`ReportData` (accuracy per variant, activation histograms with
every candidate range, per-layer SQNR, skipped layers ...) and :func:`lowbit.report.write_report` draws
it. Keeping the data apart from the drawing means a report can be saved as JSON, compared across runs
and redrawn later.

JSON encoding: numpy arrays become lists; non-finite floats (an exact layer's SQNR is ``inf``) become
the strings ``"inf"``, ``"-inf"``, ``"nan"`` so the file stays standard JSON that any parser reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ShapeMismatchError

__all__ = ["ResultRow", "ActivationStats", "ReportData", "RANGE_METHODS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
RANGE_METHODS: tuple[str, ...] = ("minmax", "percentile", "kl", "mse")
"""The candidate range estimators the report draws on each histogram, in this order."""


def _enc(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _dec(x: float | str | None) -> float | None:
    if x is None:
        return None
    return float(x)  # float("inf"), float("-inf"), float("nan") parse the strings back


def _enc_array(a: np.ndarray) -> list:
    """A float array as a JSON list, non-finite entries as the strings of :func:`_enc`."""
    return a.tolist() if np.isfinite(a).all() else [_enc(v) for v in a.tolist()]


def _dec_array(values: Sequence[float | str]) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=np.float64)


def _same_float(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _hash_float(x: float | None) -> object:
    return "nan" if x is not None and math.isnan(x) else x


@dataclass(frozen=True)
class ResultRow:
    """One measured figure of one model variant.

    Attributes:
        variant: ``"float"``, ``"W8A8"``, ``"W4A16"`` ...
        metric: what ``value`` is (``"top1"``, ``"perplexity"``, ``"spearman"``).
        value: the figure.
        size_bytes: model (weights) size of this variant in bytes, or None if not measured.
        latency_ms: mean latency per batch in milliseconds, or None if not measured.
    """

    variant: str
    metric: str
    value: float
    size_bytes: int | None = None
    latency_ms: float | None = None

    def __eq__(self, other: object) -> bool:  # nan == nan, so a NaN figure survives the JSON round trip
        if not isinstance(other, ResultRow):
            return NotImplemented
        return (self.variant == other.variant and self.metric == other.metric and self.size_bytes == other.size_bytes
                and _same_float(self.value, other.value) and _same_float(self.latency_ms, other.latency_ms))

    def __hash__(self) -> int:
        return hash((self.variant, self.metric, _hash_float(self.value), self.size_bytes,
                     _hash_float(self.latency_ms)))

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "metric": self.metric, "value": _enc(self.value),
                "size_bytes": None if self.size_bytes is None else int(self.size_bytes),  # numpy ints too
                "latency_ms": _enc(self.latency_ms)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResultRow:
        return cls(d["variant"], d["metric"], _dec(d["value"]), d.get("size_bytes"), _dec(d.get("latency_ms")))


@dataclass(frozen=True)
class ActivationStats:
    """The calibration histogram of one activation quantizer and the ranges each method proposed.

    Attributes:
        name: the quantizer's name (``"layer1.0.conv1.input"``).
        counts: histogram counts, shape ``(B,)`` (numpy, any non-negative numbers).
        edges: bin edges, shape ``(B + 1,)``, increasing.
        ranges: method name -> ``(lo, hi)``; any of :data:`RANGE_METHODS` (others are drawn too).
        chosen: the method whose range the quantizer uses (a key of ``ranges``).
        sqnr_db: SQNR of this quantizer's output, if measured (orders the report, worst first).
    """

    name: str
    counts: np.ndarray
    edges: np.ndarray
    ranges: Mapping[str, tuple[float, float]]
    chosen: str
    sqnr_db: float | None = None

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, dtype=np.float64).reshape(-1)
        edges = np.asarray(self.edges, dtype=np.float64).reshape(-1)
        if edges.size != counts.size + 1:
            raise ShapeMismatchError(
                f"activation {self.name!r}: a histogram of {counts.size} bins needs {counts.size + 1} edges, "
                f"got {edges.size}; pass the edges numpy.histogram / torch.histogram return."
            )
        if not (np.isfinite(counts).all() and np.isfinite(edges).all()):
            raise ConfigError(f"activation {self.name!r}: the histogram's counts and edges must be finite numbers.")
        if counts.size and (np.any(np.diff(edges) < 0) or np.any(counts < 0)):
            raise ConfigError(f"activation {self.name!r}: edges must increase and counts be non-negative.")
        ranges = {str(k): (float(v[0]), float(v[1])) for k, v in dict(self.ranges).items()}
        if self.chosen not in ranges:
            raise ConfigError(
                f"activation {self.name!r}: chosen method {self.chosen!r} has no range; "
                f"ranges has {sorted(ranges)}."
            )
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "ranges", ranges)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "counts": self.counts.tolist(), "edges": self.edges.tolist(),
                "ranges": {k: [_enc(lo), _enc(hi)] for k, (lo, hi) in self.ranges.items()},
                "chosen": self.chosen, "sqnr_db": _enc(self.sqnr_db)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationStats:
        ranges = {k: (_dec(v[0]), _dec(v[1])) for k, v in d["ranges"].items()}
        return cls(d["name"], _dec_array(d["counts"]), _dec_array(d["edges"]), ranges, d["chosen"],
                   _dec(d.get("sqnr_db")))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ActivationStats):
            return NotImplemented
        return (self.name == other.name and self.chosen == other.chosen and _same_ranges(self.ranges, other.ranges)
                and _same_float(self.sqnr_db, other.sqnr_db)
                and np.array_equal(self.counts, other.counts) and np.array_equal(self.edges, other.edges))

    __hash__ = None  # type: ignore[assignment]  # holds arrays


def _same_ranges(a: Mapping[str, tuple[float, float]], b: Mapping[str, tuple[float, float]]) -> bool:
    return a.keys() == b.keys() and all(_same_float(a[k][0], b[k][0]) and _same_float(a[k][1], b[k][1]) for k in a)


@dataclass(frozen=True)
class ReportData:
    """All the content of one quantization report.

    Attributes:
        title: the report's heading.
        model_name: e.g. ``"EfficientNet-Lite0"``.
        recipe: the recipe as text (``str(recipe)`` or its config), shown verbatim.
        results: :class:`ResultRow` s, several metrics and variants in any order.
        activations: :class:`ActivationStats` per activation quantizer.
        layer_sqnr: layer name -> SQNR in dB of its output (quantized model vs float model).
        weight_channel_ranges: layer name -> (per-channel min, per-channel max), each shape ``(C,)``,
            for layers where per-tensor quantization would collapse (e.g. depthwise convolutions).
        skipped: ``(layer, reason)`` for every layer kept in float.
        notes: free-form paragraphs shown at the end.
    """

    title: str = "lowbit quantization report"
    model_name: str = ""
    recipe: str = ""
    results: Sequence[ResultRow] = ()
    activations: Sequence[ActivationStats] = ()
    layer_sqnr: Mapping[str, float] = field(default_factory=dict)
    weight_channel_ranges: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    skipped: Sequence[tuple[str, str]] = ()
    notes: Sequence[str] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "results", tuple(self.results))
        set_(self, "activations", tuple(self.activations))
        set_(self, "layer_sqnr", {str(k): float(v) for k, v in dict(self.layer_sqnr).items()})
        wcr: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for k, (lo, hi) in dict(self.weight_channel_ranges).items():
            lo_a = np.asarray(lo, dtype=np.float64).reshape(-1)
            hi_a = np.asarray(hi, dtype=np.float64).reshape(-1)
            if lo_a.shape != hi_a.shape:
                raise ShapeMismatchError(
                    f"weight_channel_ranges[{k!r}]: per-channel min has {lo_a.size} channels but max has "
                    f"{hi_a.size}; pass two arrays of shape (C,)."
                )
            wcr[str(k)] = (lo_a, hi_a)
        set_(self, "weight_channel_ranges", wcr)
        set_(self, "skipped", tuple((str(a), str(b)) for a, b in self.skipped))
        notes = (self.notes,) if isinstance(self.notes, str) else tuple(self.notes)
        set_(self, "notes", tuple(str(n) for n in notes))
        seen: set[tuple[str, str]] = set()
        for r in self.results:
            if not isinstance(r, ResultRow):
                raise ConfigError(f"ReportData.results takes ResultRow objects, got {type(r).__name__}.")
            if (r.variant, r.metric) in seen:  # the report has one cell per pair: a second value would be lost
                raise ConfigError(f"ReportData.results has two {r.metric!r} figures for the variant {r.variant!r}; "
                                  "give each (variant, metric) once (name repeated runs as different variants).")
            seen.add((r.variant, r.metric))
        for a in self.activations:
            if not isinstance(a, ActivationStats):
                raise ConfigError(f"ReportData.activations takes ActivationStats objects, got {type(a).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        """A dict of JSON types only (see the module docstring for the encoding)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "title": self.title,
            "model_name": self.model_name,
            "recipe": self.recipe,
            "results": [r.to_dict() for r in self.results],
            "activations": [a.to_dict() for a in self.activations],
            "layer_sqnr": {k: _enc(v) for k, v in self.layer_sqnr.items()},
            "weight_channel_ranges": {k: {"min": _enc_array(lo), "max": _enc_array(hi)}
                                      for k, (lo, hi) in self.weight_channel_ranges.items()},
            "skipped": [list(s) for s in self.skipped],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReportData:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"report data has schema_version {version!r}; this lowbit reads version {SCHEMA_VERSION}. "
                "Regenerate the report data with this lowbit version."
            )
        return cls(
            title=d["title"],
            model_name=d["model_name"],
            recipe=d["recipe"],
            results=[ResultRow.from_dict(r) for r in d["results"]],
            activations=[ActivationStats.from_dict(a) for a in d["activations"]],
            layer_sqnr={k: _dec(v) for k, v in d["layer_sqnr"].items()},
            weight_channel_ranges={k: (_dec_array(v["min"]), _dec_array(v["max"]))
                                   for k, v in d["weight_channel_ranges"].items()},
            skipped=[tuple(s) for s in d["skipped"]],
            notes=d["notes"],
        )

    def to_json(self, indent: int | None = None) -> str:
        """Standard JSON text (no NaN/Infinity literals): ``ReportData.from_json(d.to_json()) == d``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ReportData:
        """Parse :meth:`to_json` output. Raises ConfigError on text that is not report JSON."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid report JSON ({e}); pass the text ReportData.to_json() wrote.") from None
        if not isinstance(d, dict):
            raise ConfigError("report JSON must be an object; pass the text ReportData.to_json() wrote.")
        try:
            return cls.from_dict(d)
        except KeyError as e:
            raise ConfigError(f"report JSON lacks the field {e}; was it written by ReportData.to_json()?") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReportData):
            return NotImplemented
        plain = ("title", "model_name", "recipe", "results", "activations", "skipped", "notes")
        if any(getattr(self, k) != getattr(other, k) for k in plain):
            return False
        if self.layer_sqnr.keys() != other.layer_sqnr.keys() or not all(
            _same_float(v, other.layer_sqnr[k]) for k, v in self.layer_sqnr.items()
        ):
            return False
        if self.weight_channel_ranges.keys() != other.weight_channel_ranges.keys():
            return False
        return all(
            np.array_equal(lo, other.weight_channel_ranges[k][0], equal_nan=True)
            and np.array_equal(hi, other.weight_channel_ranges[k][1], equal_nan=True)
            for k, (lo, hi) in self.weight_channel_ranges.items()
        )

    __hash__ = None  # type: ignore[assignment]
