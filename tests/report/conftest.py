"""A realistic ReportData built from synthetic activations (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.report.data import ActivationStats, ReportData, ResultRow


def _activation(rng: np.random.Generator, name: str, relu: bool, sqnr: float) -> ActivationStats:
    x = rng.standard_t(df=4, size=20_000)
    if relu:
        x = np.maximum(x, 0.0)
    counts, edges = np.histogram(x, bins=128)
    a = np.abs(x)
    ranges = {
        "minmax": (float(x.min()), float(x.max())),
        "percentile": (-float(np.percentile(a, 99.99)) * (not relu), float(np.percentile(a, 99.99))),
        "kl": (-float(np.percentile(a, 99.5)) * (not relu), float(np.percentile(a, 99.5))),
        "mse": (-float(np.percentile(a, 99.9)) * (not relu), float(np.percentile(a, 99.9))),
    }
    chosen = ("kl", "mse", "percentile", "minmax")[len(name) % 4]
    return ActivationStats(name, counts, edges, ranges, chosen, sqnr)


def make_report_data(n_acts: int = 15, n_layers: int = 20, seed: int = 0) -> ReportData:
    rng = np.random.default_rng(seed)
    layers = [f"features.{i}.conv" for i in range(n_layers)]
    layer_sqnr = {name: float(18 + 20 * rng.random()) for name in layers}
    layer_sqnr["features.3.conv"] = 7.25  # the worst layer
    layer_sqnr["features.5.conv"] = float("inf")  # exact (e.g. kept at full precision)
    acts = [_activation(rng, f"features.{i}.conv.input", relu=i % 2 == 1, sqnr=layer_sqnr[layers[i]])
            for i in range(n_acts)]
    scales = np.geomspace(0.01, 4.0, 32)
    rng.shuffle(scales)
    w = rng.standard_normal((32, 9)) * scales[:, None]
    return ReportData(
        title="lowbit quantization report",
        model_name="TinyNet",
        recipe="W8A8(weights=int8 sym per-channel minmax, activations=uint8 affine per-tensor kl)",
        results=[
            ResultRow("float", "top1", 0.878, 18_800_000, 12.34),
            ResultRow("float", "top5", 0.972),
            ResultRow("W8A8", "top1", 0.8712, 4_900_000, 6.1),
            ResultRow("W8A8", "top5", 0.9695),
            ResultRow("W4A16", "top1", 0.8504, 2_600_000, None),
            ResultRow("W4A16", "top5", 0.9611),
        ],
        activations=acts,
        layer_sqnr=layer_sqnr,
        weight_channel_ranges={"features.1.dw": (w.min(axis=1), w.max(axis=1))},
        skipped=[("classifier", "last layer kept in float by the recipe (first_last_float=True)"),
                 ("features.0.conv", "input layer: 3 input channels, int8 loses 0.9 % top-1 here")],
        notes=["Synthetic data for the report tests.", "Latency measured on 2 CPU cores, batch 1."],
    )


@pytest.fixture
def report_data() -> ReportData:
    return make_report_data()
