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


# --- the one-pass binning (count_bins) against an independent float64 numpy reference -------------

def _numpy_reference(x: np.ndarray, e: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts by the definition: floor(x / 2**e) for x >= 0, floor(-x / 2**e) for x < 0 (float64 exact)."""
    x = x.astype(np.float64)
    k = np.floor(np.abs(x) / 2.0**e).astype(np.int64)
    neg = x < 0
    return np.bincount(k[~neg], minlength=nb), np.bincount(k[neg], minlength=nb)


_EDGE_CASES = {
    # exact bin edges on both sides: +-k w must land in bin k on its own side
    "edges": lambda g: (torch.randint(-63, 64, (4000,), generator=g).float() * 2.0**-3),
    "negative_zero": lambda g: torch.tensor([-0.0, 0.0, -0.0, 1.0, -1.0, -0.125]),
    "subnormal": lambda g: torch.randn(3000, generator=g) * 1e-41,  # 2**-e is not a float32: float64 path
    "huge": lambda g: torch.rand(3000, generator=g) * 3e38 - 1.5e38,
    "heavy_tail": lambda g: torch.randn(5000, generator=g) ** 5,
}


@pytest.mark.parametrize("case", sorted(_EDGE_CASES))
@pytest.mark.parametrize("chunk", [None, 7])
def test_binning_matches_definition(case, chunk, monkeypatch):
    import lowbit.calibration.histogram as hmod

    if chunk is not None:  # many chunks, ragged last one: chunking must not change a count
        monkeypatch.setattr(hmod, "CHUNK_ELEMENTS", chunk)
    x = _EDGE_CASES[case](torch.Generator().manual_seed(3))
    nb = 64
    obs = _obs(nb=nb)
    obs.update(x)
    e = int(obs.stats.exponent[0])
    assert nb * 2.0**e > float(x.abs().max()) >= nb * 2.0 ** (e - 1)
    pos, neg = _numpy_reference(x.numpy(), e, nb)
    assert np.array_equal(obs.stats.hist[0, 0].numpy(), pos)
    assert np.array_equal(obs.stats.hist[0, 1].numpy(), neg)


def test_negative_zero_counts_as_non_negative():
    obs = _obs(nb=16)
    obs.update(torch.tensor([-0.0, -0.0, 0.0, 3.0]))
    assert obs.stats.hist[0, 0].tolist()[0] == 3 and int(obs.stats.hist[0, 1].sum()) == 0


@pytest.mark.parametrize("chunk", [None, 5])
def test_per_channel_binning_matches_definition(chunk, monkeypatch):
    import lowbit.calibration.histogram as hmod

    if chunk is not None:
        monkeypatch.setattr(hmod, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([1e-3, 1.0, 0.0, 2.0**-3, 1e4])
    x = torch.randint(-40, 41, (6, 5, 9), generator=g).float() * scales[None, :, None] / 8
    obs = _obs(nb=32, granularity="channel:1")
    obs.update(x)
    for c in range(5):
        e = int(obs.stats.exponent[c])
        xc = x[:, c].numpy()
        if scales[c] == 0:  # an all-zero block: no width yet, every count in the non-negative bin 0
            assert obs.stats.hist[c, 0, 0] == xc.size and int(obs.stats.hist[c].sum()) == xc.size
            continue
        pos, neg = _numpy_reference(xc, e, 32)
        assert np.array_equal(obs.stats.hist[c, 0].numpy(), pos), c
        assert np.array_equal(obs.stats.hist[c, 1].numpy(), neg), c


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_count_as_their_float32_values(dtype):
    torch.manual_seed(5)
    x = (torch.randn(3000) * 7).to(dtype)
    a, b = _obs(nb=128), _obs(nb=128)
    a.update(x)
    b.update(x.float())
    assert torch.equal(a.stats.hist, b.stats.hist) and torch.equal(a.stats.exponent, b.stats.exponent)
    assert torch.equal(a.stats.min_val, b.stats.min_val) and torch.equal(a.stats.max_val, b.stats.max_val)


@pytest.mark.parametrize("granularity", ["tensor", "channel:1"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_batch_raises_and_leaves_state_unchanged(granularity, bad):
    torch.manual_seed(6)
    obs = _obs(granularity=granularity)
    with pytest.raises(NonFiniteError, match="batch 0"):  # a bad first batch fixes no shape either
        obs.update(torch.tensor([[1.0, bad], [2.0, 3.0]]))
    good = torch.randn(4, 2)
    obs.update(good)
    poisoned = torch.randn(4, 2) * 100
    poisoned[2, 1] = bad
    with pytest.raises(NonFiniteError, match="NaN" if bad != bad else "Inf"):
        obs.update(poisoned)
    ref = _obs(granularity=granularity)
    ref.update(good)
    assert obs.num_batches == 1
    assert torch.equal(obs.stats.hist, ref.stats.hist) and torch.equal(obs.stats.exponent, ref.stats.exponent)
    assert torch.equal(obs.stats.min_val, ref.stats.min_val) and torch.equal(obs.stats.max_val, ref.stats.max_val)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 2.0**127, width=32) | st.sampled_from([2.0**-149, 2.0**-130, 1.0, 96.0, 2.0**127]),
       st.sampled_from([2, 3, 16, 100, 2048, 4096]))
def test_scalar_exponent_equals_tensor_exponent(amax, nb):
    from lowbit.calibration.histogram import covering_exponent, covering_exponent_scalar

    assert covering_exponent_scalar(amax, nb) == int(covering_exponent(torch.tensor([amax]), nb)[0])


def test_tiny_negative_that_underflows_stays_negative():
    # found by hypothesis: with w = 2, -2**-149 * 2**-1 underflows to -0.0 in float32; it is still x < 0
    tiny = -float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
    obs = _obs(nb=32)
    obs.update(torch.tensor([tiny, 32.0, -0.0]))
    assert int(obs.stats.hist[0, 1, 0]) == 1 and int(obs.stats.hist[0, 0, 0]) == 1  # -0.0 counts as >= 0
    assert int(obs.stats.hist[0, 0, 16]) == 1


def test_candidate_ranges_leave_out_kl_where_the_bins_are_too_few():
    """int16 needs 32768 bins per sign for KL's search; the 2048-bin histogram still gives the other three
    ranges (the int8 observer on the same data gives all four, its KL within the data's range)."""
    torch.manual_seed(0)
    x = torch.randn(4096)
    for fmt, levels, has_kl in (("int16", 32768, False), ("int8", 128, True)):
        obs = HistogramObserver(QuantSpec(fmt, symmetric=True, calibrator="mse"), "t")
        obs.update(x)
        assert obs.kl_levels_and_bins() == (levels, 2048)
        r = obs.candidate_ranges()
        assert ("kl" in r) == has_kl and {"minmax", "percentile", "mse"} <= set(r)
        assert float(r["minmax"][1]) == float(x.max()) and float(r["percentile"][1]) <= float(x.max())
