"""``lowbit.report.build``: ReportData from a quantized model, checked against the observers and weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit import recipes
from lowbit.calibration.histogram import HistogramObserver
from lowbit.report.build import build_report_data, histogram_arrays, weight_channel_ranges

from .tiny_models import tiny_net


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return [torch.randn(4, 3, 8, 8) for _ in range(3)]


@pytest.mark.parametrize("calibrator", ["kl", "minmax"])
def test_activation_histograms_and_ranges(data, calibrator):
    q = lowbit.quantize(tiny_net(), recipes.W8A8(calibrator=calibrator), data, progress=False)
    rd = build_report_data(q, data, model_name="tiny", num_batches=3)
    acts = {a.name: a for a in rd.activations}
    assert acts, "every static activation quantizer should be in the report"
    quant = {qq.name: qq for _, qq in lowbit.quantizers(q)}
    for name, a in acts.items():
        qq = quant[name]
        assert a.chosen == calibrator
        assert set(a.ranges) >= {"minmax", "percentile", "kl", "mse"}
        lo, hi = qq.chosen_range
        assert a.ranges[calibrator] == pytest.approx((float(lo), float(hi)), rel=1e-6, abs=1e-7)
        assert a.edges[0] <= a.ranges["minmax"][0] and a.edges[-1] >= a.ranges["minmax"][1]
        assert a.sqnr_db is not None and a.sqnr_db > 10
    # the input edge sees every calibration value: 3 batches x 4 x 3 x 8 x 8
    inp = next(a for a in rd.activations if a.counts.sum() == 3 * 4 * 3 * 64)
    assert inp.ranges["minmax"] == pytest.approx((min(float(x.min()) for x in data), max(float(x.max()) for x in data)))
    assert set(rd.layer_sqnr) >= {"conv1", "dw", "fc"}
    assert all(v > 10 for v in rd.layer_sqnr.values())


def test_histogram_arrays_exact_counts():
    obs = HistogramObserver(lowbit.QuantSpec("uint8", symmetric=False, calibrator="kl"))
    x = torch.tensor([-1.1, -0.3, 0.0, 0.2, 2.1, 3.7])  # off the power-of-two bin edges
    obs.update(x)
    counts, edges = histogram_arrays(obs, max_bins=64)
    assert counts.sum() == 6 and counts.size <= 64 and edges.size == counts.size + 1
    np.testing.assert_array_equal(np.histogram(x.numpy(), bins=edges)[0], counts)
    obs.update(torch.tensor([-1.0]))  # exactly on an edge: still counted
    assert histogram_arrays(obs, max_bins=64)[0].sum() == 7


def test_depthwise_channel_ranges_and_skips(data):
    q = lowbit.quantize(tiny_net(), recipes.W8A8(exclude=("fc",)), data, progress=False)
    wcr = weight_channel_ranges(q)
    assert "dw" in wcr
    w = tiny_net().dw.weight.detach()
    lo, hi = wcr["dw"]
    np.testing.assert_allclose(lo, w.reshape(8, -1).amin(1).numpy())
    np.testing.assert_allclose(hi, w.reshape(8, -1).amax(1).numpy())
    rd = build_report_data(q, None)
    assert [s[0] for s in rd.skipped] == ["fc"]
    assert rd.layer_sqnr == {} and any("capture:" in n for n in rd.notes)
    assert not math.isnan(float(lo.sum()))
