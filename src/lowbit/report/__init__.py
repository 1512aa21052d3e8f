"""Measure and show what quantization did: metrics (SQNR, cosine, error in steps, top-1), the report's
data (:class:`ReportData`, JSON round trip) and a self-contained HTML report with plots.

``write_report`` / ``render_report`` import matplotlib and jinja2 on first use only, so the metrics stay
cheap to import from tests and passes.
"""

from __future__ import annotations

from typing import Any

from .data import ActivationStats, ReportData, ResultRow
from .metrics import StepError, cosine_similarity, sqnr_db, step_error, top1_accuracy, top1_agreement

__all__ = [
    "sqnr_db", "cosine_similarity", "StepError", "step_error", "top1_agreement", "top1_accuracy",
    "ReportData", "ResultRow", "ActivationStats", "write_report", "render_report",
]


def __getattr__(name: str) -> Any:
    if name in ("write_report", "render_report"):
        from . import html

        return getattr(html, name)
    raise AttributeError(f"module 'lowbit.report' has no attribute {name!r}")
