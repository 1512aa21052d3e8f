"""``build_report_data`` pieces on a model whose layers are not all reached by the report's data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import recipes
from lowbit.report.build import activation_stats


class _Branchy(nn.Module):
    """``a`` for inputs with a positive mean, ``b`` otherwise (data-dependent: quantized by module swapping)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if float(x.mean()) > 0 else self.b(x)


def _sqnr_by_hand(quantizer: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        sig = sum(float((x.double() ** 2).sum()) for x in batches)
        err = sum(float(((x.double() - quantizer(x).double()) ** 2).sum()) for x in batches)
    return 10 * math.log10(sig / err)


def test_quantizer_the_data_never_reaches_has_no_sqnr():
    torch.manual_seed(0)
    pos = [torch.rand(8, 4) + 0.1 for _ in range(2)]
    neg = [-torch.rand(8, 4) - 0.1 for _ in range(2)]
    q = lowbit.quantize(_Branchy().eval(), recipes.W8A8(calibrator="kl"), pos + neg, progress=False)
    by_name = {qq.name: qq for _, qq in lowbit.quantizers(q)}
    both = {a.name: a.sqnr_db for a in activation_stats(q, pos + neg)}
    assert both["b.input"] == pytest.approx(_sqnr_by_hand(by_name["b.input"], neg), rel=1e-9)
    only_a = {a.name: a.sqnr_db for a in activation_stats(q, pos)}
    assert only_a["a.input"] == pytest.approx(_sqnr_by_hand(by_name["a.input"], pos), rel=1e-9)
    assert only_a["b.input"] is None  # not measured; it used to read inf ("exact")


@pytest.mark.parametrize("calibrator", ["minmax", "percentile"])
def test_int16_activations_get_no_kl_range_and_a_note(calibrator):
    """W8A16: 32768 levels per sign need at least 32768 histogram bins for KL, the histogram has 2048; the
    report shows the other candidate ranges and says KL is n/a instead of failing (it raised ConfigError)."""
    from lowbit.calibration.estimators import percentile_range
    from lowbit.report.build import build_report_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    data = [torch.randn(16, 4) for _ in range(2)]
    q = lowbit.quantize(model, recipes.W8A16(calibrator=calibrator), data, progress=False)
    rd = build_report_data(q, data)
    assert rd.activations and all(set(a.ranges) == {"minmax", "percentile", "mse"} for a in rd.activations)
    first = next(a for a in rd.activations if a.name == "input_1.output")  # the model's input edge
    x = torch.cat(data)
    assert first.ranges["minmax"] == pytest.approx((float(x.min()), float(x.max())))
    if calibrator == "percentile":  # the quantizer's own histogram: same percentile range as the estimator's
        obs = dict(lowbit.quantizers(q))["input_1_quant"].observer
        lo, hi = percentile_range(obs.stats, 99.99, True)
        assert first.ranges["percentile"] == pytest.approx((float(lo), float(hi)))
    notes = [n for n in rd.notes if n.startswith("KL: n/a for int16")]
    assert len(notes) == 1 and "32768" in notes[0] and "2048" in notes[0], rd.notes
    # an int8 model keeps its KL candidate and has no such note
    q8 = lowbit.quantize(model, recipes.W8A8(), data, progress=False)
    rd8 = build_report_data(q8, data)
    assert all("kl" in a.ranges for a in rd8.activations) and not any(n.startswith("KL: n/a") for n in rd8.notes)
