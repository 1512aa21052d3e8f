"""Hypothesis properties that every format must satisfy, checked against a brute-force nearest grid point."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import parse

from ._reference import nearest_distance, neighbours

NAMES = [
    "int8", "uint4", "int4_narrow", "int2",
    "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp_e3m3_b2_fn", "fp_e4m3",
    "binary", "ternary", "ternary:0.7", "log2_4", "log2_8", "log2_3_e2",
]
FORMATS = [parse(n) for n in NAMES]
_GRIDS = {f.name: f.grid() for f in FORMATS}
_GRID_LISTS = {name: g.tolist() for name, g in _GRIDS.items()}
NEAREST = [f for f in FORMATS if f.name != "ternary:0.7"]  # a threshold other than 0.5 is not nearest


@functools.cache
def _values(fmt, span: float | None = None):
    """Lists of float64 values: inside [min, max] when ``span`` is None, else in [-span*max, span*max]."""
    m, lo = float(fmt.max_value), float(fmt.min_value)
    a, b = (lo, m) if span is None else (-span * m, span * m)
    return st.lists(
        st.one_of(
            st.floats(min_value=a, max_value=b, allow_nan=False, width=64),
            st.floats(min_value=max(a, -1e-3 * m), max_value=1e-3 * m, allow_nan=False, width=64),  # subnormals
            st.sampled_from(_GRID_LISTS[fmt.name]),
        ),
        min_size=1,
        max_size=32,
    ).map(lambda v: torch.tensor(v, dtype=torch.float64))


@pytest.mark.parametrize("fmt", NEAREST, ids=lambda f: f.name)
@settings(max_examples=30)
@given(data=st.data())
def test_nearest_inside_range(fmt, data):
    x = data.draw(_values(fmt))
    q = fmt.round(x)
    grid = _GRIDS[fmt.name]
    # q is on the grid and no grid point is closer to x: |x - q| <= half the local gap
    idx = torch.searchsorted(grid, q).clamp(max=grid.numel() - 1)
    assert torch.equal(grid[idx], q + 0.0)
    assert torch.equal((q - x).abs(), nearest_distance(grid, x))
    lo, hi = neighbours(grid, x)
    assert bool(((q - x).abs() <= (hi - lo) / 2).all())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@settings(max_examples=30)
@given(data=st.data())
def test_idempotent_monotone_saturating(fmt, data):
    x = data.draw(_values(fmt, span=4.0))
    q = fmt.round(x)
    assert torch.equal(fmt.round(q), q)
    xs, order = torch.sort(x)
    qs = q[order]
    assert bool((qs[1:] >= qs[:-1]).all())
    above, below = x > fmt.max_value, x < fmt.min_value
    assert bool((q[above] == fmt.max_value).all()) and bool((q[below] == fmt.min_value).all())
    assert bool(((q >= fmt.min_value) & (q <= fmt.max_value)).all())
    # codes carry exactly the rounded values
    assert torch.equal(fmt.dequantize(fmt.quantize(x)).double(), q)
    assert fmt.quantize(x).dtype == fmt.code_dtype


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@settings(max_examples=30)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_stochastic_lands_on_a_neighbour(fmt, data, seed):
    x = data.draw(_values(fmt))
    q = fmt.round(x, "stochastic", torch.Generator().manual_seed(seed))
    lo, hi = neighbours(_GRIDS[fmt.name], x)
    assert bool(((q == lo) | (q == hi)).all())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_float32_input_keeps_dtype_and_nan(fmt):
    x = torch.tensor([0.3, -1.7, math.nan], dtype=torch.float32)
    q = fmt.round(x)
    assert q.dtype == torch.float32
    if not fmt.is_integer:  # integer rounding has no NaN policy of its own (ops checks finiteness)
        assert torch.isnan(q[2])
