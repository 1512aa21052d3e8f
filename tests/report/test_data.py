"""ReportData: validation, and a JSON round trip that keeps every value (inf/nan and arrays included)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lowbit.errors import ConfigError, ShapeMismatchError
from lowbit.report.data import ActivationStats, ReportData, ResultRow

from .conftest import make_report_data


def _strict_loads(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_round_trip_is_exact(report_data):
    data = ReportData(
        **{**report_data.__dict__, "layer_sqnr": {**report_data.layer_sqnr, "odd": float("nan"), "neg": -math.inf}}
    )
    text = data.to_json(indent=1)
    raw = _strict_loads(text)  # standard JSON: no NaN / Infinity literals
    assert raw["layer_sqnr"]["features.5.conv"] == "inf"
    assert raw["layer_sqnr"]["neg"] == "-inf"
    back = ReportData.from_json(text)
    assert back == data
    assert back.layer_sqnr["features.5.conv"] == math.inf
    assert math.isnan(back.layer_sqnr["odd"])
    a0, b0 = data.activations[0], back.activations[0]
    np.testing.assert_array_equal(b0.counts, a0.counts)
    np.testing.assert_array_equal(b0.edges, a0.edges)  # float64 survives JSON's repr round trip
    assert b0.ranges == a0.ranges and b0.chosen == a0.chosen and b0.sqnr_db == a0.sqnr_db
    lo, hi = back.weight_channel_ranges["features.1.dw"]
    np.testing.assert_array_equal(lo, data.weight_channel_ranges["features.1.dw"][0])
    np.testing.assert_array_equal(hi, data.weight_channel_ranges["features.1.dw"][1])
    assert back.results[4] == ResultRow("W4A16", "top1", 0.8504, 2_600_000, None)
    assert back.skipped == data.skipped and back.notes == data.notes


def test_json_round_trip_keeps_non_finite_figures_and_numpy_ints():
    rows = [ResultRow("float", "perplexity", 19.89, np.int64(270_000_000), 10.5),
            ResultRow("W4A16", "perplexity", float("nan"), np.int64(70_000_000), float("inf"))]
    lo, hi = np.array([-1.0, -np.inf, 0.0]), np.array([1.0, 2.0, np.nan])
    data = ReportData(results=rows, weight_channel_ranges={"dw": (lo, hi)})
    raw = _strict_loads(data.to_json())
    assert raw["results"][1]["value"] == "nan" and raw["results"][1]["size_bytes"] == 70_000_000
    assert raw["weight_channel_ranges"]["dw"] == {"min": [-1.0, "-inf", 0.0], "max": [1.0, 2.0, "nan"]}
    back = ReportData.from_json(data.to_json())
    assert back == data and math.isnan(back.results[1].value) and back.results[1].latency_ms == math.inf
    np.testing.assert_array_equal(back.weight_channel_ranges["dw"][0], lo)
    np.testing.assert_array_equal(back.weight_channel_ranges["dw"][1], hi)
    assert len({rows[1], ResultRow.from_dict(rows[1].to_dict())}) == 1  # equal rows hash alike
    changed = ReportData(results=[rows[0], ResultRow("W4A16", "perplexity", 25.0, 70_000_000, math.inf)],
                         weight_channel_ranges={"dw": (lo, hi)})
    assert changed != data


def test_equality_sees_changes(report_data):
    other = make_report_data(seed=1)
    assert other != report_data
    d = report_data.to_dict()
    d["weight_channel_ranges"]["features.1.dw"]["max"][0] += 1e-9
    assert ReportData.from_dict(d) != report_data


def test_inputs_are_normalised():
    a = ActivationStats("x", [1, 2, 3], [0.0, 1.0, 2.0, 3.0], {"minmax": [0, 3], "kl": (0, 2.5)}, "kl")
    assert a.counts.dtype == np.float64 and a.ranges == {"minmax": (0.0, 3.0), "kl": (0.0, 2.5)}
    d = ReportData(activations=[a], skipped=[["fc", "kept"]], notes="one note", layer_sqnr={"fc": 12})
    assert d.activations == (a,) and d.skipped == (("fc", "kept"),) and d.notes == ("one note",)
    assert d.layer_sqnr == {"fc": 12.0}


def test_validation_errors():
    with pytest.raises(ShapeMismatchError, match="needs 4 edges"):
        ActivationStats("x", [1, 2, 3], [0.0, 1.0, 2.0], {"minmax": (0, 1)}, "minmax")
    with pytest.raises(ConfigError, match="chosen method 'kl' has no range"):
        ActivationStats("x", [1], [0.0, 1.0], {"minmax": (0, 1)}, "kl")
    with pytest.raises(ConfigError, match="increase"):
        ActivationStats("x", [1, 1], [0.0, 2.0, 1.0], {"minmax": (0, 1)}, "minmax")
    with pytest.raises(ShapeMismatchError, match="3 channels"):
        ReportData(weight_channel_ranges={"dw": (np.zeros(3), np.zeros(4))})
    with pytest.raises(ConfigError, match="ResultRow"):
        ReportData(results=[("float", "top1", 0.9)])
    with pytest.raises(ConfigError, match="two 'top1' figures for the variant 'W8A8'"):
        ReportData(results=[ResultRow("W8A8", "top1", 0.87), ResultRow("W8A8", "top5", 0.9),
                            ResultRow("W8A8", "top1", 0.86)])
    with pytest.raises(ConfigError, match="finite"):
        ActivationStats("x", [1, float("nan")], [0.0, 1.0, 2.0], {"minmax": (0, 1)}, "minmax")


def test_from_json_rejects_foreign_text(report_data):
    with pytest.raises(ConfigError, match="not valid report JSON"):
        ReportData.from_json("{not json")
    with pytest.raises(ConfigError, match="schema_version"):
        ReportData.from_json('{"title": "x"}')
    d = report_data.to_dict()
    del d["layer_sqnr"]
    with pytest.raises(ConfigError, match="layer_sqnr"):
        ReportData.from_json(json.dumps(d))
