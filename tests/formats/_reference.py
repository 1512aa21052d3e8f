"""Independent references for format tests: brute-force nearest grid point, float32 neighbours."""

from __future__ import annotations

import numpy as np
import torch


def nearest_distance(grid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """min_g |g - x| for every element of x (float64), by searching the sorted grid."""
    g = grid.double()
    xd = x.double().clamp(float(g[0]), float(g[-1]))
    idx = torch.searchsorted(g, xd).clamp(1, g.numel() - 1)
    return torch.minimum((g[idx] - xd).abs(), (g[idx - 1] - xd).abs())


def neighbours(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest grid value <= x and smallest >= x (x inside the grid's range), float64."""
    g = grid.double()
    xd = x.double()
    hi = g[torch.searchsorted(g, xd, side="left").clamp(max=g.numel() - 1)]
    lo = g[(torch.searchsorted(g, xd, side="right") - 1).clamp(min=0)]
    return lo, hi


def next_up(x: torch.Tensor) -> torch.Tensor:
    """The next float32 toward +inf (numpy's nextafter, independent of the code under test)."""
    a = x.float().numpy()
    with np.errstate(over="ignore"):
        return torch.from_numpy(np.nextafter(a, np.float32(np.inf)))


def next_down(x: torch.Tensor) -> torch.Tensor:
    a = x.float().numpy()
    with np.errstate(over="ignore"):
        return torch.from_numpy(np.nextafter(a, np.float32(-np.inf)))


def f32_bits(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern of float32 values, for bit-for-bit comparison (tells -0.0 from 0.0)."""
    return x.float().contiguous().view(torch.int32)


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical float32 values, except that any NaN matches any NaN."""
    a, e = actual.float(), expected.float()
    assert a.shape == e.shape
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ: {a[nan_a != nan_e]} vs {e[nan_a != nan_e]}"
    keep = ~nan_a
    bad = f32_bits(a[keep]) != f32_bits(e[keep])
    assert not bool(bad.any()), f"{int(bad.sum())} differ, e.g. {a[keep][bad][:5].tolist()} vs {e[keep][bad][:5].tolist()}"
