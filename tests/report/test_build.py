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
