"""Streaming histogram: exact counts, growth without loss, merge, per-channel, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.calibration import HistogramObserver, make_observer
from lowbit.errors import EmptyCalibrationError, NonFiniteError, ShapeMismatchError
from lowbit.spec import QuantSpec


def _obs(nb=64, granularity="tensor", cal="percentile"):
    from lowbit.calibration import Percentile

    c = Percentile(num_bins=nb) if cal == "percentile" else cal
    return HistogramObserver(QuantSpec("int8", granularity=granularity, calibrator=c))


def test_counts_equal_numpy_histogram():
    torch.manual_seed(0)
    x = torch.randn(5000) * 3
    obs = _obs(nb=64)
    obs.update(x)
    w = float(obs.stats.width[0])
    assert 64 * w > float(x.abs().max()) >= 32 * w  # smallest power-of-two width covering max|x|
    pos = np.histogram(x[x >= 0].numpy(), bins=64, range=(0, 64 * w))[0]
    neg = np.histogram((-x[x < 0]).numpy(), bins=64, range=(0, 64 * w))[0]
    assert np.array_equal(obs.stats.hist[0, 0].numpy(), pos)
    assert np.array_equal(obs.stats.hist[0, 1].numpy(), neg)
    assert float(obs.stats.min_val[0]) == float(x.min()) and float(obs.stats.max_val[0]) == float(x.max())


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=2, max_size=200),
       st.integers(1, 5))
def test_growth_is_exact_whatever_the_batching(values, n_splits):
    x = torch.tensor(values, dtype=torch.float32)
    whole = _obs(nb=32)
    whole.update(x)
    streamed = _obs(nb=32)
    for part in torch.tensor_split(x, n_splits):
        streamed.update(part)
    assert torch.equal(streamed.stats.hist, whole.stats.hist)
    assert torch.equal(streamed.stats.exponent, whole.stats.exponent)
    assert int(streamed.stats.hist.sum()) == x.numel()


def test_growth_from_zeros_and_small_to_large():
    obs = _obs(nb=16)
    obs.update(torch.zeros(10))
    obs.update(torch.tensor([0.001, -0.002]))
    obs.update(torch.tensor([1000.0, -3.0]))
    ref = _obs(nb=16)
    ref.update(torch.cat([torch.zeros(10), torch.tensor([0.001, -0.002, 1000.0, -3.0])]))
    assert torch.equal(obs.stats.hist, ref.stats.hist) and int(obs.stats.hist.sum()) == 14


def test_merge_equals_concatenation():
    torch.manual_seed(1)
    a, b = torch.randn(300) * 0.1, torch.randn(500) * 50
    oa, ob, oc = _obs(nb=256), _obs(nb=256), _obs(nb=256)
    oa.update(a)
    ob.update(b)
    oa.merge(ob)
    oc.update(torch.cat([a, b]))
    assert torch.equal(oa.stats.hist, oc.stats.hist)
    assert oa.num_batches == 2
    for k, (lo, hi) in oc.candidate_ranges().items():
        lo2, hi2 = oa.candidate_ranges()[k]
        assert torch.equal(lo, lo2) and torch.equal(hi, hi2), k


def test_per_channel_equals_per_tensor_on_each_channel():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 7) * torch.tensor([0.1, 1.0, 30.0])[None, :, None]
    obs = _obs(nb=256, granularity="channel:1")
    obs.update(x)
    obs.update(x * 2)
    ranges = obs.candidate_ranges()
    for c in range(3):
        single = _obs(nb=256)
        single.update(x[:, c])
        single.update(x[:, c] * 2)
        assert torch.equal(obs.stats.hist[c], single.stats.hist[0])
        for k, (lo, hi) in single.candidate_ranges().items():
            assert torch.allclose(ranges[k][0][c], lo) and torch.allclose(ranges[k][1][c], hi), k
    assert ranges["minmax"][1].shape == (3,)


def test_memory_independent_of_batches():
    obs = _obs()
    obs.update(torch.randn(100))
    size = obs.stats.hist.numel()
    for _ in range(20):
        obs.update(torch.randn(1000))
    assert obs.stats.hist.numel() == size and obs.num_batches == 21


def test_errors():
    obs = _obs()
    with pytest.raises(EmptyCalibrationError):
        obs.compute_range()
    with pytest.raises(NonFiniteError, match="NaN"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(NonFiniteError, match="Inf"):
        obs.update(torch.tensor([float("inf")]))
    ch = _obs(granularity="channel")
    ch.update(torch.randn(4, 3))
    with pytest.raises(ShapeMismatchError, match="channel"):
        ch.update(torch.randn(5, 3))


def test_make_observer_registry():
    from lowbit.calibration import ADMMObserver, MovingAverageMinMaxObserver

    for name, cls in [("kl", HistogramObserver), ("mse", HistogramObserver), ("percentile", HistogramObserver),
                      ("admm", ADMMObserver), ("moving_average", MovingAverageMinMaxObserver)]:
        assert type(make_observer(QuantSpec("int8", calibrator=name))) is cls
